"""Bad input is a clear error naming the argument, before any long work; nothing is silently wrong:
features are matched by name, arguments of fit/predict/evaluate/interactions are checked, and the
command line reports every failure in one line."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import cellmnn
from cellmnn.cli import main as cli_main

FAST = dict(max_epochs=2, check_every=1, patience=2, batch_size=32, verbose=False)
CLI_FAST = ["--max-epochs", "2", "--check-every", "1", "--batch-size", "32", "--quiet"]


def blobs(n=30, times=(0.0, 1.0, 2.0, 3.0), D=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(0.0, 0.3, (n, D)) + t * np.linspace(1.0, -0.5, D) for t in times], list(times)


@pytest.fixture
def marginals():
    arrays, times = blobs()
    return cellmnn.load_marginals(arrays, times=times)


def write_table(path, header, arrays, times, order):
    """A CSV with columns ``header`` (a time column "time" and genes), rows in gene ``order``."""
    lines = [",".join(header)]
    for a, t in zip(arrays, times):
        for cell in a:
            values = dict(zip(order, cell), time=t)
            lines.append(",".join(str(values[h]) for h in header))
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- features by name

@pytest.fixture
def fitted(tmp_path):
    arrays, times = blobs(D=3)
    write_table(tmp_path / "train.csv", ["time", "GATA1", "SPI1", "CEBPA"], arrays, times, ["GATA1", "SPI1", "CEBPA"])
    assert cli_main(["fit", str(tmp_path / "train.csv"), "--out", str(tmp_path / "model"), *CLI_FAST]) == 0
    return tmp_path, arrays, times


def predict_csv(tmp_path, data, out, *extra):
    code = cli_main(["predict", str(tmp_path / "model"), str(data), "--from-time", "1", "--to-time", "2",
                     "--out", str(tmp_path / out), "--features", *extra])
    return code, (tmp_path / out).read_text() if code == 0 else None


def test_predict_matches_genes_by_name_not_by_column_order(fitted, capsys):
    tmp_path, arrays, times = fitted
    genes = ["GATA1", "SPI1", "CEBPA"]
    write_table(tmp_path / "same.csv", ["time", *genes], arrays, times, genes)
    # The same cells with the columns in another order, and an extra gene the model never saw.
    shuffled = [np.concatenate([a, np.ones((len(a), 1))], axis=1) for a in arrays]
    write_table(tmp_path / "shuffled.csv", ["CEBPA", "EXTRA", "time", "GATA1", "SPI1"], shuffled, times,
                [*genes, "EXTRA"])
    code, same = predict_csv(tmp_path, tmp_path / "same.csv", "a.csv")
    assert code == 0
    code, other = predict_csv(tmp_path, tmp_path / "shuffled.csv", "b.csv")
    assert code == 0 and other == same and same.splitlines()[0] == "cell,from_time,time,GATA1,SPI1,CEBPA"
    # Gene interactions read the same genes from either file.
    for name, data in (("w1.csv", "same.csv"), ("w2.csv", "shuffled.csv")):
        assert cli_main(["interactions", str(tmp_path / "model"), str(tmp_path / data), "--pairs", "GATA1:SPI1",
                         "CEBPA:GATA1", "--out", str(tmp_path / name)]) == 0
    assert (tmp_path / "w1.csv").read_text() == (tmp_path / "w2.csv").read_text()
    # Other genes: a clear error naming the missing ones, not the first columns.
    write_table(tmp_path / "other.csv", ["time", "GATA1", "MYC", "FOS"], arrays, times, ["GATA1", "MYC", "FOS"])
    assert predict_csv(tmp_path, tmp_path / "other.csv", "c.csv")[0] == 2
    err = capsys.readouterr().err
    assert "SPI1" in err and "CEBPA" in err and "missing" in err


def test_predict_without_names_checks_the_count(fitted, capsys):
    tmp_path, arrays, times = fitted
    np.savez(tmp_path / "three.npz", pcs=np.concatenate(arrays), sample_labels=np.repeat(times, len(arrays[0])))
    np.savez(tmp_path / "four.npz", pcs=np.concatenate([np.c_[a, a[:, :1]] for a in arrays]),
             sample_labels=np.repeat(times, len(arrays[0])))
    assert predict_csv(tmp_path, tmp_path / "three.npz", "a.csv")[0] == 0
    assert predict_csv(tmp_path, tmp_path / "four.npz", "b.csv")[0] == 2
    err = capsys.readouterr().err
    assert "4 features" in err and "fitted on 3" in err and "names" in err


def test_interactions_refuse_data_mapped_by_another_transform(marginals):
    model = cellmnn.fit(marginals, **FAST)
    arrays, times = blobs(seed=5)
    other = cellmnn.load_marginals(arrays, times=times)  # its own z-scoring
    with pytest.raises(ValueError, match="another transform"):
        cellmnn.gene_interactions(model, other, genes=["x1", "x2"])
    assert cellmnn.gene_interactions(model, marginals, genes=["x1", "x2"]).values.shape == (4, 4)


# ----------------------------------------------------------------------------- fit arguments

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(velocity_weight=-0.1), ValueError, r"velocity_weight must be a finite number in \[0, inf\)"),
    (dict(lr="fast"), TypeError, "lr must be a number"),
    (dict(lr=0.0), ValueError, "lr must be"),
    (dict(gamma=math.nan), ValueError, "gamma must be a finite number"),
    (dict(init_scale=math.nan), ValueError, "init_scale must be a finite number"),
    (dict(sigma=0.0), ValueError, "sigma must be"),
    (dict(max_epochs=math.inf), ValueError, "max_epochs must be a positive integer"),
    (dict(batch_size=2.5), ValueError, "batch_size must be a positive integer"),
    (dict(val_fraction=0.99), ValueError, "val_fraction=0.99 leaves no training cell"),
    (dict(val_fraction=-0.1), ValueError, "val_fraction must be"),
    (dict(batch_size=2), ValueError, "batch_size must be at least the number of source timepoints"),
    (dict(device="gpu"), ValueError, "device must be"),
    (dict(device="cuda:7"), ValueError, "device="),
    (dict(backend="fast"), ValueError, "backend must be one of"),
    (dict(verbose="yes"), TypeError, "verbose must be True or False"),
    (dict(seed=-1), ValueError, "seed must be an integer"),
    (dict(seed=1.5), ValueError, "seed must be an integer"),
    (dict(seed=None), ValueError, "seed must be an integer"),
])
def test_fit_argument_errors_name_the_argument(kwargs, exc, match):
    arrays, times = blobs(n=20)
    m = cellmnn.load_marginals(arrays, times=times)
    with pytest.raises(exc, match=match):
        cellmnn.fit(m, **{**FAST, "max_epochs": 1, "batch_size": 16, **kwargs})


def test_fit_wants_marginals_not_a_list():
    arrays, _ = blobs()
    with pytest.raises(TypeError, match=r"Marginals from cellmnn.load_marginals.*times="):
        cellmnn.fit(arrays, **FAST)


def test_divergence_is_reported_as_divergence(marginals):
    with pytest.raises(FloatingPointError, match=r"training diverged at epoch \d+ .*smaller lr \(now 1e\+06\)"):
        cellmnn.fit(marginals, **{**FAST, "lr": 1e6, "max_epochs": 20})


def test_leave_one_out_refuses_repeated_holdouts_and_seeds(marginals):
    with pytest.raises(ValueError, match=r"holdouts repeats \[1\]"):
        cellmnn.leave_one_out(marginals, holdouts=[1, 1], seeds=[0], **FAST)
    with pytest.raises(ValueError, match=r"seeds repeats \[0\]"):
        cellmnn.leave_one_out(marginals, holdouts=[1], seeds=[0, 0], **FAST)
    with pytest.raises(ValueError, match="velocity_weight"):  # checked before the first fit
        cellmnn.leave_one_out(marginals, seeds=[0], velocity_weight=-1, **FAST)


# ----------------------------------------------------------------------------- predict arguments

@pytest.mark.parametrize("x0,t0,t,exc,match", [
    (np.array([[0.0, np.nan, 0.0], [0.0, 0.0, 0.0]]), 0.0, 1.0, ValueError, r"x0 has 1 cell\(s\) with NaN"),
    (np.zeros((2, 3)), math.nan, 1.0, ValueError, "t0 has NaN"),
    (np.zeros((2, 3)), 0.0, [1.0, math.inf], ValueError, "t has NaN or Inf"),
    (np.zeros((2, 3)), [0.0, 1.0, 2.0], 1.0, ValueError, r"t0 must be a number or have one time per cell \(2\)"),
    (np.zeros((2, 3)), 0.0, "1.0", TypeError, "t must be a number"),
    (np.zeros((2, 3)), "zero", 1.0, TypeError, "t0 must be a number"),
    (np.array([["a", "b", "c"]]), 0.0, 1.0, TypeError, "x0 must be a numeric array"),
    (np.zeros((2, 4)), 0.0, 1.0, ValueError, r"x0 must have shape \(n, 3\)"),
])
def test_predict_argument_errors(x0, t0, t, exc, match):
    model = cellmnn.CellMNN(3, width=8, depth=1)
    with pytest.raises(exc, match=match):
        model.predict(x0, t0, t)


# ----------------------------------------------------------------------------- interactions

def test_interaction_arguments_are_checked(marginals):
    model = cellmnn.fit(marginals, **FAST)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        cellmnn.gene_interactions(model, marginals, genes=["x1", "x2"], batch_size=-1)
    with pytest.raises(ValueError, match="models is empty"):
        cellmnn.trrust_validation([], marginals, [("x1", "x2", "Activation")])


def test_tfs_are_whole_names_not_substrings():
    rng = np.random.default_rng(0)
    m = cellmnn.load_marginals([rng.normal(size=(20, 3)) for _ in range(2)], times=[0, 1], n_components=None)
    m.transform.feature_names = ["MYC", "MYCN", "T"]
    model = cellmnn.CellMNN(3, width=8, depth=1)
    rows = [("MYC", "T", "Activation"), ("MYCN", "T", "Repression")]
    report = cellmnn.trrust_validation(model, m, rows, tfs="MYCN")
    assert [(e["tf"], e["target"]) for e in report.edges] == [("MYCN", "T")]


@pytest.mark.parametrize("rows,match", [
    ([("A", "A", "Activation"), ("B", "B", "Repression")], "2 are self-edges"),
    ([("A", "B", "Activation"), ("A", "B", "Repression")], r"1 pair\(s\) are listed as both Activation and Repression"),
    ([("A", "Z", "Activation")], r"1 name a gene not in the data \(e.g. \['Z'\]\)"),
    ([("A", "B", "Unknown")], "1 have mode Unknown"),
])
def test_trrust_tables_with_nothing_to_score_say_why(rows, match):
    rng = np.random.default_rng(0)
    m = cellmnn.load_marginals([rng.normal(size=(20, 2)) for _ in range(2)], times=[0, 1], n_components=None)
    m.transform.feature_names = ["A", "B"]
    with pytest.raises(ValueError, match=match):
        cellmnn.trrust_validation(cellmnn.CellMNN(2, width=8, depth=1), m, rows)


def test_cli_tfs_and_ensemble_need_trrust(fitted, capsys):
    tmp_path, _, _ = fitted
    for extra in (["--tfs", "GATA1"], ["--ensemble", str(tmp_path / "model")]):
        assert cli_main(["interactions", str(tmp_path / "model"), str(tmp_path / "train.csv"), "--genes", "GATA1",
                         "SPI1", "--out", str(tmp_path / "w.csv"), *extra]) == 2
        assert "only with --trrust" in capsys.readouterr().err
    assert not (tmp_path / "w.csv").exists()


# ----------------------------------------------------------------------------- command line

def test_cli_reports_every_failure_in_one_line(fitted, capsys, monkeypatch):
    tmp_path, _, _ = fitted
    data = str(tmp_path / "train.csv")
    (tmp_path / "a-folder.csv").mkdir()
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "broken.h5ad").write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    (tmp_path / "latin1.csv").write_bytes("time,g\u00e8ne\n0,1\n1,2\n".encode("latin-1"))
    cases = [
        (["fit", str(tmp_path / "a-folder.csv"), "--out", str(tmp_path / "m1")], "is a directory"),
        (["fit", str(tmp_path / "broken.npz"), "--out", str(tmp_path / "m1")], "is not a valid .npz file"),
        (["fit", str(tmp_path / "broken.h5ad"), "--out", str(tmp_path / "m1")], "cannot read"),
        (["fit", str(tmp_path / "latin1.csv"), "--out", str(tmp_path / "m1")], "is not UTF-8 text"),
        (["fit", data, "--out", str(tmp_path / "m2"), "--device", "gpu"], "device must be"),
        (["fit", data, "--out", str(tmp_path / "m3"), "--lr", "1e6", "--max-epochs", "20"], "training diverged"),
        (["fit", data, "--out", str(tmp_path / "m4"), "--velocity-weight", "-1"], "velocity_weight"),
        (["evaluate", data, "--holdouts", "1", "1"], "holdouts repeats"),
        (["predict", str(tmp_path / "model"), data, "--from-time", "1", "--to-time", "nan",
          "--out", str(tmp_path / "p.csv")], "t has NaN"),
    ]
    for argv, message in cases:
        code = cli_main(argv + (CLI_FAST if argv[0] in ("fit", "evaluate") else []))
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"cellmnn {argv[0]}: error: ") and message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    # Something unexpected is still one line, with the exception's type and how to see more.
    import cellmnn.cli

    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cellmnn.cli, "cmd_fit", broken)
    assert cli_main(["fit", data, "--out", str(tmp_path / "m5")]) == 1
    err = capsys.readouterr().err
    assert err == "cellmnn fit: error: boom (RuntimeError; set CELLMNN_TRACEBACK=1 to see where)\n"


# ----------------------------------------------------------------------------- errors name the real cause

def _emptied(m, k):
    """``m`` with timepoint ``k`` holding no cells (as a filtered AnnData can leave it)."""
    return cellmnn.Marginals([d if i != k else d[:0] for i, d in enumerate(m.data)], m.times, m.transform)


@pytest.mark.parametrize("call,match", [
    (lambda m: cellmnn.fit(_emptied(m, 2), **FAST), r"marginals: timepoint 2 \(t = 2\) has no cells"),
    (lambda m: cellmnn.fit([m, _emptied(m, 1)], **FAST), r"marginals\[1\]: timepoint 1 \(t = 1\) has no cells"),
    (lambda m: cellmnn.leave_one_out(_emptied(m, 0), report=False, **FAST), r"timepoint 0 \(t = 0\) has no cells"),
    (lambda m: cellmnn.fit([], **FAST), r"marginals is an empty list"),
    (lambda m: cellmnn.fit([m, []], **FAST), r"marginals\[1\] must be a Marginals .* got list"),
    (lambda m: cellmnn.leave_one_out(m, holdouts=[], report=False, **FAST), r"holdouts is empty; name interior"),
    (lambda m: cellmnn.fit(cellmnn.Marginals(m.data, m.times[::-1], m.transform), **FAST), "strictly ascending"),
])
def test_each_check_names_the_cause_that_holds(marginals, call, match):
    # Checks that can fire for several reasons say which one holds (not "val_fraction leaves no
    # training cell", "must be a Marginals" for a valid list, or "no interior timepoint").
    with pytest.raises((ValueError, TypeError), match=match):
        call(marginals)


def test_load_joint_matches_genes_by_name_in_any_order(tmp_path):
    arrays, times = blobs(D=3)
    genes = ["GATA1", "SPI1", "CEBPA"]
    write_table(tmp_path / "a.csv", ["time", *genes], arrays, times, genes)
    write_table(tmp_path / "b.csv", ["time", "CEBPA", "GATA1", "SPI1"], arrays, times, genes)  # same cells
    a, b = cellmnn.load_joint([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")])
    for x, y in zip(a.data, b.data):
        np.testing.assert_allclose(x, y, rtol=1e-12)  # the same cells, however the columns were ordered
    write_table(tmp_path / "c.csv", ["time", "GATA1", "SPI1", "MPO"], arrays, times, ["GATA1", "SPI1", "MPO"])
    with pytest.raises(ValueError, match=r"sources\[1\] has other features .*\['CEBPA'\].*\['MPO'\]"):
        cellmnn.load_joint([str(tmp_path / "a.csv"), str(tmp_path / "c.csv")])


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage", b"PK\x03\x04truncated"])
def test_resume_with_a_damaged_checkpoint_names_the_file(fitted, capsys, content):
    tmp_path, _, _ = fitted
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(content)
    for flag in ("--resume", "--out"):
        assert cli_main(["fit", str(tmp_path / "train.csv"), flag, str(run), *CLI_FAST]) == 2
        err = capsys.readouterr().err
        assert f"{flag} {run}: {run / 'checkpoint.pt'} is not a usable training checkpoint" in err, err
    assert (run / "checkpoint.pt").read_bytes() == content  # never touched


def test_a_failed_fit_checks_flags_first_and_leaves_no_folder(fitted, capsys):
    tmp_path, _, _ = fitted
    for flags in (["--seed", "-3"], ["--lr", "-1"], ["--select", "inner", "--select-on-holdout"]):
        out = tmp_path / "new-model"
        assert cli_main(["fit", str(tmp_path / "train.csv"), "--out", str(out), *flags, *CLI_FAST]) == 2
        assert not out.exists(), flags
        assert capsys.readouterr().err.count("\n") == 1
    out = tmp_path / "diverges"  # fails after the folder was made: the empty folder is removed again
    assert cli_main(["fit", str(tmp_path / "train.csv"), "--out", str(out), "--lr", "1e30", *CLI_FAST]) == 2
    assert "diverged" in capsys.readouterr().err and not out.exists()


def test_load_model_checks_device_and_config_sections(fitted):
    tmp_path, _, _ = fitted
    import json

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda', but CUDA is not available"):
            cellmnn.load_model(tmp_path / "model", device="cuda")
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda'"):
        cellmnn.load_model(tmp_path / "model", device="tpu")
    cfg = tmp_path / "model" / "config.json"
    config = json.loads(cfg.read_text())
    for section in ("data", "training"):
        cfg.write_text(json.dumps(dict(config, **{section: "oops"})))
        with pytest.raises(ValueError, match=rf"config.json has an invalid {section} section"):
            cellmnn.load_model(tmp_path / "model")


def test_trrust_input_errors_name_the_file_or_row(tmp_path, marginals):
    (tmp_path / "bin.tsv").write_bytes(bytes(range(128, 256)))
    with pytest.raises(ValueError, match=r"bin.tsv is not a text file .* give a TRRUST TSV"):
        cellmnn.read_trrust(tmp_path / "bin.tsv")
    model = cellmnn.CellMNN(3, width=8, depth=1)
    with pytest.raises(ValueError, match=r"trrust\[1\] must be a \(TF, target, mode\) triple"):
        cellmnn.trrust_validation(model, marginals, [("a", "b", "Activation"), ("a", "b")])


def test_inflate_checks_memory_before_allocating(marginals):
    with pytest.raises(ValueError, match=r"n_cells=1,000,000,000,000 needs about [\d,.]+ GiB .* available here"):
        cellmnn.inflate(marginals, 10 ** 12)
