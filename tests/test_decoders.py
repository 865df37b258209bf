"""The model's decoder options (affine drift, learned diffusion, re-linearised pieces): what each
computes, that the defaults are the closed-form decoder bit for bit, that models saved without the
options load and predict exactly as before, sampling and the closed-form predictive distribution,
training that stays finite with stiff dynamics, and errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import cellmnn
from cellmnn_kernels import local_linear_step, sde_covariance

FAST = dict(max_epochs=3, check_every=1, patience=2, batch_size=32, verbose=False)


@pytest.fixture
def marginals():
    rng = np.random.default_rng(0)
    times = [0.0, 1.0, 2.0, 3.0]
    arrays = [rng.normal(0.0, 0.3, (40, 2)) + t * np.array([1.0, -0.5]) for t in times]
    return cellmnn.load_marginals(arrays, times=times)


def test_default_decoder_is_the_closed_form_bit_for_bit():
    torch.manual_seed(0)
    model = cellmnn.CellMNN(3, width=16, depth=2, init_scale=1.0, time_unit=2.0)
    x0, t0 = torch.randn(7, 3), torch.rand(7)
    t = t0[:, None] + torch.tensor([[-1.0, 0.0, 0.5, 3.0]])
    X, V = model(x0, t0, t)
    X0, V0 = local_linear_step(model.operator(x0, t0), x0, (t - t0[:, None]))
    assert torch.equal(X, X0) and torch.equal(V, V0)


@pytest.mark.parametrize("kw", [dict(), dict(affine=True), dict(affine=True, piece_length=0.5)],
                         ids=["paper", "affine", "pieces"])
def test_forward_with_the_first_operator_given_and_a_projection(kw):
    """forward(first=, project=) (what perturb decodes through): the first piece's operator passed in
    and an identity projection change nothing, bit for bit; a projection P holds P's null space
    still (a clamped coordinate keeps its value along the whole path)."""
    torch.manual_seed(2)
    model = cellmnn.CellMNN(3, width=16, depth=2, init_scale=1.0, **kw).double()
    x0, t0 = torch.randn(6, 3, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
    t = t0[:, None] + torch.tensor([[0.5, 1.5]], dtype=torch.float64)
    X, V = model(x0, t0, t)
    Xg, Vg = model(x0, t0, t, first=model.outputs(x0, t0)[:3], project=torch.eye(3, dtype=torch.float64))
    assert torch.equal(X, Xg) and torch.equal(V, Vg)
    P = torch.diag(torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))  # the first coordinate held
    Xp, _ = model(x0, t0, t, project=P)
    torch.testing.assert_close(Xp[..., 0], x0[:, None, 0].expand(6, 2), rtol=0, atol=1e-12)
    assert not torch.allclose(Xp[..., 1:], X[..., 1:])


def test_models_saved_without_decoder_options_load_and_predict_as_before(marginals, tmp_path):
    model = cellmnn.fit(marginals, seed=0, **FAST)
    path = str(tmp_path / "m")
    cellmnn.save_model(model, path)
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    for key in ("affine", "noise", "piece_length", "rate_bound"):
        del cfg["model"][key]  # a config written before the options existed
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh)
    old = cellmnn.load_model(path)
    x = marginals.data[0].astype(np.float32)
    assert not old.stochastic and old.decoder.piece_length is None and not old.decoder.affine
    np.testing.assert_array_equal(old.predict(x, 0.0, [1.0, 2.0]), model.predict(x, 0.0, [1.0, 2.0]))


def test_affine_drift_relaxes_to_its_own_fixed_point():
    """Outputs that make A = -I and b = c: every cell decays to c, not to the origin (b is bounded as
    r tanh(out / r), r = rate_bound = 10: the output for b = c is 10 atanh(c / 10))."""
    model = cellmnn.CellMNN(2, width=4, depth=1, affine=True).double()
    last = model.mlp[-1]
    out_b = [10 * np.arctanh(v / 10) for v in (2.0, -3.0)]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([-1.0, 0.0, 0.0, -1.0, *out_b], dtype=torch.float64))
    x = torch.randn(5, 2, dtype=torch.float64)
    out = model.predict(x, 0.0, [1.0, 30.0])
    c = torch.tensor([2.0, -3.0], dtype=torch.float64)
    np.testing.assert_allclose(out[:, 1], c.expand(5, 2).numpy(), atol=1e-10)
    want = np.exp(-1.0) * (x - c) + c
    np.testing.assert_allclose(out[:, 0], want.numpy(), rtol=1e-10)


def noisy_model(**kw):
    torch.manual_seed(1)
    return cellmnn.CellMNN(2, width=8, depth=1, init_scale=0.5, noise="state", **kw).double()


def test_samples_are_seeded_and_have_the_closed_form_distribution():
    model = noisy_model(affine=True)
    x = np.array([[0.5, -0.2]])
    a, b = model.predict(x, 0.0, 1.5, seed=3), model.predict(x, 0.0, 1.5, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, model.predict(x, 0.0, 1.5, seed=4))
    n = 4000
    draws = model.predict(np.repeat(x, n, 0), 0.0, 1.5, seed=0)  # one cell, n independent draws
    mean, cov = model.predict_distribution(x, 0.0, 1.5)
    assert mean.shape == (1, 2) and cov.shape == (1, 2, 2)
    se = np.sqrt(np.diag(cov[0]) / n)
    assert (np.abs(draws.mean(0) - mean[0]) < 5 * se).all()
    se_cov = np.sqrt((np.outer(np.diag(cov[0]), np.diag(cov[0])) + cov[0] ** 2) / n)
    assert (np.abs(np.cov(draws.T) - cov[0]) < 5 * se_cov).all()
    # the covariance is the op's, from the model's own A and g at the cell
    A, _, g, _ = model.outputs(torch.tensor(x), torch.zeros(1, dtype=torch.float64))
    S = sde_covariance(A, torch.tensor([[1.5]], dtype=torch.float64), g)[0, 0].detach().numpy()
    np.testing.assert_allclose(cov[0], S, rtol=1e-12)


def test_n_samples_shapes_and_the_deterministic_case():
    model = noisy_model()
    x = np.zeros((3, 2))
    assert model.predict(x, 0.0, [1.0, 2.0], n_samples=5).shape == (5, 3, 2, 2)
    assert model.predict(x, 0.0, 1.0, n_samples=2).shape == (2, 3, 2)
    det = cellmnn.CellMNN(2, width=8, depth=1)
    s = det.predict(x, 0.0, 1.0, n_samples=2)
    np.testing.assert_array_equal(s[0], s[1])
    mean, cov = det.predict_distribution(x, 0.0, [1.0])
    assert mean.shape == (3, 1, 2) and not cov.any()


def test_the_noise_free_path_is_the_mean_and_is_drawn_with_its_spread(tmp_path):
    from cellmnn.files import png_software
    from cellmnn.plots import plot_trajectories

    model = noisy_model(affine=True)
    x = np.array([[0.5, -0.2], [-1.0, 0.3]])
    mean, _ = model.predict_distribution(x, 0.0, [0.5, 1.5])
    np.testing.assert_allclose(model.predict(x, 0.0, [0.5, 1.5], noise=False), mean, rtol=1e-12, atol=1e-12)
    assert model.predict(x, 0.0, 1.5, noise=False, n_samples=3).shape == (3, 2, 2)
    pieces = noisy_model(piece_length=0.5)
    a, b = pieces.predict(x, 0.0, 1.7, noise=False, seed=1), pieces.predict(x, 0.0, 1.7, noise=False, seed=2)
    np.testing.assert_array_equal(a, b)  # no noise drawn
    with pytest.raises(TypeError, match="noise must be True or False"):
        model.predict(x, 0.0, 1.0, noise="off")
    m = cellmnn.load_marginals([np.random.default_rng(k).normal(size=(30, 2)) + k for k in range(3)],
                               times=[0.0, 1.0, 2.0], n_components=None)
    for name, models in (("one.png", pieces), ("two.png", [model.float(), cellmnn.CellMNN(2, width=8, depth=1)])):
        plot_trajectories(m, models, tmp_path / name, n_paths=5, steps=4)
        assert png_software(str(tmp_path / name)).startswith("cellmnn")


def test_pieces_have_no_closed_form_distribution():
    model = noisy_model(piece_length=0.5)
    with pytest.raises(ValueError, match="predict_distribution needs the single-piece decoder"):
        model.predict_distribution(np.zeros((1, 2)), 0.0, 1.0)
    assert np.isfinite(model.predict(np.zeros((2, 2)), 0.0, [0.5, 1.7])).all()


@pytest.mark.parametrize("kw", [dict(noise="state"), dict(affine=True), dict(piece_length=0.5),
                                dict(noise="state", affine=True, piece_length=0.5)])
def test_fit_save_load_round_trip_with_decoder_options(marginals, tmp_path, kw):
    model = cellmnn.fit(marginals, seed=0, **FAST, **kw)
    for key, v in kw.items():
        assert model.config()[key] == v
    path = str(tmp_path / "m")
    cellmnn.save_model(model, path)
    again = cellmnn.load_model(path)
    x = marginals.data[0].astype(np.float32)
    np.testing.assert_array_equal(again.predict(x, 0.0, [1.0, 2.5]), model.predict(x, 0.0, [1.0, 2.5]))


def test_training_with_pieces_stays_finite_on_stiff_dynamics():
    """Populations turning 40 radians per unit of time between close timepoints, every option on and
    ten times the default learning rate: the bounded rates, drift and noise keep every step finite
    and the loss goes down."""
    rng = np.random.default_rng(2)
    times = [0.0, 0.05, 0.1, 0.15]
    arrays = [rng.normal(0.0, 0.2, (40, 2)) + np.array([np.cos(40 * t), np.sin(40 * t)]) * 3 for t in times]
    m = cellmnn.load_marginals(arrays, times=times)
    model = cellmnn.fit(m, seed=0, **{**FAST, "max_epochs": 10, "patience": 10}, lr=2e-3, piece_length=0.25,
                        noise="state", affine=True)
    losses = [h[1] for h in model.fit_info.history]
    assert len(losses) == 10 and np.isfinite(losses).all() and losses[-1] < losses[0]
    assert np.isfinite(model.predict(m.data[0], 0.0, [0.05, 0.15])).all()


@pytest.mark.parametrize("kw, exc, match", [
    (dict(noise="gaussian"), ValueError, "noise must be one of"),
    (dict(piece_length=0), ValueError, "piece_length must be a positive finite number"),
    (dict(piece_length=float("nan")), ValueError, "piece_length must be a positive finite number"),
    (dict(piece_length="0.5"), ValueError, "piece_length must be a positive finite number"),
    (dict(rate_bound=-1.0), ValueError, "rate_bound must be a positive finite number"),
    (dict(affine="yes"), (TypeError, ValueError), "affine"),
])
def test_bad_decoder_options(marginals, kw, exc, match):
    with pytest.raises(exc, match=match):
        cellmnn.CellMNN(2, **kw)
    with pytest.raises(exc, match=match):
        cellmnn.fit(marginals, **FAST, **kw)


def test_n_samples_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="n_samples"):
        noisy_model().predict(np.zeros((1, 2)), 0.0, 1.0, n_samples=0)
