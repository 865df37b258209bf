"""The Cell-MNN workflow: loaders, model, training, evaluation, save/load and the CLI, on small
synthetic data (a few epochs: these tests check behaviour and contracts, not fitted quality)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import cellmnn
from cellmnn.cli import main as cli_main

FAST = dict(max_epochs=3, check_every=1, patience=2, batch_size=32, verbose=False)


def blobs(n=40, times=(0.0, 1.0, 2.5, 4.0), D=2, seed=0):
    """Gaussian blobs drifting linearly in time: one (n, D) array per timepoint."""
    rng = np.random.default_rng(seed)
    drift = np.linspace(1.0, -0.5, D)
    return [rng.normal(0.0, 0.3, (n, D)) + t * drift for t in times], list(times)


def write_csv(path, arrays, times, header, row):
    """A time-course CSV: ``header`` line, then ``row(t, cell)`` for every cell."""
    with open(path, "w") as fh:
        fh.write(header + "\n")
        for a, t in zip(arrays, times):
            for cell in a:
                fh.write(row(t, cell) + "\n")


@pytest.fixture
def marginals():
    arrays, times = blobs()
    return cellmnn.load_marginals(arrays, times=times)


# ----------------------------------------------------------------------------- loaders

def test_arrays_loader_standardizes_and_keeps_the_transform(marginals):
    assert len(marginals) == 4 and marginals.dim == 2 and marginals.sizes == [40] * 4
    pooled = np.concatenate(marginals.data)
    np.testing.assert_allclose(pooled.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(pooled.std(0), 1, atol=1e-12)
    arrays, _ = blobs()
    np.testing.assert_allclose(marginals.transform.to_features(marginals.data[2]), arrays[2], atol=1e-12)
    np.testing.assert_allclose(marginals.transform.to_model(arrays[1]), marginals.data[1], atol=1e-12)


def test_csv_loader_with_uneven_non_integer_times(tmp_path):
    arrays, times = blobs(times=(0.5, 2.0, 2.25, 7.0), D=3)
    path = tmp_path / "cells.csv"
    write_csv(path, arrays, times, "x1,stage,x2,x3", lambda t, c: f"{c[0]},{t},{c[1]},{c[2]}")
    m = cellmnn.load_marginals(str(path), time_key="stage")
    np.testing.assert_array_equal(m.times, [0.5, 2.0, 2.25, 7.0])
    assert m.dim == 3 and m.transform.pca_components is None
    assert m.transform.feature_names == ["x1", "x2", "x3"]
    m2 = cellmnn.load_marginals(str(path), time_key="stage", n_components=2)  # more features: PCA
    assert m2.dim == 2 and m2.transform.pca_components.shape == (2, 3)


def test_h5ad_loader_with_embedding_and_with_pca(tmp_path):
    import anndata

    rng = np.random.default_rng(1)
    X = rng.normal(size=(90, 12)).astype(np.float32)
    ad = anndata.AnnData(X)
    ad.obs["day"] = np.repeat([2.0, 3.0, 7.0], 30)
    ad.obsm["X_pca"] = rng.normal(size=(90, 8))
    path = tmp_path / "cells.h5ad"
    ad.write_h5ad(path)
    m = cellmnn.load_marginals(str(path), embedding="X_pca", n_components=5)
    assert m.dim == 5 and list(m.times) == [2.0, 3.0, 7.0] and m.sizes == [30, 30, 30]
    m = cellmnn.load_marginals(ad, n_components=4)  # obs "day" found by default, PCA of X
    assert m.dim == 4 and m.transform.pca_components.shape == (4, 12)
    z = m.transform.to_model(X[:30])
    np.testing.assert_allclose(z, m.data[0], atol=1e-5)


def test_npz_loader(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "eb.npz"
    np.savez(path, pcs=rng.normal(size=(60, 10)), sample_labels=np.repeat([0, 1, 2, 3, 4], 12))
    m = cellmnn.load_marginals(str(path))
    assert m.dim == 5 and len(m) == 5 and m.sizes == [12] * 5


def test_embedded_default_dataset():
    m = cellmnn.load_marginals()
    assert m.sizes == [577, 885, 788, 754, 129] and m.dim == 3 and list(m.times) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("make,exc,match", [
    (lambda p: cellmnn.load_marginals(str(p / "nope.csv")), FileNotFoundError, "not found"),
    (lambda p: cellmnn.load_marginals(str(p / "a.txt")), ValueError, "expected a .h5ad, .npz or .csv"),
    (lambda p: cellmnn.load_marginals(str(p / "c.csv"), time_key="day"), ValueError, "time key 'day' not found"),
    (lambda p: cellmnn.load_marginals(str(p / "bad.csv")), ValueError, "every column must be numeric"),
    (lambda p: cellmnn.load_marginals([np.ones((3, 2)), np.ones((0, 2))], times=[0, 1]), ValueError, "has no cells"),
    (lambda p: cellmnn.load_marginals([np.ones((3, 2))]), ValueError, "times is required"),
    (lambda p: cellmnn.load_marginals([np.ones((3, 2))], times=[0, 1]), ValueError, "one entry per array"),
    (lambda p: cellmnn.load_marginals(42), TypeError, "source must be"),
    (lambda p: cellmnn.load_marginals(None, n_components=0), ValueError, "n_components"),
    (lambda p: cellmnn.load_marginals([np.ones((3, 2)), np.ones((3, 3))], times=[0, 1]), ValueError, "same number"),
])
def test_loader_errors(tmp_path, make, exc, match):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "c.csv").write_text("time,x1\n0,1\n1,2\n")
    (tmp_path / "bad.csv").write_text("time,x1\n0,abc\n")
    with pytest.raises(exc, match=match):
        make(tmp_path)


def test_anndata_time_key_errors():
    import anndata

    ad = anndata.AnnData(np.ones((4, 3), dtype=np.float32))
    ad.obs["batch"] = ["a", "b", "a", "b"]
    with pytest.raises(ValueError, match="no time column found"):
        cellmnn.load_marginals(ad)
    with pytest.raises(ValueError, match="time key 'when' not found"):
        cellmnn.load_marginals(ad, time_key="when")
    with pytest.raises(ValueError, match="must be numeric"):
        cellmnn.load_marginals(ad, time_key="batch")
    ad.obs["day"] = [0, 0, 1, 1]
    with pytest.raises(ValueError, match="embedding 'X_umap' not found"):
        cellmnn.load_marginals(ad, embedding="X_umap")


def test_nonfinite_rows_are_reported_and_dropped_only_when_asked():
    arrays, times = blobs()
    arrays[1][3, 0] = np.nan
    arrays[2][5, 1] = np.inf
    with pytest.raises(ValueError, match=r"2 rows contain NaN or Inf \(t=1: 1, t=2.5: 1\)"):
        cellmnn.load_marginals(arrays, times=times)
    with pytest.warns(UserWarning, match="dropped 2 rows"):
        m = cellmnn.load_marginals(arrays, times=times, drop_nonfinite=True)
    assert m.sizes == [40, 39, 39, 40] and m.dropped == {1.0: 1, 2.5: 1}
    arrays[3][:] = np.nan
    with pytest.raises(ValueError, match="no cells left"):
        cellmnn.load_marginals(arrays, times=times, drop_nonfinite=True)


# ----------------------------------------------------------------------------- model

def test_eigen_parameterization_has_the_requested_spectrum():
    torch.manual_seed(0)
    model = cellmnn.CellMNN(4, width=16, depth=2, init_scale=1.0, parameterization="eigen", num_const_dims=1)
    x, t = torch.randn(6, 4), torch.rand(6)
    A, penalty = model.operator(x, t, return_penalty=True)
    h = model.mlp(torch.cat([x, t[:, None]], 1))
    P = torch.eye(4) + h[:, :16].view(6, 4, 4)
    lam = torch.cat([h[:, 16:], torch.zeros(6, 1)], 1)
    torch.testing.assert_close(A @ P, P @ torch.diag_embed(lam), rtol=1e-4, atol=1e-4)  # A = P diag(lam) P^-1
    assert penalty.shape == () and penalty > 0
    X, V = model(x, t, t[:, None] + torch.tensor([[0.0, 0.5]]))
    torch.testing.assert_close(X[:, 0], x)  # dt = 0
    torch.testing.assert_close(V, torch.einsum("bij,btj->bti", A, X), rtol=1e-4, atol=1e-5)


def test_model_argument_errors():
    with pytest.raises(ValueError, match="parameterization"):
        cellmnn.CellMNN(3, parameterization="spectral")
    with pytest.raises(ValueError, match="num_const_dims"):
        cellmnn.CellMNN(3, num_const_dims=1)
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        cellmnn.CellMNN(0)


# ----------------------------------------------------------------------------- training

def test_fit_is_seeded_and_makes_one_mmd_call_per_step(marginals, monkeypatch):
    import cellmnn.train.objective as objective

    calls = []
    real = objective.laplace_mmd_loss  # the whole loss in one op
    monkeypatch.setattr(objective, "laplace_mmd_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    m1 = cellmnn.fit(marginals, holdout=1, seed=3, **FAST)
    steps = int(np.ceil(sum(marginals.sizes[i] for i in (0, 2, 3)) / FAST["batch_size"]))
    checks = len([h for h in m1.fit_info.history if h[2] is not None])
    # one per training step (and one check of the untrained model before them), one per validation
    assert len(calls) == 1 + m1.fit_info.epochs * steps + checks
    m2 = cellmnn.fit(marginals, holdout=1, seed=3, **FAST)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    m3 = cellmnn.fit(marginals, holdout=1, seed=4, **FAST)
    assert not all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m3.state_dict().values()))


def test_fit_end_to_end_moves_cells_and_predicts(marginals):
    model = cellmnn.fit(marginals, holdout=2, seed=0, **{**FAST, "max_epochs": 40, "lr": 3e-3, "check_every": 5})
    x0 = marginals.data[1]
    before = cellmnn.wasserstein1(x0, marginals.data[2])
    pred = model.predict(x0.astype(np.float32), marginals.times[1], marginals.times[2])
    assert pred.shape == x0.shape and np.isfinite(pred).all()
    assert cellmnn.wasserstein1(pred, marginals.data[2]) < before  # it learned to move forward
    many = model.predict(x0.astype(np.float32), marginals.times[1], [1.5, 2.5, 3.0])
    assert many.shape == (40, 3, 2)
    np.testing.assert_allclose(many[:, 1], pred, atol=1e-5)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(holdout=0), ValueError, "interior timepoint"),
    (dict(holdout=3), ValueError, "interior timepoint"),
    (dict(holdout=1, max_epochs=0), ValueError, "max_epochs must be a positive integer"),
    (dict(holdout=1, learning_rate=1e-3), TypeError, "unknown hyperparameter"),
    (dict(select_on_holdout=True), ValueError, "needs a holdout"),
    (dict(holdout=1, val_fraction=1.0), ValueError, "val_fraction"),
])
def test_fit_errors(marginals, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cellmnn.fit(marginals, **{**FAST, **kwargs})


def test_leaving_out_needs_three_timepoints():
    arrays, times = blobs(times=(0.0, 1.0))
    m = cellmnn.load_marginals(arrays, times=times)
    with pytest.raises(ValueError, match="at least 3 timepoints"):
        cellmnn.fit(m, holdout=1, **FAST)
    with pytest.raises(ValueError, match="no interior timepoint"):
        cellmnn.leave_one_out(m, **FAST)


@pytest.mark.parametrize("scale", [1e-6, 1e3])
def test_the_unit_of_time_does_not_matter(scale):
    # The same data with every time multiplied by `scale`: the same model (operators per unit of
    # time scaled by 1/scale), so the same predictions.  Float32 training: rounding differences
    # of the time inputs stay at the 1e-5 level over a few epochs.
    arrays, times = blobs(n=60, times=(0.0, 1.0, 2.0, 3.0), D=3)
    preds = []
    for c in (1.0, scale):
        m = cellmnn.load_marginals(arrays, times=[c * t for t in times])
        model = cellmnn.fit(m, holdout=2, seed=0, **{**FAST, "max_epochs": 5, "lr": 3e-3})
        preds.append(model.predict(m.data[1].astype(np.float32), m.times[1], m.times[2]))
        assert model.time_unit == pytest.approx(c)
    assert np.abs(preds[0] - m.data[1]).mean() > 0.05  # the model did move the cells
    np.testing.assert_allclose(preds[1], preds[0], atol=1e-3)


@pytest.mark.parametrize("kinetic", ["kept_times", "future", "grid"])
def test_kinetic_forms_are_what_they_say(marginals, kinetic):
    from cellmnn.train.objective import Course, Objective

    torch.manual_seed(0)
    unit = 1.5
    model = cellmnn.CellMNN(2, width=8, depth=1, init_scale=1.0, time_unit=unit).double()
    times, kept = [0.0, 1.0, 2.5, 4.0], [0, 1, 3]  # timepoint 2 held out
    src = {0: marginals.data[0][:5], 1: marginals.data[1][:4]}
    obs = {1: marginals.data[1][4:10], 3: marginals.data[3][:6]}
    objective = Objective([Course(tuple(kept), (5, 4), (6, 6), 0.1, 1.0, 1.0)], times, 2, kinetic, unit, "torch")
    x0 = torch.tensor(np.concatenate([src[0], src[1]]))
    t0 = torch.tensor([0.0] * 5 + [1.0] * 4, dtype=torch.float64)
    X, V = model(x0, t0, t0[:, None] + torch.as_tensor(objective.offsets(0)))
    loss, mmd = objective(X, V, torch.tensor(np.concatenate([obs[1], obs[3]])))

    def velocity(ts):
        return model(x0, t0, torch.tensor(ts, dtype=torch.float64).expand(9, -1))[1].detach() * unit

    if kinetic == "kept_times":  # every kept time, earlier ones and the cell's own included
        expected = velocity([0.0, 1.0, 4.0]).pow(2).mean()
    elif kinetic == "future":  # later kept times only, summed over coordinates
        V = velocity([1.0, 4.0])
        expected = torch.cat([V[:5, 0], V[:5, 1], V[5:, 1]]).pow(2).sum(-1).mean()
    else:  # steps of 0.1 time units = 0.15 from 0 to 4: 27 points
        expected = velocity([0.15 * k for k in range(27)]).pow(2).mean()
    torch.testing.assert_close((loss - mmd)[0].detach(), expected, rtol=1e-10, atol=1e-12)


def test_inner_selection_never_touches_the_held_out_timepoint(monkeypatch):
    arrays, times = blobs(n=30, times=(0.0, 1.0, 2.0, 3.0, 4.0))
    m = cellmnn.load_marginals(arrays, times=times)
    # The same data with other cells at the held-out timepoint 2 (same transform, so the same model space).
    other = cellmnn.Marginals([d if k != 2 else d[::-1] * 3.0 + 5.0 for k, d in enumerate(m.data)], m.times,
                              m.transform)
    grid = [{"velocity_weight": 0.1, "sigma": 1.0}, {"velocity_weight": 0.0, "sigma": 0.3}]
    import cellmnn.train.fitting as fitting

    calls = []
    real = fitting.train
    monkeypatch.setattr(fitting, "train", lambda marg, members, **k: calls.append(
        [(mem.holdout, mem.exclude) for mem in members]) or real(marg, members, **k))
    models = [cellmnn.fit(data, holdout=2, seed=0, select="inner", select_grid=grid, **FAST) for data in (m, other)]
    # kept timepoints 0, 1, 3, 4: inner holdouts 1 and 3 for each candidate (2 also left out), then the final fit.
    assert calls == [[(1, (2,)), (3, (2,)), (1, (2,)), (3, (2,))], [(2, ())]] * 2
    a, b = (mm.fit_info.selection for mm in models)
    assert a == b and [r["hparams"] for r in a] == grid and set(a[0]["inner_W1"]) == {1, 3}
    for x, y in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        assert torch.equal(x, y)
    best = min(a, key=lambda r: r["mean_W1"])["hparams"]
    assert {k: getattr(models[0].fit_info.hparams, k) for k in best} == best


@pytest.mark.parametrize("kwargs,match", [
    (dict(select="outer"), "select must be None or 'inner'"),
    (dict(select_grid=[{"sigma": 0.3}]), "select_grid is used only with select='inner'"),
    (dict(select="inner", select_grid=[{"learning_rate": 1.0}]), "cannot be selected"),
    (dict(select="inner", select_grid=[{"sigma": -1.0}]), "sigma must be"),
    (dict(select="inner", select_on_holdout=True), "exclude each other"),
])
def test_selection_errors(marginals, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cellmnn.fit(marginals, holdout=1, **{**FAST, **kwargs})


def test_leave_one_out_with_inner_selection_records_the_choice(marginals):
    grid = [{"velocity_weight": 0.1}, {"velocity_weight": 0.0}]
    result = cellmnn.leave_one_out(marginals, seeds=(0,), select="inner", select_grid=grid, report=False, **FAST)
    ours = [r for r in result.rows if r["method"] == "Cell-MNN"]
    assert len(ours) == 2 and all(r["selected"] in grid for r in ours)


def test_inner_selection_needs_an_interior_kept_timepoint():
    arrays, times = blobs(times=(0.0, 1.0, 2.0))
    m = cellmnn.load_marginals(arrays, times=times)
    with pytest.raises(ValueError, match="needs an interior kept timepoint"):
        cellmnn.fit(m, holdout=1, select="inner", **FAST)


def test_select_on_holdout_and_eigen_train(marginals):
    model = cellmnn.fit(marginals, holdout=1, select_on_holdout=True, parameterization="eigen", **FAST)
    assert model.fit_info.hparams.select_on_holdout and np.isfinite(model.fit_info.best_score)


# ----------------------------------------------------------------------------- evaluation

def test_wasserstein1_and_ot_interpolate_exact_cases():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3))
    assert abs(cellmnn.wasserstein1(x, x + np.array([3.0, 4.0, 0.0])) - 5.0) < 1e-9  # a translation
    pts, w = cellmnn.ot_interpolate(x, x + 2.0, 0.25)
    assert abs(w.sum() - 1) < 1e-12
    # The plan is the translation itself; sqrt of squared-distance round-off (1e-16) leaves ~1e-8.
    assert cellmnn.wasserstein1(pts, x + 0.5, w) < 1e-7


def test_leave_one_out_table(marginals):
    result = cellmnn.leave_one_out(marginals, seeds=(0, 1), **FAST)
    assert len(result.rows) == 2 * 2 * 2  # 2 holdouts x 2 seeds x 2 methods
    summary = result.summary()
    assert set(summary) == {"Cell-MNN", "OT-interpolate"}
    assert summary["OT-interpolate"]["W1"][1] == 0.0  # deterministic baseline
    assert "mean over held-out timepoints" in result.format()
    winners = result.winners()  # who wins each held-out timepoint, on the mean W1 over seeds
    assert [w[0] for w in winners] == [1, 2]
    for k, t, ours, ot, win in winners:
        rows = [r for r in result.rows if r["holdout"] == k]
        assert ours == pytest.approx(np.mean([r["W1"] for r in rows if r["method"] == "Cell-MNN"]))
        assert win == ("Cell-MNN" if ours < ot else "OT-interpolate")
        assert f"holdout {k} (t = {t:g})" in result.format()


# ----------------------------------------------------------------------------- save / load

def test_save_load_round_trip_and_atomic_overwrite(marginals, tmp_path):
    model = cellmnn.fit(marginals, holdout=1, **FAST)
    path = cellmnn.save_model(model, tmp_path / "m")
    loaded = cellmnn.load_model(path)
    x0 = marginals.data[0].astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(x0, 0.0, 2.5), model.predict(x0, 0.0, 2.5))
    assert loaded.times == [0.0, 1.0, 2.5, 4.0] and loaded.training_info["holdout"] == 1
    np.testing.assert_allclose(loaded.transform.mean, marginals.transform.mean)
    cellmnn.save_model(loaded, path)  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["m"] and sorted(os.listdir(path)) == ["config.json", "weights.pt"]


def test_corrupt_or_incompatible_models_are_refused(marginals, tmp_path):
    model = cellmnn.fit(marginals, holdout=1, **FAST)
    path = cellmnn.save_model(model, tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="not a saved Cell-MNN model"):
        cellmnn.load_model(tmp_path / "missing")
    cfg = os.path.join(path, "config.json")
    good = open(cfg).read()
    open(cfg, "w").write(good[:40])
    with pytest.raises(ValueError, match="corrupt"):
        cellmnn.load_model(path)
    bad = json.loads(good)
    bad["version"] = 99
    open(cfg, "w").write(json.dumps(bad))
    with pytest.raises(ValueError, match="format version 99"):
        cellmnn.load_model(path)
    bad = json.loads(good)
    bad["model"]["width"] = 7
    open(cfg, "w").write(json.dumps(bad))
    with pytest.raises(ValueError, match="does not fit the model"):
        cellmnn.load_model(path)
    open(cfg, "w").write(good)
    open(os.path.join(path, "weights.pt"), "wb").write(b"not a checkpoint")
    with pytest.raises(ValueError, match="does not match the checksum"):
        cellmnn.load_model(path)


# ----------------------------------------------------------------------------- CLI

def test_cli_cuda_graph_flag(tmp_path, capsys):
    # --cuda-graph asks for graph replays (an error without CUDA, before any training), --no-cuda-graph opts out
    out = tmp_path / "model"
    args = ["fit", "emt-a549", "--holdout", "1", "--out", str(out), "--max-epochs", "1", "--quiet", "--jobs", "1"]
    if not torch.cuda.is_available():
        assert cli_main([*args, "--cuda-graph"]) == 2
        assert "cuda_graph=True needs a CUDA device" in capsys.readouterr().err
        assert not out.exists()
    assert cli_main([*args, "--no-cuda-graph"]) == 0
    assert json.loads((out / "config.json").read_text())["training"]["hparams"]["cuda_graph"] is False


def test_cli_fit_evaluate_predict(tmp_path, capsys):
    arrays, times = blobs(n=30, D=3)
    data = tmp_path / "cells.csv"
    write_csv(data, arrays, times, "time,a,b,c", lambda t, c: f"{t},{c[0]},{c[1]},{c[2]}")
    fast = ["--max-epochs", "2", "--check-every", "1", "--batch-size", "32", "--quiet"]
    assert cli_main(["fit", str(data), "--holdout", "1", "--out", str(tmp_path / "model"), *fast]) == 0
    assert cli_main(["evaluate", str(data), "--seeds", "0", "--json", str(tmp_path / "r.json"),
                     "--plot", str(tmp_path / "r.png"), "--trajectories", str(tmp_path / "paths.png"), *fast]) == 0
    assert (tmp_path / "paths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads((tmp_path / "r.json").read_text())
    assert {r["method"] for r in table["rows"]} == {"Cell-MNN", "OT-interpolate"}
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli_main(["predict", str(tmp_path / "model"), str(data), "--from-time", "1", "--to-time", "2.5", "4",
                     "--out", str(tmp_path / "pred.csv"), "--features"]) == 0
    lines = (tmp_path / "pred.csv").read_text().splitlines()
    assert lines[0] == "cell,from_time,time,a,b,c" and len(lines) == 1 + 2 * 30
    assert cli_main(["fit", str(data), "--holdout", "1", "--seed", "1", "--out", str(tmp_path / "model_b"), *fast]) == 0
    assert cli_main(["predict", str(tmp_path / "model_b"), str(data), "--from-time", "1", "--to-time", "2.5", "4",
                     "--out", str(tmp_path / "pred_b.csv"), "--features"]) == 0
    assert cli_main(["predict", str(tmp_path / "model"), str(data), "--from-time", "1", "--to-time", "2.5", "4",
                     "--out", str(tmp_path / "pred_ab.csv"), "--features",
                     "--ensemble", str(tmp_path / "model_b")]) == 0
    one, two, both = (np.loadtxt(tmp_path / f, delimiter=",", skiprows=1) for f in ("pred.csv", "pred_b.csv",
                                                                                    "pred_ab.csv"))
    assert (tmp_path / "pred_ab.csv").read_text().splitlines()[0] == "cell,from_time,time,a,b,c,spread"
    np.testing.assert_allclose(both[:, 3:6], (one[:, 3:6] + two[:, 3:6]) / 2, rtol=1e-4, atol=1e-4)
    half = np.linalg.norm(one[:, 3:6] - two[:, 3:6], axis=1) / 2  # two members: each is that far from the mean
    np.testing.assert_allclose(both[:, 6], half, rtol=1e-3, atol=1e-4)
    assert cli_main(["predict", str(tmp_path / "model"), str(data), "--from-time", "9", "--to-time", "2",
                     "--out", str(tmp_path / "p2.csv")]) == 2
    assert "not a timepoint" in capsys.readouterr().err
    assert cli_main(["fit", str(data), "--holdout", "0", "--out", str(tmp_path / "m2"), *fast]) == 2
