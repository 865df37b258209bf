"""Scaling: ``inflate`` (the paper's noisy copies) and W1 beyond exact OT (the authors' batched
estimate, sliced W1, subsample), each held to exact W1 (``cellmnn.metrics.wasserstein1``) on small
data; the ``cellmnn inflate`` command writes atomically, refuses foreign files and reads back."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cellmnn
import cellmnn.cli
import cellmnn.metrics as metrics
from cellmnn.cli import main as cli_main
from cellmnn.data.inflate import inflate, proportional_sizes, subsample, write_inflated
from cellmnn.metrics import sliced_wasserstein1, wasserstein1, wasserstein1_batched

SCALES = np.array([1.0, 5.0, 0.2])  # per-coordinate spread: the z-score std is far from 1


def course(sizes=(50, 30, 20), seed=0):
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=(n, 3)) * SCALES + t for t, n in enumerate(sizes)]
    return cellmnn.load_marginals(arrays, times=[0.0, 1.0, 2.5][:len(sizes)])


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


def shifted_gaussians(n, m, seed, D=5, shift=1.0):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, D)), rng.normal(size=(m, D))
    y[:, 0] += shift
    return x, y


# ----------------------------------------------------------------------------- inflate

def test_sizes_are_proportional_and_sum_exactly():
    m = course((7, 5, 3))
    out = inflate(m, 100)
    # quotas 46.67, 33.33, 20: floors 46 + 33 + 20 = 99, the one left goes to the largest remainder
    assert out.sizes == [47, 33, 20] and sum(out.sizes) == 100
    assert inflate(m, 15).sizes == [7, 5, 3]  # the current total: nothing added
    assert inflate(course(), 1000).sizes == [500, 300, 200]


@given(st.lists(st.integers(1, 500), min_size=1, max_size=8), st.integers(0, 10 ** 6))
def test_largest_remainder_property(sizes, extra):
    n_cells = sum(sizes) + extra
    out = proportional_sizes(sizes, n_cells)
    N = sum(sizes)
    assert sum(out) == n_cells
    for n, k in zip(sizes, out):
        assert k >= n and abs(k * N - n_cells * n) < N  # every original kept; within 1 of its quota
    # largest remainders: a timepoint rounded up never has a smaller remainder than one rounded down
    up = [(n_cells * n) % N for n, k in zip(sizes, out) if k * N > n_cells * n]
    down = [(n_cells * n) % N for n, k in zip(sizes, out) if k * N < n_cells * n]
    assert not up or not down or min(up) >= max(down)


def test_originals_are_kept_bit_for_bit_with_the_same_times_and_transform():
    m = course()
    for dtype in (np.float32, np.float64):
        out = inflate(m, 1000, dtype=dtype)
        assert out.transform is m.transform and np.array_equal(out.times, m.times)
        for orig, new in zip(m.data, out.data):
            assert new.dtype == dtype
            assert np.array_equal(bits(new[:len(orig)]), bits(orig.astype(dtype)))
    out64 = inflate(m, 1000, dtype=np.float64)
    assert all(np.array_equal(bits(o), bits(n[:len(o)])) for o, n in zip(m.data, out64.data))  # the input's bits


def test_noise_has_noise_std_in_the_embedding_units():
    """(copy - its original) * z-score std is N(0, noise_std^2) per coordinate.

    Tolerance: the sample std of N iid normals has relative standard error 1/sqrt(2N) and the
    sample mean noise_std/sqrt(N).  Here N = 59,000 copies per coordinate (3 coordinates),
    so 5 standard errors are 1.5% of noise_std for the std and 0.021 noise_std for the mean.
    The float32 rounding of z (about 6e-8 |z| <= 3e-7) is below 1e-4 of the noise in z units.
    """
    m = course()
    std = m.transform.std
    assert np.all(np.abs(std - 1) > 0.2)  # noise added in z units would miss the tolerance below by far
    for dtype in (np.float32, np.float64):
        out, parents = inflate(m, 60_000, noise_std=0.3, seed=1, dtype=dtype, return_parents=True)
        diffs = []
        for orig, new, par in zip(m.data, out.data, parents):
            n = len(orig)
            assert np.array_equal(par[:n], np.arange(n))
            counts = np.bincount(par[n:], minlength=n)
            assert counts.max() - counts.min() <= 1  # every original copied floor or ceil times
            diffs.append((new[n:].astype(np.float64) - orig[par[n:]]) * std)
        d = np.concatenate(diffs)
        N = len(d)
        assert N == 60_000 - 100
        assert np.all(np.abs(d.std(axis=0) / 0.3 - 1) < 5 / math.sqrt(2 * N)), d.std(axis=0)
        assert np.all(np.abs(d.mean(axis=0)) < 5 * 0.3 / math.sqrt(N)), d.mean(axis=0)
    zero = inflate(m, 300, noise_std=0.0, dtype=np.float64, return_parents=True)
    assert all(np.array_equal(z, o[p]) for z, o, p in zip(zero[0].data, m.data, zero[1]))  # exact copies


def test_inflate_is_seeded():
    m = course()
    a, b, c = inflate(m, 500, seed=3), inflate(m, 500, seed=3), inflate(m, 500, seed=4)
    assert all(np.array_equal(bits(u), bits(v)) for u, v in zip(a.data, b.data))
    assert not all(np.array_equal(u, v) for u, v in zip(a.data, c.data))


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((99,), {}, ValueError, r"n_cells=99 is fewer than the 100 cells"),
    ((0,), {}, ValueError, "n_cells must be an integer >= 1"),
    ((250.5,), {}, ValueError, "n_cells must be an integer"),
    ((True,), {}, ValueError, "n_cells must be an integer"),
    (("1000",), {}, ValueError, "n_cells must be an integer"),
    ((1000,), dict(noise_std=-0.1), ValueError, "noise_std must be a finite number >= 0"),
    ((1000,), dict(noise_std=math.nan), ValueError, "noise_std must be a finite number"),
    ((1000,), dict(noise_std="0.1"), TypeError, "noise_std must be a number"),
    ((1000,), dict(seed=-1), ValueError, "seed must be an integer"),
    ((1000,), dict(seed=1.5), ValueError, "seed must be an integer"),
    ((1000,), dict(dtype=np.int32), ValueError, "dtype must be float32 or float64"),
    ((1000,), dict(dtype=None), ValueError, "dtype must be float32 or float64"),
])
def test_inflate_argument_errors_name_the_argument(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        inflate(course(), *args, **kwargs)


def test_inflate_wants_marginals():
    with pytest.raises(TypeError, match="marginals must be a Marginals"):
        inflate([np.zeros((3, 2))], 10)
    bad = course()
    bad.data[1] = bad.data[1].copy()
    bad.data[1][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"marginals.data\[1\] has NaN"):
        inflate(bad, 1000)


# ----------------------------------------------------------------------------- W1 estimators

def test_batched_is_exact_when_a_batch_holds_both_sets():
    x, y = shifted_gaussians(150, 120, seed=0)
    exact = wasserstein1(x, y)
    assert wasserstein1_batched(x, y) == exact
    assert wasserstein1_batched(x, y, batch=150, n_batches=7, seed=5) == exact


def test_batched_is_biased_upward_within_a_stated_band():
    """Shifted Gaussian pair (D = 5, shift 1 along one axis).

    Equal sizes that the batch divides, default n_batches (5): every point is in exactly one
    batch, so the batches' optimal plans, averaged, are a coupling of the full sets and the
    estimate is >= exact W1 for every seed (checked to 1e-12, the float noise of emd2's sums).

    Unequal sizes (1000 vs 600): >= exact W1 only in expectation; checked on the mean over 20
    batch seeds minus 3 of its standard errors.

    Band: on 20 data seeds x 20 batch seeds (this machine, POT 0.9.7) the mean over batch seeds
    was 1.157-1.190 x exact W1 for 1000 vs 1000 and 1.124-1.150 x for 1000 vs 600, single
    estimates never below 1.10 x, and the standard error of a 20-seed mean at most 0.2% of
    exact W1.  The test asserts the mean within [1.10, 1.25] x exact and every estimate within
    [1.0, 1.30] x: margins of about 20 standard errors of the data-seed spread (the bias depends
    on the batch size and dimension, not on a tolerance of the code).
    """
    for n, m in ((1000, 1000), (1000, 600)):
        x, y = shifted_gaussians(n, m, seed=0)
        exact = wasserstein1(x, y)
        est = np.array([wasserstein1_batched(x, y, seed=s) for s in range(20)])
        if n == m:
            assert est.min() >= exact * (1 - 1e-12)
        se = est.std(ddof=1) / math.sqrt(len(est))
        assert est.mean() - 3 * se >= exact
        assert 1.10 <= est.mean() / exact <= 1.25, (n, m, est.mean() / exact)
        assert 1.0 <= est.min() / exact and est.max() / exact <= 1.30


def test_batches_use_every_point_once_per_pass_and_never_twice_in_a_batch():
    rng = np.random.default_rng(0)
    for n, b, k in ((1000, 200, 5), (700, 200, 7), (450, 200, 9), (201, 200, 10)):
        stream = metrics._Batches(n, b, rng)
        batches = [stream.next() for _ in range(k)]
        assert all(len(i) == b and len(np.unique(i)) == b for i in batches)
        used = np.bincount(np.concatenate(batches), minlength=n)
        assert used.max() - used.min() <= 1 + (k * b) // n  # no point waits a pass longer than another
        if (k * b) % n == 0:
            assert (used == k * b // n).all()  # whole passes: every point equally often


def test_batched_default_batches_and_seeding(monkeypatch):
    x, y = shifted_gaussians(500, 450, seed=1)
    calls = []
    monkeypatch.setattr(metrics, "wasserstein1", lambda a, b: calls.append((len(a), len(b))) or
                        wasserstein1(a, b))
    wasserstein1_batched(x, y, batch=200)
    monkeypatch.undo()
    assert calls == [(200, 200)] * 3  # ceil(500 / 200) batches of 200 x 200
    assert wasserstein1_batched(x, y, seed=2) == wasserstein1_batched(x, y, seed=2)
    assert wasserstein1_batched(x, y, seed=2) != wasserstein1_batched(x, y, seed=3)
    small = x[:50]
    assert wasserstein1_batched(small, y, batch=200, n_batches=1, seed=0) > 0  # all of x against 200 of y


def test_sliced_lower_bounds_exact_w1():
    for seed, (n, m, D) in enumerate([(300, 300, 5), (250, 180, 5), (200, 90, 2), (120, 310, 8)]):
        x, y = shifted_gaussians(n, m, seed=seed, D=D, shift=0.7)
        y[:, -1] *= 2.0  # not only a translation
        exact, sliced = wasserstein1(x, y), sliced_wasserstein1(x, y, seed=seed)
        assert 0 < sliced <= exact + 1e-12, (n, m, D, sliced, exact)


def test_sliced_in_one_dimension_is_exact_w1():
    # a translation of dyadic values: every step of the integral is exact, so W1 = |shift| exactly
    x = np.random.default_rng(0).integers(-400, 400, size=(300, 1)) / 8.0
    for shift in (0.75, -3.5, 0.0):
        assert sliced_wasserstein1(x, x + shift, n_projections=64) == abs(shift)
    # unequal sizes by hand: F_x - F_y is 1/2 - 1/3 on [0, 1) and 1 - 2/3 on [1, 2)
    assert sliced_wasserstein1([[0.0], [1.0]], [[0.0], [1.0], [2.0]]) == pytest.approx(0.5, abs=1e-15)
    rng = np.random.default_rng(1)
    for n, m in ((200, 200), (173, 311), (1, 50)):
        a, b = rng.normal(size=(n, 1)), rng.gamma(2.0, size=(m, 1))
        assert sliced_wasserstein1(a, b, n_projections=8) == pytest.approx(wasserstein1(a, b), rel=1e-9, abs=1e-12)


def test_sliced_of_a_translation_in_d_dimensions():
    # the projections of a translation by s are 1-D translations by <theta, s>, so their W1 is |<theta, s>|;
    # over unit directions in D dimensions, mean |theta_1| = Gamma(D/2) / (sqrt(pi) Gamma((D+1)/2))
    x = np.random.default_rng(2).normal(size=(400, 5))
    s = np.array([2.0, 0, 0, 0, 0])
    expected = 2.0 * math.gamma(2.5) / (math.sqrt(math.pi) * math.gamma(3.0))
    # 4096 directions: the std of |theta_1| is about 0.24, so the mean has standard error 0.004 (x 2)
    assert sliced_wasserstein1(x, x + s, n_projections=4096) == pytest.approx(expected, abs=5 * 2 * 0.24 / 64)


def test_subsample():
    x = np.arange(100.0).reshape(50, 2)
    s = subsample(x, 20, seed=1)
    assert s.shape == (20, 2) and len(np.unique(s[:, 0])) == 20 and np.all(np.diff(s[:, 0]) > 0)
    assert np.isin(s[:, 0], x[:, 0]).all()
    assert np.array_equal(s, subsample(x, 20, seed=1)) and not np.array_equal(s, subsample(x, 20, seed=2))
    assert subsample(x, 50) is x and subsample(x, 80) is x


@pytest.mark.parametrize("call,exc,match", [
    (lambda x, y: wasserstein1_batched(x, y, batch=0), ValueError, "batch must be an integer >= 1"),
    (lambda x, y: wasserstein1_batched(x, y, n_batches=0), ValueError, "n_batches must be an integer >= 1"),
    (lambda x, y: wasserstein1_batched(x, y, seed=-2), ValueError, "seed must be an integer"),
    (lambda x, y: wasserstein1_batched(x, y[:, :2]), ValueError, "x and y must have the same dimension"),
    (lambda x, y: wasserstein1_batched(x[:0], y), ValueError, "x must be a non-empty 2-D"),
    (lambda x, y: sliced_wasserstein1(x, y, n_projections=0), ValueError, "n_projections must be an integer >= 1"),
    (lambda x, y: sliced_wasserstein1(x, np.where(y > 1, np.nan, y)), ValueError, "y has .* rows with NaN"),
    (lambda x, y: sliced_wasserstein1(x, [["a", "b", "c"]]), ValueError, "y must be numeric"),
    (lambda x, y: subsample(x, 0), ValueError, "n must be an integer >= 1"),
    (lambda x, y: subsample(x, 5, seed=None), ValueError, "seed must be an integer"),
])
def test_estimator_argument_errors_name_the_argument(call, exc, match):
    x, y = shifted_gaussians(30, 20, seed=0, D=3)
    with pytest.raises(exc, match=match):
        call(x, y)


# ----------------------------------------------------------------------------- command line

@pytest.fixture
def data_csv(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "cells.csv"
    lines = ["time,a,b,c"] + [f"{t},{x[0]},{x[1]},{x[2]}" for t, n in ((0.0, 40), (1.0, 25), (2.0, 35))
                              for x in rng.normal(size=(n, 3)) * SCALES + t]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_inflate_round_trips_through_load_marginals(data_csv, tmp_path, capsys):
    out = tmp_path / "big.npz"
    assert cli_main(["inflate", str(data_csv), "--n-cells", "1000", "--noise-std", "0.2", "--seed", "7",
                     "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    m = cellmnn.load_marginals(str(data_csv))
    expected = inflate(m, 1000, noise_std=0.2, seed=7)
    back = cellmnn.load_marginals(str(out))  # z-scored again, with the inflated cells' own statistics
    assert back.sizes == expected.sizes == [400, 250, 350] and np.array_equal(back.times, m.times)
    raw = cellmnn.load_marginals(str(out), standardize=False)  # pcs: the embedding, z-score undone
    for r, z, orig in zip(raw.data, expected.data, m.data):
        assert np.allclose(m.transform.to_model(r), z, rtol=1e-5, atol=1e-5)
        assert np.allclose(m.transform.to_model(r[:len(orig)]), orig, rtol=1e-5, atol=1e-5)
    with np.load(out) as f:
        assert str(f["format"]) == "cellmnn-inflated" and float(f["noise_std"]) == 0.2 and int(f["seed"]) == 7
        assert f["pcs"].dtype == np.float32 and list(f["feature_names"]) == ["a", "b", "c"]
        assert np.array_equal(f["zscore_std"], m.transform.std) and len(f["parent"]) == 1000
    # its own file is replaced; nothing temporary is left behind
    assert cli_main(["inflate", str(data_csv), "--n-cells", "500", "--out", str(out)]) == 0
    assert sum(cellmnn.load_marginals(str(out)).sizes) == 500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.npz", "cells.csv"]


def test_cli_inflate_refuses_foreign_files_before_any_work(data_csv, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cellmnn.cli, "inflate", lambda *a, **k: pytest.fail("inflated before checking --out"))
    user_npz = tmp_path / "trajectorynet.npz"
    np.savez(user_npz, pcs=np.zeros((4, 2)), sample_labels=np.array([0, 0, 1, 1]))
    before = user_npz.read_bytes()
    (tmp_path / "a-folder.npz").mkdir()
    cases = [
        (str(user_npz), "is not a scaled-up time course (.npz) written by cellmnn; refusing"),
        (str(tmp_path / "a-folder.npz"), "is a folder"),
        (str(data_csv), "--out must name a .npz file"),
        (str(tmp_path / "out.csv"), "--out must name a .npz file"),
    ]
    for target, message in cases:
        # a missing DATA file: the output is refused before the data are even looked at
        assert cli_main(["inflate", str(tmp_path / "missing.csv"), "--n-cells", "1000", "--out", target]) == 2
        err = capsys.readouterr().err
        assert err.startswith("cellmnn inflate: error: ") and message in err, err
    assert user_npz.read_bytes() == before and data_csv.read_text().startswith("time,a,b,c")
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("argv,message", [
    (["--n-cells", "0"], "n_cells must be an integer >= 1"),
    (["--n-cells", "1000", "--noise-std", "-1"], "noise_std must be a finite number >= 0"),
    (["--n-cells", "1000", "--noise-std", "nan"], "noise_std must be a finite number"),
    (["--n-cells", "1000", "--seed", "-3"], "seed must be an integer"),
])
def test_cli_inflate_arguments_are_checked_first(tmp_path, capsys, argv, message):
    out = tmp_path / "x.npz"
    assert cli_main(["inflate", str(tmp_path / "missing.csv"), *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cellmnn inflate: error: ") and message in err, err
    assert not out.exists()


def test_cli_inflate_too_few_cells_writes_nothing(data_csv, tmp_path, capsys):
    out = tmp_path / "x.npz"
    assert cli_main(["inflate", str(data_csv), "--n-cells", "50", "--out", str(out)]) == 2
    assert "n_cells=50 is fewer than the 100 cells" in capsys.readouterr().err
    assert not out.exists()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(data_csv, tmp_path, monkeypatch):
    out = tmp_path / "big.npz"
    m = cellmnn.load_marginals(str(data_csv))
    write_inflated(out, inflate(m, 200))
    before = out.read_bytes()

    def broken(fh, **arrays):
        fh.write(b"PK partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="cannot write .*big.npz: No space left on device"):
        write_inflated(out, inflate(m, 400))
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["big.npz", "cells.csv"]
    with pytest.raises(ValueError, match="path must name a .npz file"):
        write_inflated(tmp_path / "big.csv", m)


# ----------------------------------------------------------------------------- subsampled validation and evaluation

def _blobs(n=40, times=(0.0, 1.0, 2.0, 3.0)):
    rng = np.random.default_rng(0)
    return cellmnn.load_marginals([rng.normal(0.0, 0.3, (n + 5 * k, 2)) + t for k, t in enumerate(times)],
                                  times=list(times))


def test_validation_scores_a_seeded_subsample_and_training_cells_do_not_change():
    import torch

    from cellmnn.train import HParams, Member
    from cellmnn.train.layout import Setup

    m = _blobs(n=100)
    hp = HParams(verbose=False, val_fraction=0.2)
    full = Setup(m, [Member(1, 3, hp)], torch.device("cpu"))
    capped = Setup(m, [Member(1, 3, hp.replace(max_val_cells=7))], torch.device("cpu"))
    assert torch.equal(full.pool, capped.pool)  # the same cells are held back from training
    for i in full.kept[0]:
        assert len(full.val[0][i]) > 7 and len(capped.val[0][i]) == 7
        np.testing.assert_array_equal(capped.val[0][i], full.val[0][i][:7])
    with pytest.raises(ValueError, match="max_val_cells"):
        cellmnn.fit(m, max_val_cells=0)


def test_leave_one_out_scores_large_timepoints_on_a_subsample(monkeypatch):
    import cellmnn.evaluate as ev

    m = _blobs()
    kw = dict(holdouts=[1], seeds=[0], max_epochs=2, check_every=1, verbose=False, report=False, return_models=True)
    small, _ = cellmnn.leave_one_out(m, **kw)
    assert all("W1_cells" not in r for r in small.rows)  # exact on every cell when it fits
    monkeypatch.setattr(ev, "EXACT_MAX", 30)
    res, models = cellmnn.leave_one_out(m, **kw)
    row = next(r for r in res.rows if r["method"] == "Cell-MNN")
    pred = models[(1, 0)].predict(m.data[0].astype(np.float32), 0.0, 1.0)
    obs = m.data[1]
    assert row["W1_cells"] == 30
    assert row["W1"] == pytest.approx(ev.wasserstein1(subsample(pred, 30, 0), subsample(obs, 30, 0)), rel=1e-12)
    assert row["W1_batched"] == pytest.approx(wasserstein1_batched(pred, obs, seed=0), rel=1e-12)
    assert row["W1_sliced"] == pytest.approx(sliced_wasserstein1(pred, obs, seed=0), rel=1e-12)
    assert row["W1_sliced"] <= ev.wasserstein1(pred, obs) + 1e-9  # a lower bound of the exact value
    ot_row = next(r for r in res.rows if r["method"] == "OT-interpolate")
    assert ot_row["W1_cells"] == 30
