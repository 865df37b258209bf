"""Data-parallel training (torchrun, gloo, 2 CPU processes) and checkpoint/resume.

Tolerance for 2 processes vs 1: the ranks sum partial weight gradients (each over its half of
the batch) where one process sums them in one matrix product, so the float32 gradients differ
in rounding (~1e-7 relative) and AdamW carries that forward.  Over the 4 epochs trained here
(~60 steps) the weights stay within 1e-5 relative (measured ~2e-8; a 1-ulp change of one initial
weight in a single process moves them just as much).  Resume is bit-identical: the sampler is
counter-based and the checkpoint holds every piece of state.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import cellmnn
import cellmnn.files as cfiles
import cellmnn.model.persist as persist
from cellmnn.cli import main
from cellmnn.train import HParams, Member, train

FLAGS = ["--holdout", "1", "--max-epochs", "4", "--check-every", "2", "--backend", "torch", "--quiet"]
HP = dict(holdout=1, max_epochs=4, check_every=2, backend="torch", verbose=False)


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _rel(a, b) -> float:
    return float((a - b).norm() / a.norm())


def _torchrun(args, cwd, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def emt():
    return cellmnn.load_marginals()


@pytest.mark.parametrize("extra,hp", [
    ([], {}),
    (["--parameterization", "eigen", "--batch-size", "201", "--kinetic", "future"],  # uneven split: 100 + 101
     dict(parameterization="eigen", batch_size=201, kinetic="future")),
])
def test_torchrun_fit_equals_one_process(tmp_path, emt, extra, hp):
    out = tmp_path / "model"
    r = _torchrun(["-m", "cellmnn", "fit", "emt-a549", *FLAGS, *extra, "--out", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trained on") == 1  # rank 0 alone reports and writes
    assert sorted(os.listdir(out)) == ["config.json", "weights.pt"]  # no checkpoint left, nothing else
    ddp = persist.load_model(out)
    one = cellmnn.fit(emt, **HP, **hp)
    assert _rel(_flat(one), _flat(ddp)) < 1e-5
    import json

    assert json.loads((out / "config.json").read_text())["training"]["epochs"] == one.fit_info.epochs == 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_node_rehearsal_equals_one_process(tmp_path, emt):
    """Two torchrun launchers, as on two machines (--nnodes 2, one process each), meeting by a c10d
    rendezvous on the loopback address: the model is one process's (tolerance as above)."""
    out = tmp_path / "model"
    rdzv = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{_free_port()}",
            "--rdzv_id=cellmnn-rehearsal"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *rdzv, "-m", "cellmnn", "fit", "emt-a549", *FLAGS,
           "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [err[-2000:] for _, err in results]
    assert sum(o.count("trained on") for o, _ in results) == 1  # the global rank 0 alone reports and writes
    one = cellmnn.fit(emt, **HP)
    assert _rel(_flat(one), _flat(persist.load_model(out))) < 1e-5


SCRIPT = """
import sys, torch, torch.distributed as dist
import cellmnn
dist.init_process_group("gloo")
m = cellmnn.load_marginals()
models = cellmnn.fit(m, seeds=[0, 1], holdout=2, max_epochs=3, check_every=1, backend="torch", verbose=False)
flat = torch.stack([torch.cat([p.detach().flatten() for p in mod.parameters()]) for mod in models])
losses = torch.tensor([[h[1] for h in mod.fit_info.history] for mod in models], dtype=torch.float64)
torch.save({"flat": flat, "loss": losses}, sys.argv[1] + f"/rank{dist.get_rank()}.pt")
dist.destroy_process_group()
"""


def test_torchrun_python_api_ensemble(tmp_path, emt):
    """fit(seeds=[0, 1]) called by both ranks of a process group: both ranks end with the same
    weights and training losses, equal to one process's (each rank's loss is its MMD sums plus
    half of the rest, added up over the ranks)."""
    (tmp_path / "run.py").write_text(SCRIPT)
    r = _torchrun([str(tmp_path / "run.py"), str(tmp_path)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(r0["flat"], r1["flat"]) and torch.equal(r0["loss"], r1["loss"])
    one = cellmnn.fit(emt, seeds=[0, 1], holdout=2, max_epochs=3, check_every=1, backend="torch", verbose=False)
    for e in range(2):
        assert _rel(_flat(one[e]), r0["flat"][e]) < 1e-5
        assert _rel(torch.tensor([h[1] for h in one[e].fit_info.history], dtype=torch.float64), r0["loss"][e]) < 1e-5


def _interrupt_after(monkeypatch, k):
    """Make the k-th checkpoint write the last thing a run does (as if the process were killed)."""
    real, n = cfiles.save_checkpoint, [0]

    def save(state, path):
        real(state, path)
        n[0] += 1
        if n[0] == k:
            raise KeyboardInterrupt

    monkeypatch.setattr(cfiles, "save_checkpoint", save)
    return n


def test_resume_is_identical_to_uninterrupted(tmp_path, emt, monkeypatch):
    # Two members that stop at different epochs: the kill comes after the first has left.
    kw = dict(holdout=2, seeds=[0, 1], check_every=1, max_epochs=6, backend="torch", verbose=False)
    ref = cellmnn.fit(emt, **kw)
    ck = tmp_path / "run.ckpt"
    with monkeypatch.context() as mp:
        n = _interrupt_after(mp, 4)
        with pytest.raises(KeyboardInterrupt):
            cellmnn.fit(emt, checkpoint=ck, **kw)
        assert n[0] == 4
    state = cfiles.load_checkpoint(ck)
    assert not state["done"] and state["n"] > 0
    resumed = cellmnn.fit(emt, checkpoint=ck, **kw)
    for a, b in zip(ref, resumed):
        assert torch.equal(_flat(a), _flat(b))
        assert a.fit_info.history == b.fit_info.history
        assert (a.fit_info.best_epoch, a.fit_info.best_score) == (b.fit_info.best_epoch, b.fit_info.best_score)
    assert cfiles.load_checkpoint(ck)["done"]
    again = cellmnn.fit(emt, checkpoint=ck, **kw)  # a finished checkpoint returns the same models, untrained
    assert all(torch.equal(_flat(a), _flat(b)) for a, b in zip(ref, again))


def test_resume_after_early_stop_compaction(tmp_path, emt, monkeypatch):
    kw = dict(check_every=1, backend="torch", verbose=False)
    members = [Member(2, 0, HParams(**kw, max_epochs=2)), Member(2, 1, HParams(**kw, max_epochs=5))]
    ref = train(emt, members)
    ck = tmp_path / "c.ckpt"
    with monkeypatch.context() as mp:
        _interrupt_after(mp, 3)  # after epoch 3: member 0 left at epoch 2
        with pytest.raises(KeyboardInterrupt):
            train(emt, members, checkpoint=ck)
    assert cfiles.load_checkpoint(ck)["runner"]["active"] == [1]
    resumed = train(emt, members, checkpoint=ck)
    assert all(torch.equal(_flat(a), _flat(b)) for a, b in zip(ref, resumed))


def test_cli_kill_and_resume(tmp_path, emt):
    """A real SIGKILL while `cellmnn fit` trains, then `--resume`: the saved model equals an
    uninterrupted run's, bit for bit."""
    out = tmp_path / "model"
    flags = ["--holdout", "1", "--max-epochs", "40", "--check-every", "1", "--backend", "torch", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "cellmnn", "fit", "emt-a549", *flags, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    ckpt = out / cfiles.CHECKPOINT
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (out / "config.json").exists(), "the run finished before it could be killed"
    epochs_done = cfiles.load_checkpoint(ckpt)["infos"][0]["epochs"]
    assert 0 < epochs_done < 40

    assert main(["fit", "emt-a549", *flags, "--out", str(out)]) == 2  # --out refuses to start over a checkpoint
    assert main(["fit", "emt-a549", *flags, "--resume", str(out)]) == 0
    assert not ckpt.exists()
    ref = cellmnn.fit(emt, holdout=1, max_epochs=40, check_every=1, backend="torch", verbose=False)
    assert torch.equal(_flat(ref), _flat(persist.load_model(out)))


def test_torchrun_resumes_a_checkpoint(tmp_path, emt, monkeypatch):
    """A checkpoint written by one process, continued by two: equal to one uninterrupted process."""
    out = tmp_path / "model"
    out.mkdir()
    ck = out / cfiles.CHECKPOINT
    with monkeypatch.context() as mp:
        _interrupt_after(mp, 1)
        with pytest.raises(KeyboardInterrupt):
            cellmnn.fit(emt, checkpoint=ck, **HP)
    r = _torchrun(["-m", "cellmnn", "fit", "emt-a549", *FLAGS, "--resume", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _rel(_flat(cellmnn.fit(emt, **HP)), _flat(persist.load_model(out))) < 1e-5


def test_checkpoint_errors(tmp_path, emt, capsys):
    foreign = tmp_path / "notes.ckpt"
    foreign.write_text("mine")
    with pytest.raises(FileExistsError, match="not a cellmnn training checkpoint"):
        cellmnn.fit(emt, checkpoint=foreign, **HP)
    assert foreign.read_text() == "mine"
    ck = tmp_path / "a.ckpt"
    cellmnn.fit(emt, checkpoint=ck, **dict(HP, max_epochs=2))
    with pytest.raises(ValueError, match="lr differ"):
        cellmnn.fit(emt, checkpoint=ck, lr=1e-3, **dict(HP, max_epochs=2))
    cellmnn.fit(emt, checkpoint=ck, cuda_graph=False, **dict(HP, max_epochs=2))  # how it runs: free on resume
    with pytest.raises(ValueError, match="other data"):
        sub = cellmnn.load_marginals([d[:50] for d in emt.data], times=emt.times)
        cellmnn.fit(sub, checkpoint=ck, **dict(HP, max_epochs=2))
    with pytest.raises(ValueError, match="select='inner'"):
        cellmnn.fit(emt, checkpoint=tmp_path / "b.ckpt", select="inner", **HP)
    assert main(["fit", "emt-a549", *FLAGS, "--resume", str(tmp_path / "none")]) == 2
    assert "no training checkpoint" in capsys.readouterr().err


def test_only_fit_and_evaluate_run_under_torchrun(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["inflate", "emt-a549", "--n-cells", "5000", "--out", str(tmp_path / "x.npz")]) == 2
    assert "only fit and evaluate run data-parallel" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_model_folder_with_a_checkpoint_is_ours(tmp_path):
    """A folder holding only a checkpoint (a killed run) is a model destination of ours; with a
    foreign file beside it, it is not."""
    d = tmp_path / "m"
    d.mkdir()
    cfiles.save_checkpoint({"n": np.int64(1).item()}, d / cfiles.CHECKPOINT)
    persist.check_model_destination(d)
    (d / "other.txt").write_text("x")
    with pytest.raises(FileExistsError):
        persist.check_model_destination(d)


def test_torchrun_evaluate_writes_once_and_matches_one_process(tmp_path, emt):
    import json

    out = tmp_path / "loo.json"
    r = _torchrun(["-m", "cellmnn", "evaluate", "emt-a549", "--holdouts", "1", "--seeds", "0", "1", "--max-epochs", "2",
                   "--check-every", "1", "--backend", "torch", "--quiet", "--json", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count(f"wrote {out}") == 1
    rows = [row for row in json.loads(out.read_text())["rows"] if row["method"] == "Cell-MNN"]
    one = cellmnn.leave_one_out(emt, holdouts=[1], seeds=[0, 1], max_epochs=2, check_every=1, backend="torch",
                                verbose=False, report=False)
    want = [row for row in one.rows if row["method"] == "Cell-MNN"]
    assert [row["W1"] for row in rows] == pytest.approx([row["W1"] for row in want], rel=1e-4)


def test_torchrun_with_a_bad_flag_reports_it_on_every_rank_and_leaves_no_folder(tmp_path):
    # Every rank checks the flags before any rank touches the output folder: each reports the real
    # error (not a race about the folder), and no empty folder is left behind.
    out = tmp_path / "model"
    r = _torchrun(["-m", "cellmnn", "fit", "emt-a549", *FLAGS, "--seed", "-3", "--out", str(out)], tmp_path)
    assert r.returncode != 0
    # torchrun stops the other rank as soon as one exits, so a rank may be stopped before it reports;
    # whatever is reported must be the real error, once per line.
    errors = [line for line in r.stderr.splitlines() if "error:" in line and "cellmnn" in line]
    assert 1 <= len(errors) <= 2, r.stderr
    assert all(e == "cellmnn fit: error: seed must be an integer in [0, 2**63), got -3" for e in errors), r.stderr
    assert not out.exists()
