"""No user file is ever lost: saves replace only their own kind, outputs are checked before any
work, and a model save killed at any instant leaves the old or the new model loadable."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import cellmnn
import cellmnn.files as cfiles
from cellmnn.cli import main as cli_main

FAST = ["--max-epochs", "2", "--check-every", "1", "--batch-size", "32", "--quiet"]


def small_model(seed):
    torch.manual_seed(seed)
    return cellmnn.CellMNN(2, width=16, depth=2, init_scale=1.0)


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def listing(path):
    return sorted(os.listdir(path))


@pytest.fixture
def data_csv(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "cells.csv"
    lines = ["time,a,b,c"] + [f"{t},{x[0]},{x[1]},{x[2]}" for t in (0.0, 1.0, 2.0, 3.0)
                              for x in rng.normal(size=(30, 3)) + t]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def unwritable(tmp_path):
    """A folder this process cannot create files in: read-only for a normal user; as root (who
    ignores permission bits) a pseudo-filesystem that refuses new files."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    for folder in ("/sys", "/proc/self"):
        try:
            os.mkdir(os.path.join(folder, "cellmnn-probe"))
        except OSError:
            yield type(tmp_path)(folder)
            return
        os.rmdir(os.path.join(folder, "cellmnn-probe"))
    pytest.skip("no folder refuses new files to root on this machine")


# ----------------------------------------------------------------------------- save_model refuses

def test_save_refuses_the_current_folder_and_keeps_every_file(tmp_path, monkeypatch):
    (tmp_path / "input.csv").write_text("time,x\n0,1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("keep")
    monkeypatch.chdir(tmp_path)
    for path in ("", ".", str(tmp_path), tmp_path / "sub"):
        with pytest.raises((ValueError, FileExistsError), match="empty|refusing"):
            cellmnn.save_model(small_model(0), path)
    assert listing(tmp_path) == ["input.csv", "sub"] and (tmp_path / "sub" / "notes.txt").read_text() == "keep"


def test_save_refuses_files_and_foreign_model_like_folders(tmp_path):
    (tmp_path / "file").write_text("mine")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"format": "something-else"}))
    (foreign / "weights.pt").write_bytes(b"mine")
    for path in (tmp_path / "file", foreign):
        with pytest.raises(FileExistsError, match="refusing"):
            cellmnn.save_model(small_model(0), path)
    assert (tmp_path / "file").read_text() == "mine" and (foreign / "weights.pt").read_bytes() == b"mine"


def test_save_into_new_or_empty_folder_then_replace_own_save(tmp_path):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "new" / "deeper", tmp_path / "empty"):
        cellmnn.save_model(small_model(0), path)
        cellmnn.save_model(small_model(1), path)  # replaces its own save
        assert listing(path) == ["config.json", "weights.pt"]
        assert same_weights(cellmnn.load_model(path), small_model(1))


def test_cli_fit_into_the_current_folder_fails_before_training(data_csv, monkeypatch, capsys):
    import cellmnn.cli

    monkeypatch.chdir(data_csv.parent)
    monkeypatch.setattr(cellmnn.cli, "fit", lambda *a, **k: pytest.fail("trained before checking --out"))
    before = listing(data_csv.parent)
    assert cli_main(["fit", str(data_csv), "--out", ".", *FAST]) == 2
    assert "refusing" in capsys.readouterr().err
    assert listing(data_csv.parent) == before and data_csv.read_text().startswith("time,a,b,c")


# ----------------------------------------------------------------------------- crash safety

CHANGES = ("mkdir", "rename", "replace", "rmdir", "unlink", "fsync", "chmod", "open")


def _crash_at(k):
    """In a forked child: die (no clean-up, like a kill) right before the k-th filesystem call."""
    count = [0]

    def wrap(fn):
        def inner(*args, **kwargs):
            count[0] += 1
            if count[0] == k:
                os._exit(86)
            return fn(*args, **kwargs)
        return inner

    for name in CHANGES:
        setattr(os, name, wrap(getattr(os, name)))


def _in_child(work) -> int:
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            work()
            os._exit(0)
        except BaseException:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_crash_before_every_filesystem_step_leaves_old_or_new(tmp_path):
    """Kill a save right before its 1st, 2nd, ... filesystem call (every step between the renames
    included): the folder loads as the old model until the commit, as the new one after it, and
    the next save finishes or removes what was left."""
    old, new = small_model(0), small_model(1)
    path = tmp_path / "m"
    seen_new, k = False, 1
    while True:
        cellmnn.save_model(old, path)
        code = _in_child(lambda: (_crash_at(k), cellmnn.save_model(new, path)))
        loaded = cellmnn.load_model(path)
        is_new = same_weights(loaded, new)
        assert is_new or same_weights(loaded, old), f"crash before step {k}: neither model"
        assert not (seen_new and not is_new), f"crash before step {k}: old model after the commit point"
        seen_new |= is_new
        if code == 0:
            break
        assert code == 86
        k += 1
    assert seen_new and k > 8  # the save really went through many steps
    cellmnn.save_model(old, path)
    assert listing(path) == ["config.json", "weights.pt"]


def test_killed_at_random_instants_leaves_a_loadable_model(tmp_path):
    """SIGKILL a process that saves two models in turn, at 100 random instants."""
    a, b = small_model(0), small_model(1)
    path = tmp_path / "m"
    rnd = random.Random(0)
    outcomes = set()

    def save_forever():
        for i in range(10 ** 9):
            cellmnn.save_model(b if i % 2 == 0 else a, path)

    for _ in range(100):
        cellmnn.save_model(a, path)
        pid = os.fork()
        if pid == 0:
            try:
                save_forever()
            finally:
                os._exit(0)
        time.sleep(rnd.uniform(0.0, 0.03))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        loaded = cellmnn.load_model(path)
        assert same_weights(loaded, a) or same_weights(loaded, b)
        outcomes.add(len(listing(path)))  # > 2 when killed mid-save
        cellmnn.save_model(a, path)
        assert listing(path) == ["config.json", "weights.pt"]
    assert max(outcomes) > 2  # some kills did land inside a save


def test_loader_prefers_a_committed_save_and_next_save_cleans_up(tmp_path):
    old, new = small_model(0), small_model(1)
    path = tmp_path / "m"
    cellmnn.save_model(old, path)
    cellmnn.save_model(new, tmp_path / "staged")
    os.rename(tmp_path / "staged", path / ".commit")  # as a save killed right after its commit
    (path / ".tmp-dead").mkdir()
    (path / ".tmp-dead" / "weights.pt").write_bytes(b"half")
    assert same_weights(cellmnn.load_model(path), new)
    os.replace(path / ".commit" / "weights.pt", path / "weights.pt")  # killed between the two moves
    assert same_weights(cellmnn.load_model(path), new)
    cellmnn.save_model(old, path)
    assert listing(path) == ["config.json", "weights.pt"] and same_weights(cellmnn.load_model(path), old)


# ----------------------------------------------------------------------------- integrity on load

def test_bit_flipped_weights_and_bad_transform_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    m = cellmnn.load_marginals([rng.normal(size=(20, 2)) + t for t in range(3)], times=[0, 1, 2])
    model = cellmnn.fit(m, max_epochs=1, batch_size=16, verbose=False)
    path = cellmnn.save_model(model, tmp_path / "m")
    w = os.path.join(path, "weights.pt")
    raw = bytearray(open(w, "rb").read())
    raw[len(raw) // 2] ^= 0x01
    open(w, "wb").write(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        cellmnn.load_model(path)
    cellmnn.save_model(model, path)
    cfg = os.path.join(path, "config.json")
    config = json.load(open(cfg))
    config["data"]["transform"]["std"][0] = 0.0
    open(cfg, "w").write(json.dumps(config))
    with pytest.raises(ValueError, match="transform"):
        cellmnn.load_model(path)
    with torch.no_grad():
        model.mlp[0].weight[0, 0] = float("nan")
    cellmnn.save_model(model, path)
    with pytest.raises(ValueError, match="NaN or Inf weights"):
        cellmnn.load_model(path)


def test_version_1_saves_still_load(tmp_path):
    model = small_model(0)
    path = cellmnn.save_model(model, tmp_path / "m")
    cfg = os.path.join(path, "config.json")
    config = json.load(open(cfg))
    config["version"] = 1
    del config["weights_sha256"]
    open(cfg, "w").write(json.dumps(config))
    with pytest.warns(UserWarning, match="without a weights checksum"):
        assert same_weights(cellmnn.load_model(path), model)


# ----------------------------------------------------------------------------- other outputs

def test_outputs_are_checked_before_any_training(data_csv, tmp_path, unwritable, monkeypatch, capsys):
    import cellmnn.evaluate
    import cellmnn.train.fitting

    trained = lambda *a, **k: pytest.fail("trained before checking the outputs")  # noqa: E731
    monkeypatch.setattr(cellmnn.train.fitting, "fit_many", trained)  # what fit and leave_one_out train through
    monkeypatch.setattr(cellmnn.evaluate, "fit_many", trained)
    (tmp_path / "a-folder").mkdir()
    cases = [
        (["fit", str(data_csv), "--out", str(unwritable / "model")], "not writable"),
        (["fit", str(data_csv), "--out", str(data_csv / "model")], "is a file, not a folder"),
        (["fit", str(data_csv), "--out", str(data_csv)], "not a folder"),
        (["evaluate", str(data_csv), "--json", str(tmp_path / "a-folder")], "--json .* is a folder"),
        (["evaluate", str(data_csv), "--json", str(unwritable / "r.json")], "not writable"),
        (["evaluate", str(data_csv), "--json", str(data_csv)], "not a leave-one-out JSON written by cellmnn"),
        (["evaluate", str(data_csv), "--plot", str(tmp_path / "a-folder")], "--plot .* is a folder"),
        (["evaluate", str(data_csv), "--plot", str(data_csv)], "not a cellmnn figure"),
        (["demo", "--plot", str(unwritable / "demo.png")], "not writable"),
    ]
    for argv, message in cases:
        assert cli_main(argv + FAST) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"cellmnn {argv[0]}: error: ") and __import__("re").search(message, err), err
        assert ".tmp-" not in err and ".cellmnn-probe" not in err
    assert data_csv.read_text().startswith("time,a,b,c")


def test_predict_and_interactions_outputs_checked_first_and_own_files_replaced(data_csv, tmp_path, capsys,
                                                                                 monkeypatch):
    model_dir = tmp_path / "model"
    assert cli_main(["fit", str(data_csv), "--out", str(model_dir), *FAST]) == 0
    pred = tmp_path / "pred.csv"
    argv = ["predict", str(model_dir), str(data_csv), "--from-time", "1", "--to-time", "2"]
    assert cli_main(argv + ["--out", str(pred)]) == 0
    assert cli_main(argv + ["--out", str(pred)]) == 0  # replaces its own output
    assert cli_main(argv + ["--out", str(data_csv)]) == 2  # never the input data
    assert "not a predictions CSV written by cellmnn" in capsys.readouterr().err
    assert data_csv.read_text().startswith("time,a,b,c")
    import cellmnn.cli

    monkeypatch.setattr(cellmnn.cli, "gene_interactions", lambda *a, **k: pytest.fail("computed first"))
    (tmp_path / "a-folder").mkdir()
    for extra in (["--out", str(tmp_path / "a-folder")], ["--out", str(pred)],
                  ["--out", str(tmp_path / "w.csv"), "--heatmap", str(tmp_path / "a-folder")]):
        assert cli_main(["interactions", str(model_dir), str(data_csv), "--genes", "a", "b", *extra]) == 2
        assert "error: " in capsys.readouterr().err


def test_figures_and_json_replace_only_their_own_kind(tmp_path):
    from cellmnn.plots import plot_heatmap

    png = tmp_path / "h.png"
    plot_heatmap(np.eye(2), ["a", "b"], png)
    assert cfiles.png_software(str(png)).startswith("cellmnn")
    plot_heatmap(np.eye(2), ["a", "b"], png)  # its own figure: replaced
    foreign = tmp_path / "photo.png"
    foreign.write_bytes(png.read_bytes().replace(b"Software\x00cellmnn", b"Software\x00someone"))
    with pytest.raises(FileExistsError, match="not a cellmnn figure"):
        plot_heatmap(np.eye(2), ["a", "b"], foreign)
    result = cellmnn.LeaveOneOutResult([dict(method="m", holdout=1, time=1.0, seed=0, W1=1.0, MMD=0.1)])
    result.to_json(tmp_path / "r.json")
    result.to_json(tmp_path / "r.json")
    (tmp_path / "other.json").write_text('{"mine": 1}')
    with pytest.raises(FileExistsError, match="refusing"):
        result.to_json(tmp_path / "other.json")
    assert (tmp_path / "other.json").read_text() == '{"mine": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.png", "other.json", "photo.png", "r.json"]


def test_python_dash_m_is_the_command_line(tmp_path):
    (tmp_path / "notes.txt").write_text("keep")
    run = subprocess.run([sys.executable, "-m", "cellmnn", "fit", "emt-a549", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.startswith("cellmnn fit: error: ") and "Traceback" not in run.stderr
    assert subprocess.run([sys.executable, "-m", "cellmnn", "--help"], capture_output=True).returncode == 0
