"""piecewise_decode: re-linearised decoding against a dense float64 oracle, one cell and one piece at
a time.

Tolerances: float64 paths agree with the oracle to 1e-8 relative (the step op's float64 contract is
1e-9 per step, and up to 25 pieces chain); float32 to 1e-4 (the step op's float32 contract per
piece, with the operator re-evaluated at float32 states), or 8 times what rounding every piece's
operator to float32 moves the oracle, where the path amplifies perturbations.  One piece
(piece_length=None) is the closed form bit for bit.  Noise: chaining the exact Gaussian steps of a
constant linear SDE is the one-step transition, checked by moments of 20,000 draws (standard errors
in the test).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cellmnn_kernels import local_linear_sde_step, local_linear_step, piecewise_decode, sde_covariance
from cellmnn_kernels.ops.piecewise_decode import piece_schedule, piecewise_decode_reference
from cellmnn_kernels.ops.utils import expm_reference
from cellmnn_kernels.testing import assert_rel_close


def mlp_operator(D, seed, dtype, affine=False, scale=0.5):
    """A smooth state- and time-dependent operator (and drift) from a fixed random layer."""
    gen = torch.Generator().manual_seed(seed)
    W = (torch.randn(D + 1, D * D + D, generator=gen) * scale).to(dtype)  # float32 values: one operator for both

    def op(z, u):
        h = torch.tanh(torch.cat([z, u[:, None]], 1) @ W)
        return h[:, :D * D].reshape(-1, D, D), (h[:, D * D:] if affine else None), None
    return op


@st.composite
def offsets(draw):
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    vals = st.sampled_from([0.0, 0.3, 0.7, 1.0, 2.5, -0.4, -1.0, -2.2])
    return torch.tensor([[draw(vals) for _ in range(T)] for _ in range(B)], dtype=torch.float64)


@given(dt=offsets(), D=st.integers(1, 4), h=st.sampled_from([0.1, 0.25, 0.6, 5.0]), affine=st.booleans(),
       seed=st.integers(0, 1000))
def test_pieces_match_the_dense_oracle(dt, D, h, affine, seed):
    op = mlp_operator(D, seed, torch.float64, affine)
    x0 = torch.randn(dt.shape[0], D, generator=torch.Generator().manual_seed(seed)).double()
    X, V, _, _ = piecewise_decode(op, x0, dt, h)
    ref = piecewise_decode_reference(op, x0, dt, h)
    assert_rel_close(X, ref, 1e-8, "X", floor=1e-12, dim=-1)
    X32, _, _, _ = piecewise_decode(mlp_operator(D, seed, torch.float32, affine), x0.float(), dt.float(), h)
    # Where the path itself amplifies perturbations (a growing state re-linearised every piece), float32's
    # rounding of every piece's operator moves the exact answer: allow 8 times that move, measured on the
    # oracle with each piece's inputs and operator rounded to float32.
    moved = (piecewise_decode_reference(rounded_to_float32(op), x0, dt, h) - ref).norm(dim=-1)
    assert_rel_close(X32, ref, 1e-4, "X float32", floor=1e-6 + 8 * moved / 1e-4, dim=-1)


def rounded_to_float32(op):
    """``op`` with its inputs and outputs rounded to float32 (and computed in op's own dtype)."""
    def rounded(z, u):
        A, b, g = op(z.float().to(z.dtype), u.float().to(u.dtype))
        return A.float().to(A.dtype), (None if b is None else b.float().to(b.dtype)), g
    return rounded


def test_one_piece_is_the_closed_form_bit_for_bit():
    op = mlp_operator(3, 1, torch.float32)
    x0 = torch.randn(5, 3)
    dt = torch.tensor([[0.0, 1.0, -0.5]] * 5)
    X, V, first, M = piecewise_decode(op, x0, dt, None)
    X0, V0 = local_linear_step(first[0], x0, dt)
    assert torch.equal(X, X0) and torch.equal(V, V0) and M is None


def test_every_requested_time_is_a_piece_end():
    dt = torch.tensor([[0.0, 0.3, 1.7, 1.7, -0.9], [2.0, 0.1, 0.0, -0.2, 0.05]], dtype=torch.float64)
    for sign in (1, -1):
        sch = piece_schedule(dt, 0.25, sign)
        assert (sch.lengths.abs() <= 0.25 * (1 + 1e-5)).all()
        reached = torch.cumsum(sch.lengths, 0)  # (R, B)
        for b in range(2):
            for t in range(5):
                k = int(sch.knot[b, t])
                if sign * dt[b, t] > 0:
                    assert abs(float(reached[sch.ends[k], b]) - float(dt[b, t])) < 1e-12
                else:
                    assert k == -1


def test_a_constant_operator_is_exact_with_any_pieces():
    D = 3
    A = torch.randn(D, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    b = torch.randn(D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x0 = torch.randn(4, D, dtype=torch.float64)
    dt = torch.tensor([[0.4, 1.3, -0.7]] * 4, dtype=torch.float64)
    op = lambda z, u: (A.expand(len(z), D, D), b.expand(len(z), D), None)  # noqa: E731
    X, _, _, _ = piecewise_decode(op, x0, dt, 0.1)
    # affine closed form: x(t) = e^{tA} (x0 + A^-1 b) - A^-1 b
    c = torch.linalg.solve(A, b)
    want = torch.stack([torch.stack([expm_reference(s * A) @ (x0[i] + c) - c for s in dt[i]])
                        for i in range(4)])
    assert_rel_close(X, want, 1e-10, "X", dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_stiff_operators_stay_finite(dtype):
    """Rates of -300 per unit time over 4 units (||dt A|| = 1200): every piece is exact, nothing blows up."""
    D = 2
    A = torch.tensor([[-300.0, 5.0], [0.0, -0.5]], dtype=dtype)
    op = lambda z, u: (A.expand(len(z), D, D), None, None)  # noqa: E731
    x0 = torch.ones(3, D, dtype=dtype)
    dt = torch.tensor([[1.0, 4.0]] * 3, dtype=dtype)
    X, V, _, _ = piecewise_decode(op, x0, dt, 0.25)
    want = torch.stack([expm_reference(s * A.double()) @ x0[0].double() for s in (1.0, 4.0)])
    assert torch.isfinite(X).all() and torch.isfinite(V).all()
    assert_rel_close(X[0], want, 1e-4 if dtype == torch.float32 else 1e-10, "X", dim=-1)


def test_noisy_pieces_have_the_one_step_distribution():
    """Constant A and g: N pieces of the exact Gaussian step compose to the one-step transition."""
    D, n = 2, 20000
    A = torch.tensor([[-0.8, 1.0], [-1.0, -0.3]], dtype=torch.float64)
    g = torch.tensor([0.5, 0.2], dtype=torch.float64)
    x0 = torch.tensor([[1.0, -0.5]], dtype=torch.float64).expand(n, D)
    dt = torch.full((n, 1), 1.5, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    op = lambda z, u: (A.expand(len(z), D, D), None, g.expand(len(z), D))  # noqa: E731
    X, _, _, _ = piecewise_decode(op, x0, dt, 0.2, noise=lambda i: torch.randn(n, D, generator=gen,
                                                                               dtype=torch.float64))
    mean = local_linear_step(A[None], x0[:1], dt[:1])[0][0, 0]
    S = sde_covariance(A[None], dt[:1], g)[0, 0]
    emp_mean, emp_cov = X[:, 0].mean(0), torch.cov(X[:, 0].T)
    se = (S.diagonal() / n).sqrt()
    assert ((emp_mean - mean).abs() < 5 * se).all()
    # standard error of a covariance entry: sqrt((S_ii S_jj + S_ij^2) / n)
    se_cov = ((S.diagonal()[:, None] * S.diagonal()[None, :] + S ** 2) / n).sqrt()
    assert ((emp_cov - S).abs() < 5 * se_cov).all()


def test_no_noise_pieces_equal_deterministic_pieces():
    op = mlp_operator(2, 4, torch.float64)
    x0 = torch.randn(3, 2, dtype=torch.float64)
    dt = torch.tensor([[1.0, 2.0]] * 3, dtype=torch.float64)
    X, _, _, _ = piecewise_decode(op, x0, dt, 0.3)
    opn = lambda z, u: (*op(z, u)[:2], torch.zeros_like(z))  # noqa: E731
    Xn, _, _, _ = piecewise_decode(opn, x0, dt, 0.3, noise=lambda i: torch.randn(3, 2, dtype=torch.float64))
    assert torch.equal(X, Xn)


def test_gradients_flow_through_every_piece():
    D = 2
    gen = torch.Generator().manual_seed(5)
    W = (torch.randn(D + 1, D * D + D, generator=gen, dtype=torch.float64) * 0.5).requires_grad_()
    x0 = torch.randn(2, D, generator=gen, dtype=torch.float64).requires_grad_()
    dt = torch.tensor([[0.5, 1.2], [1.0, -0.4]], dtype=torch.float64)
    eps = torch.randn(10, 2, D, generator=gen, dtype=torch.float64)

    def f(W, x0):
        def op(z, u):
            h = torch.tanh(torch.cat([z, u[:, None]], 1) @ W)
            return h[:, :D * D].reshape(-1, D, D), None, torch.nn.functional.softplus(h[:, D * D:])
        return piecewise_decode(op, x0, dt, 0.3, noise=lambda i: eps[i])[0]

    assert torch.autograd.gradcheck(f, (W, x0), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("h", [0.0, -1.0, float("nan"), float("inf"), "0.5"])
def test_bad_piece_length(h):
    op = mlp_operator(2, 0, torch.float64)
    with pytest.raises(ValueError, match="piece_length must be a positive finite number"):
        piecewise_decode(op, torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64), h)


def test_sde_step_of_an_affine_system_via_pieces_matches_closed_form_mean_and_covariance():
    """One piece with noise returns the sample and its mean; the mean is the affine closed form."""
    D = 2
    A = torch.tensor([[-1.0, 0.5], [0.0, -0.4]], dtype=torch.float64)
    b = torch.tensor([0.3, -0.2], dtype=torch.float64)
    g = torch.tensor([0.1, 0.4], dtype=torch.float64)
    x0 = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    dt = torch.tensor([[0.7]], dtype=torch.float64)
    eps = torch.tensor([[[0.3, -1.1]]], dtype=torch.float64)
    op = lambda z, u: (A[None], b[None], g[None])  # noqa: E731
    Y, _, _, M = piecewise_decode(op, x0, dt, None, noise=lambda i: eps)
    c = torch.linalg.solve(A, b)
    assert_rel_close(M[0, 0], expm_reference(0.7 * A) @ (x0[0] + c) - c, 1e-12, "mean")
    _, _, Y0 = local_linear_sde_step(A[None], torch.zeros(1, D, dtype=torch.float64), dt, g, eps)
    assert_rel_close(Y - M, Y0, 1e-12, "noise part")
    assert math.isfinite(float(Y.sum())) and np.isfinite(Y.numpy()).all()
