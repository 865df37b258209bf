"""local_linear_step: the torch and triton backends against a float64 matrix-exponential oracle.

Tolerances (the accuracy contract of docs/engine.md), per (cell, time) pair with ||dt A||_1 <= 30:
    ||X - X_ref|| <= RTOL * (||X_ref|| + 1e-6 ||x0||)
    ||V - V_ref|| <= RTOL * (||V_ref|| + 1e-6 ||A||_1 ||x0||)      (V = A X has the scale ||A|| ||X||)
RTOL = 1e-4 in float32: unit roundoff 6e-8, about 30 anchor steps of some ten roundings each, and
the growth of rounding errors with non-normal operators stay well below it.  RTOL = 1e-9 in
float64 (roundoff 1.1e-16) by the same count.  Gradients are compared as relative Frobenius
errors over the batch: 1e-3 (float32) and 1e-7 (float64).  The oracle is always evaluated in
float64 on the very inputs the backend saw (upcast), so input rounding is not counted.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmnn_kernels import local_linear_step
from cellmnn_kernels.ops.local_linear_step import local_linear_step_reference, resolve_backend
from cellmnn_kernels.ops.local_linear_step.common import NU_MAX
from cellmnn_kernels.ops.utils import HAS_TRITON, expm_reference
from cellmnn_kernels.testing import DEVICE, KINDS, backend_param, scaled_examples
from cellmnn_kernels.testing import build_inputs as _build_inputs

if HAS_TRITON:
    import triton
    import triton.language as tl

    from cellmnn_kernels.ops.local_linear_step.triton_jit import _pair_slot, _pairs, _unpark
    from cellmnn_kernels.ops.local_linear_step.triton_reg import (_anchor_states, _levels, _load_cell, _scratch_base,
                                                                  _step_matrices)

    @triton.jit
    def _anchor_states_kernel(A_ptr, x0_ptr, dt_ptr, S_ptr, Yf_ptr, Yb_ptr, B, T, LS,
                              sAb, sAi, sAj, sxb, sxd, stb, stt, theta, nu_max,
                              D: tl.constexpr, BB: tl.constexpr, BT: tl.constexpr, M: tl.constexpr):
        """Yf (B, T, D): each pair's anchor state as the register forward forms it (its helpers, in
        its order); Yb: the state that a register backward launch left in the pair's slot of its
        scratch S (the slot found by the backward's own helper)."""
        cell, cm, Z, x0, nrm, finite, h, inv_h = _load_cell(A_ptr, x0_ptr, B, sAb, sAi, sAj, sxb, sxd, theta, D, BB)
        hi_pos, hi_neg = _levels(dt_ptr, cell, cm, T, stb, stt, nrm, finite, theta, nu_max, BT)
        Ep, En = _step_matrices(Z, hi_pos, hi_neg, D, M)
        sbase = _scratch_base(S_ptr, LS, D, BB)
        for t0 in range(0, T, BT):
            inr, ok, neg, lev, rho = _pairs(dt_ptr, cell, cm, t0, T, stb, stt, nrm, finite, inv_h, theta, nu_max, BT)
            Y = _anchor_states(Ep, En, x0, ok, neg, lev, hi_pos > 0, hi_neg > 0, D, BT)
            for k in tl.static_range(BT):
                okk, r, slot = _pair_slot(dt_ptr, cell, inr[k], t0 + k, stb, stt, nrm, finite, theta, nu_max, inv_h,
                                          LS)
                yb = _unpark(sbase + slot * (D * BB), D, BB, inr[k])
                off = (cell * T + t0 + k) * D
                for i in tl.static_range(D):
                    tl.store(Yf_ptr + off + i, Y[k * D + i], mask=inr[k])
                    tl.store(Yb_ptr + off + i, yb[i], mask=inr[k])

RTOL = {torch.float32: 1e-4, torch.float64: 1e-9}
GRAD_RTOL = {torch.float32: 1e-3, torch.float64: 1e-7}
DTYPES = [torch.float32, torch.float64]
BACKENDS = [backend_param("torch"), backend_param("triton")]


def build_inputs(*args, **kwargs):
    kwargs.setdefault("device", DEVICE)
    return _build_inputs(*args, **kwargs)


@st.composite
def cases(draw, max_B=4, max_T=6, max_D=8, max_nu=30.0):
    return dict(seed=draw(st.integers(0, 2**32 - 1)), B=draw(st.integers(1, max_B)),
                T=draw(st.integers(1, max_T)), D=draw(st.integers(1, max_D)),
                kind=draw(st.sampled_from(KINDS)), nu=draw(st.floats(0.0, max_nu)),
                sign=draw(st.sampled_from(["pos", "neg", "mixed"])),
                layout=draw(st.sampled_from(["contiguous", "strided"])))


# ----------------------------------------------------------------------------- checks

def oracle(A, x0, dt):
    return local_linear_step_reference(A.double(), x0.double(), dt.double())


def assert_pairs_close(X, V, A, x0, dt, rtol):
    Xr, Vr = oracle(A, x0, dt)
    nx0 = x0.double().norm(dim=-1)[:, None]
    nA = A.double().abs().sum(dim=1).amax(dim=1)[:, None]
    for name, Y, Yr, floor in (("X", X, Xr, nx0), ("V", V, Vr, nA * nx0)):
        assert Y.shape == Yr.shape and Y.dtype == A.dtype and Y.device == A.device
        err = (Y.double() - Yr).norm(dim=-1)
        # + tiny: a value below the dtype's smallest normal number has only absolute accuracy.
        tol = rtol * (Yr.norm(dim=-1) + 1e-6 * floor) + torch.finfo(A.dtype).tiny
        if not (err <= tol).all():
            worst = (err / tol).nan_to_num(float("inf")).max().item()
            pytest.fail(f"{name}: worst error is {worst:.3g} x the tolerance")


def grads(backend, A, x0, dt, gX, gV):
    A, x0, dt = (t.detach().clone().requires_grad_() for t in (A, x0, dt))
    X, V = local_linear_step(A, x0, dt, backend=backend)
    torch.autograd.backward([X, V], [gX.to(X.dtype), gV.to(X.dtype)])
    return A.grad, x0.grad, dt.grad


def assert_grads_close(backend, A, x0, dt, rtol, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (*dt.shape, x0.shape[1])
    gX = torch.randn(shape, generator=g, dtype=torch.float64).to(A.device)
    gV = torch.randn(shape, generator=g, dtype=torch.float64).to(A.device)
    got = grads(backend, A, x0, dt, gX, gV)
    ref = grads("reference", A.double(), x0.double(), dt.double(), gX, gV)
    # ddt[b,k] = gX.V + gV.(A V) can cancel: its float32 rounding scales with the sum of the
    # absolute values of those products, which is added to the scale of the dt comparison.
    _, V = oracle(A, x0, dt)
    absA = A.double().abs()
    cond_dt = (gX.abs() * V.abs()).sum(-1) + (gV.abs() * torch.einsum("bij,btj->bti", absA, V.abs())).sum(-1)
    extra = {"A": 0.0, "x0": 0.0, "dt": cond_dt.norm().item()}
    for name, a, b in zip(("A", "x0", "dt"), got, ref):
        assert a.dtype == A.dtype
        scale = b.norm().item() + extra[name]
        err = (a.double() - b).norm().item()
        assert err <= rtol * max(scale, 1e-30), f"d{name}: relative error {err / max(scale, 1e-30):.3g}"


# ----------------------------------------------------------------------------- property tests

@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases())
def test_forward_matches_oracle(backend, dtype, case):
    A, x0, dt = build_inputs(dtype=dtype, **case)
    X, V = local_linear_step(A, x0, dt, backend=backend)
    assert_pairs_close(X, V, A, x0, dt, RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=scaled_examples(15))
@given(case=cases(max_B=3, max_T=4, max_D=6, max_nu=8.0))
def test_gradients_match_oracle(backend, dtype, case):
    A, x0, dt = build_inputs(dtype=dtype, **case)
    assert_grads_close(backend, A, x0, dt, GRAD_RTOL[dtype], seed=case["seed"] % 1000)


@pytest.mark.parametrize("backend", [backend_param("triton")])
@settings(max_examples=scaled_examples(6))
@given(case=cases(max_B=3, max_T=4, max_D=16, max_nu=12.0))
def test_lane_group_gradients_match_oracle(backend, case):
    # float32 5 < D <= 16 takes the lane-group kernels (triton_group.py) forward and backward.
    case["D"] = max(case["D"], 6)
    A, x0, dt = build_inputs(dtype=torch.float32, **case)
    X, V = local_linear_step(A, x0, dt, backend=backend)
    assert_pairs_close(X, V, A, x0, dt, RTOL[torch.float32])
    assert_grads_close(backend, A, x0, dt, GRAD_RTOL[torch.float32], seed=case["seed"] % 1000)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["decaying", "nonnormal", "growing"])
def test_gradients_at_the_edge_of_the_contract(backend, dtype, kind):
    # ||dt A||_1 = 30: 30 (float32) or 60 (float64) anchors, more than the backward kernel's
    # 16 checkpoints, so anchor states are recomputed between checkpoints.
    A, x0, dt = build_inputs(7, 2, 3, 4, kind, 30.0, "mixed", dtype)
    assert_grads_close(backend, A, x0, dt, GRAD_RTOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    A, x0, dt = build_inputs(3, 2, 3, 3, "random", 2.5, "mixed", torch.float64)
    inputs = tuple(t.detach().clone().requires_grad_() for t in (A, x0, dt))
    fn = lambda a, x, d: local_linear_step(a, x, d, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D,T,B", [(33, 3, 2), (64, 2, 1), (16, 9, 3), (6, 2, 9), (3, 20, 40)])
def test_large_d_and_many_blocks(backend, D, T, B):
    # Non-power-of-two and maximal D; several time blocks and cell blocks per launch (lane-group
    # kernels: at D = 16 three forward time blocks and two backward cell blocks, the second
    # partly masked; at D = 6 two cell blocks forward and backward).  On the torch backend D = 3,
    # 6 and 16 take the broadcast Horner (torch_impl.LANES_MAX_D), 33 and 64 the batched GEMMs.
    A, x0, dt = build_inputs(11, B, T, D, "random", 3.0, "mixed", torch.float32)
    X, V = local_linear_step(A, x0, dt, backend=backend)
    assert_pairs_close(X, V, A, x0, dt, RTOL[torch.float32])
    assert_grads_close(backend, A, x0, dt, GRAD_RTOL[torch.float32])


# ----------------------------------------------------------------------------- exact cases

@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_time_and_zero_operator_return_x0(backend, dtype):
    A, x0, dt = build_inputs(1, 3, 4, 5, "random", 4.0, "pos", dtype)
    dt[:, 1] = 0.0
    X, V = local_linear_step(A, x0, dt, backend=backend)
    assert torch.equal(X[:, 1], x0)
    torch.testing.assert_close(V[:, 1], torch.einsum("bij,bj->bi", A, x0), rtol=RTOL[dtype], atol=0)
    X, V = local_linear_step(torch.zeros_like(A), x0, dt, backend=backend)
    assert torch.equal(X, x0[:, None, :].expand_as(X))
    assert torch.equal(V, torch.zeros_like(V))


def test_the_oracles_exponential_is_exact_where_matrix_exp_is_not():
    """expm_reference against closed forms across 1-norms 1e-4 .. 30, including 0.01 - 0.06 where
    torch.linalg.matrix_exp's degree-8 branch is off (pytorch issue 196592): a rotation (cos, sin) and
    the affine block [[a, b], [0, 0]] (exp(a) and b (exp(a) - 1) / a); float64 to 8 roundings of the
    largest entry (8.9e-16), 1e-14 above norm 4, where up to 6 squarings compound them."""
    for t in np.geomspace(1e-4, 30, 41):
        rot = torch.tensor([[0.0, -t], [t, 0.0]], dtype=torch.float64)
        want = torch.tensor([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]], dtype=torch.float64)
        aff = torch.tensor([[-0.7 * t, 0.4 * t], [0.0, 0.0]], dtype=torch.float64)
        a, b = -0.7 * t, 0.4 * t
        want_aff = torch.tensor([[np.exp(a), b * np.expm1(a) / a], [0.0, 1.0]], dtype=torch.float64)
        tol = 8 * 2.0**-53 if t < 4 else 1e-14
        for M, W in ((rot, want), (aff, want_aff)):
            got = expm_reference(M[None])[0]
            assert float((got - W).abs().max()) <= tol * float(W.abs().max()), (t, got, W)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_scalar_and_diagonal_operators_are_elementwise_exponentials(backend, dtype):
    # Oracle independent of matrix_exp: exp of each diagonal entry.
    rng = np.random.default_rng(5)
    for D in (1, 6):
        lam = rng.uniform(-20.0, 3.0, (4, D))
        dt = rng.uniform(-1.0, 1.5, (4, 3))
        x0 = rng.standard_normal((4, D))
        want_X = np.exp(dt[:, :, None] * lam[:, None, :]) * x0[:, None, :]
        want_V = lam[:, None, :] * want_X
        A = torch.diag_embed(torch.tensor(lam, dtype=dtype, device=DEVICE))
        X, V = local_linear_step(A, torch.tensor(x0, dtype=dtype, device=DEVICE),
                                 torch.tensor(dt, dtype=dtype, device=DEVICE), backend=backend)
        rtol = RTOL[dtype]
        np.testing.assert_allclose(X.double().cpu().numpy(), want_X, rtol=rtol, atol=rtol * 1e-6)
        np.testing.assert_allclose(V.double().cpu().numpy(), want_V, rtol=rtol, atol=rtol * 1e-6 * 20)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rotation_is_cos_sin(backend, dtype):
    w = torch.tensor([0.5, 3.0, 7.0], dtype=torch.float64)
    A = torch.zeros(3, 2, 2, dtype=torch.float64)
    A[:, 0, 1], A[:, 1, 0] = -w, w
    x0 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]], dtype=torch.float64)
    dt = torch.tensor([[0.0, 0.7, -2.0, 4.0]] * 3, dtype=torch.float64)
    c, s = torch.cos(w[:, None] * dt), torch.sin(w[:, None] * dt)
    want = torch.stack([c * x0[:, :1] - s * x0[:, 1:], s * x0[:, :1] + c * x0[:, 1:]], dim=-1)
    X, _ = local_linear_step(A.to(DEVICE, dtype), x0.to(DEVICE, dtype), dt.to(DEVICE, dtype), backend=backend)
    torch.testing.assert_close(X.double(), want.to(X.device), rtol=RTOL[dtype], atol=RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_strongly_decaying_operators(backend, dtype):
    # Eigenvalues down to -30 at dt = 1: X is e^-30 ~ 1e-13 times x0, still to full relative accuracy.
    D = 4
    lam = torch.tensor([[-30.0] * D, [-30.0, -10.0, -1.0, -0.1]], dtype=dtype)
    A = torch.diag_embed(lam)
    A[1] += torch.triu(torch.ones(D, D, dtype=dtype), 1)  # non-normal coupling
    x0 = torch.ones(2, D, dtype=dtype)
    dt = torch.tensor([[1.0, 0.5], [0.9, 0.3]], dtype=dtype)
    X, V = local_linear_step(A.to(DEVICE), x0.to(DEVICE), dt.to(DEVICE), backend=backend)
    assert_pairs_close(X, V, A.to(DEVICE), x0.to(DEVICE), dt.to(DEVICE), RTOL[dtype])


# ----------------------------------------------------------------------------- beyond the contract

@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nu", [100.0, 400.0])
def test_beyond_the_contract_is_finite_where_the_truth_is(backend, dtype, nu):
    A, x0, dt = build_inputs(2, 2, 3, 3, "decaying", nu, "pos", dtype)
    X, V = local_linear_step(A, x0, dt, backend=backend)
    Xr, Vr = oracle(A, x0, dt)
    assert torch.isfinite(Xr).all() and torch.isfinite(X).all() and torch.isfinite(V).all()
    # Still close: the scheme has no accuracy cliff at 30, only more anchor steps.
    scale = x0.double().norm(dim=-1)[:, None]
    assert ((X.double() - Xr).norm(dim=-1) <= 1e3 * RTOL[dtype] * (Xr.norm(dim=-1) + 1e-6 * scale)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflow_is_an_error_or_non_finite(backend):
    # e^100 overflows float32: checked, a clear error; unchecked, Inf/NaN for that pair only.
    A, x0, dt = (t.to(DEVICE) for t in (torch.full((1, 1, 1), 100.0), torch.ones(1, 1), torch.tensor([[1.0, 0.5]])))
    with pytest.raises(ValueError, match="overflows torch.float32"):
        local_linear_step(A, x0, dt, backend=backend, check_finite=True)
    X, V = local_linear_step(A, x0, dt, backend=backend, check_finite=False)
    assert not torch.isfinite(X[0, 0]).any() and not torch.isfinite(V[0, 0]).any()
    torch.testing.assert_close(X[0, 1].cpu(), torch.exp(torch.tensor([50.0])), rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_bad_values_give_nan_not_garbage(backend):
    A, x0, dt = build_inputs(4, 3, 4, 3, "random", 2.0, "pos", torch.float32)
    dt[1, 2] = float("nan")
    dt[2, 0] = 10 * NU_MAX  # far out of range
    X, V = local_linear_step(A, x0, dt, backend=backend, check_finite=False)
    assert torch.isnan(X[1, 2]).all() and torch.isnan(V[2, 0]).all()
    good = torch.ones(3, 4, dtype=torch.bool)
    good[1, 2] = good[2, 0] = False
    Xr, _ = oracle(A, x0, dt.nan_to_num(0.0))
    assert torch.isfinite(X[good]).all()
    torch.testing.assert_close(X[good].double(), Xr[good], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- API contract

@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_shapes_dtypes_and_empty_batches(backend):
    for B, T in ((0, 3), (2, 0)):
        A, x0, dt = (torch.zeros(*shape, device=DEVICE, requires_grad=True) for shape in ((B, 4, 4), (B, 4), (B, T)))
        X, V = local_linear_step(A, x0, dt, backend=backend)
        assert X.shape == V.shape == (B, T, 4)
        (X.sum() + V.sum()).backward()  # empty outputs still take part in autograd, as the reference's do
        assert all(t.grad is not None and not t.grad.any() for t in (A, x0, dt))
    A, x0, dt = build_inputs(0, 2, 1, 3, "random", 1.0, "pos", torch.float64)
    X, V = local_linear_step(A, x0, dt, backend=backend)
    assert X.shape == (2, 1, 3) and X.dtype == torch.float64 and X.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivatives_are_refused_not_wrong(backend):
    # First-order backward kernels: differentiating a gradient again raises (it used to return a
    # wrong value: the gradient was treated as a constant).  The reference differentiates twice.
    A, x0, dt = build_inputs(1, 3, 2, 3, "random", 1.0, "pos", torch.float64)
    A.requires_grad_(True)
    X, _ = local_linear_step(A, x0, dt, backend=backend)
    (gA,) = torch.autograd.grad(X.pow(2).sum(), A, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(gA.sum(), A)
    X, _ = local_linear_step(A, x0, dt, backend=backend)
    (plain,) = torch.autograd.grad(X.pow(2).sum(), A)
    torch.testing.assert_close(gA.detach(), plain, rtol=0, atol=0)  # create_graph changes no value
    X, _ = local_linear_step(A, x0, dt, backend="reference")
    (gA,) = torch.autograd.grad(X.pow(2).sum(), A, create_graph=True)
    assert torch.isfinite(torch.autograd.grad(gA.sum(), A)[0]).all()


def test_auto_backend_choice():
    assert resolve_backend("auto", torch.device("cpu"), 5) == "torch"
    if HAS_TRITON:
        assert resolve_backend("auto", torch.device("cuda"), 5) == "triton"
        assert resolve_backend("auto", torch.device("cuda"), 65) == "torch"


def _bad(**over):
    A, x0, dt = torch.randn(2, 3, 3), torch.randn(2, 3), torch.rand(2, 4)
    args = dict(A=A, x0=x0, dt=dt)
    args.update(over)
    return args


@pytest.mark.parametrize("args,exc,match", [
    (_bad(A=torch.randn(3, 3)), ValueError, r"A must have shape \(B, D, D\)"),
    (_bad(A=torch.randn(2, 3, 4)), ValueError, "square"),
    (_bad(x0=torch.randn(3, 3)), ValueError, r"x0 must have shape \(B, D\) = \(2, 3\)"),
    (_bad(x0=torch.randn(2, 4)), ValueError, "x0 must have shape"),
    (_bad(dt=torch.rand(3, 4)), ValueError, "dt must have shape"),
    (_bad(dt=torch.rand(2)), ValueError, r"dt must have shape \(B, T\)"),
    (_bad(dt=torch.ones(2, 4, dtype=torch.int64)), TypeError, "dt has dtype torch.int64"),
    (_bad(A=torch.randn(2, 3, 3, dtype=torch.float16)), TypeError, "A has dtype torch.float16"),
    (_bad(x0=torch.randn(2, 3, dtype=torch.float64)), TypeError, "must share one dtype"),
    (_bad(dt=np.ones((2, 4))), TypeError, "dt must be a torch.Tensor"),
    (_bad(dt=torch.ones(2, 4, device="meta")), ValueError, "must be on one device"),
    (_bad(A=torch.zeros(2, 0, 0), x0=torch.zeros(2, 0)), ValueError, "D >= 1"),
    (_bad(dt=torch.tensor([[0.1, float("nan"), 0.2, 0.3]] * 2)), ValueError, "dt has 2 non-finite"),
    (_bad(A=torch.full((2, 3, 3), float("inf"))), ValueError, "A has 18 non-finite"),
    (_bad(x0=torch.tensor([[1.0, float("nan"), 0.0]] * 2)), ValueError, "x0 has 2 non-finite"),
    (_bad(dt=torch.full((2, 4), 1e5)), ValueError, "out of range"),
])
def test_bad_input_is_refused(args, exc, match):
    with pytest.raises(exc, match=match):
        local_linear_step(**args)


def test_bad_backend_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        local_linear_step(**_bad(), backend="cuda")
    if HAS_TRITON:
        with pytest.raises(ValueError, match="supports D <= 64"):
            local_linear_step(torch.zeros(1, 65, 65), torch.zeros(1, 65), torch.zeros(1, 1), backend="triton")


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        local_linear_step(**_bad(), backend="triton")


def test_module_layer_matches_the_op():
    from cellmnn_kernels import LocalLinearStep

    A, x0, dt = build_inputs(9, 3, 2, 4, "random", 2.0, "mixed", torch.float32)
    layer = LocalLinearStep(backend="torch")
    for got, want in zip(layer(A, x0, dt), local_linear_step(A, x0, dt, backend="torch")):
        assert torch.equal(got, want)


def test_package_imports_and_runs_without_triton():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail
        "import torch, cellmnn_kernels\n"
        "from cellmnn_kernels.ops.utils import HAS_TRITON\n"
        "assert not HAS_TRITON\n"
        "X, V = cellmnn_kernels.local_linear_step(torch.eye(2)[None], torch.ones(1, 2), torch.ones(1, 3))\n"
        "assert torch.allclose(X, torch.full((1, 3, 2), 2.718281828))\n"
        "try:\n"
        "    cellmnn_kernels.local_linear_step(torch.eye(2)[None], torch.ones(1, 2), torch.ones(1, 3),\n"
        "                                      backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'not installed' in str(e)\n"
        "else:\n"
        "    raise AssertionError('triton backend without triton must raise')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("D", [2, 5])
def test_backward_recomputes_the_forwards_anchor_states_bit_for_bit(D):
    # The backward kernel marches the anchors again instead of storing them: the states it keeps in
    # its scratch must be exactly the ones the forward finishes its pairs from (any difference would
    # make the gradient that of another function).  _anchor_states_kernel forms the forward's with
    # the forward's helpers and reads the backward's from the scratch of a real backward launch.
    from cellmnn_kernels.ops.local_linear_step import triton_reg
    from cellmnn_kernels.ops.local_linear_step.common import launch_scalars
    from cellmnn_kernels.ops.local_linear_step.triton_impl import anchor_slots

    dtype = torch.float32  # the register kernels' dtype
    g = torch.Generator().manual_seed(D)
    B, T = 33, 9  # two programs; several forward time blocks, the last one partly empty
    A = (torch.randn(B, D, D, generator=g, dtype=torch.float64) * 3 / D ** 0.5).to(dtype).to(DEVICE)
    x0 = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    dt = (torch.rand(B, T, generator=g, dtype=torch.float64) * 8 - 3).to(dtype).to(DEVICE)  # both signs
    variant, LS = triton_reg.VARIANT, anchor_slots(A, dt)
    S = torch.full((variant.scratch_size(B, D, LS),), float("nan"), dtype=dtype, device=DEVICE)
    gX = torch.ones(B, T, D, dtype=dtype, device=DEVICE)
    dA, dx0, ddt = (torch.empty_like(t) for t in (A, x0, dt))
    kernel, grid, kw = variant.backward_launch(A, x0, dt, gX, torch.zeros_like(gX), dA, dx0, ddt, S, LS)
    kernel[grid](**kw)
    Yf = torch.full((B, T, D), float("nan"), dtype=dtype, device=DEVICE)
    Yb = torch.full((B, T, D), float("nan"), dtype=dtype, device=DEVICE)
    cfg = triton_reg.config("fwd", D, dtype)
    _anchor_states_kernel[grid](A_ptr=A, x0_ptr=x0, dt_ptr=dt, S_ptr=S, Yf_ptr=Yf, Yb_ptr=Yb, LS=LS,
                                **launch_scalars(A, x0, dt), D=D, BB=cfg["BB"], BT=cfg["BT"], M=cfg["M"],
                                num_warps=cfg["num_warps"])
    assert not Yf.isnan().any()
    assert torch.equal(Yf, Yb)
    # and they are the anchors: some pairs sit beyond level 0 in each direction
    assert (Yf != x0[:, None, :]).any(dim=-1).sum() > B


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("backend", [backend_param("triton")])
def test_backward_scratch_too_small_gives_nan_not_a_wrong_gradient(backend):
    # The launcher sizes the scratch from the launch's highest anchor level (anchor_slots); a
    # kernel given fewer slots must keep its marches inside them and poison the pairs it cannot
    # hold, never return a plausible wrong gradient.
    from cellmnn_kernels.ops.local_linear_step.common import operator_norm1, taylor_params
    from cellmnn_kernels.ops.local_linear_step.triton_impl import anchor_slots, variant_for

    A, x0, dt = build_inputs(3, 4, 3, 2, "random", 6.0, "pos", torch.float32)
    dt[0] = 0.0  # cell 0: every pair at level 0
    gX = torch.ones(4, 3, 2, device=A.device)
    dA, dx0, ddt = (torch.empty_like(t) for t in (A, x0, dt))
    LS = 2
    assert anchor_slots(A, dt) > LS
    variant = variant_for(2, A.dtype)  # the register kernels
    S = torch.full((variant.scratch_size(4, 2, LS),), float("nan"), device=A.device)
    kernel, grid, kw = variant.backward_launch(A, x0, dt, gX, torch.zeros_like(gX), dA, dx0, ddt, S, LS)
    kernel[grid](**kw)
    theta, _ = taylor_params(A.dtype)
    lev = torch.floor(dt.abs() * operator_norm1(A)[:, None] / theta + 0.5)
    beyond = lev >= LS
    assert beyond.any() and not beyond[0].any()
    assert ddt[beyond].isnan().all() and dA[beyond.any(1)].isnan().all()
    want = grads("reference", A.double(), x0.double(), dt.double(), gX.double(), torch.zeros_like(gX).double())
    torch.testing.assert_close(dA[0].double(), want[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx0[0].double(), want[1][0], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("scratch_bytes", [None, 1 << 14])
def test_backward_while_capturing_reads_nothing_and_gives_the_same_gradients(scratch_bytes, monkeypatch):
    # Under CUDA graph capture the register and lane-group backwards take their levels from the
    # scratch budget (static_slots) instead of reading the highest level on the host; the level
    # only addresses the scratch, so the gradients must be the eager ones bit for bit, in one launch
    # or (a small budget) in chunks, with no host read at all.
    from cellmnn_kernels.ops.local_linear_step import triton_impl

    # The register family here; the lane-group family takes the same levels through the same launcher
    # (interpreted, its launches cost 10 s each).
    D, B = 3, 70
    A, x0, dt = build_inputs(D, B, 3, D, "random", 6.0, "mixed", torch.float32)
    g = torch.Generator().manual_seed(D)
    gX, gV = (torch.randn(B, 3, D, generator=g).to(A.device) for _ in range(2))
    eager = triton_impl.llstep_backward(A, x0, dt, gX, gV)
    monkeypatch.setattr(triton_impl, "capturing", lambda device: True)
    monkeypatch.setattr(triton_impl, "anchor_slots", None)  # any call would fail
    if scratch_bytes is not None:
        monkeypatch.setattr(triton_impl, "SCRATCH_BYTES", scratch_bytes)
        v = triton_impl.variant_for(D, A.dtype)
        LS = triton_impl.static_slots(v, B, D, A.dtype)
        assert LS == triton_impl.MIN_STATIC_SLOTS and triton_impl.backward_chunk(v, B, D, LS, 4) < B
    static = triton_impl.llstep_backward(A, x0, dt, gX, gV)
    for a, b in zip(eager, static):
        assert torch.equal(a, b)


def test_meta_tensors_infer_shapes_as_torch_ops_do():
    # Shape inference (meta tensors carry no values): X and V of the right shape and dtype, tied to
    # the inputs so that a backward also infers the gradients' shapes; bad shapes still fail.
    A = torch.empty(4, 3, 3, device="meta", dtype=torch.float64, requires_grad=True)
    x0 = torch.empty(4, 3, device="meta", dtype=torch.float64)
    dt = torch.empty(4, 7, device="meta", dtype=torch.float64)
    X, V = local_linear_step(A, x0, dt)
    assert X.shape == V.shape == (4, 7, 3) and X.device.type == "meta" and X.dtype == torch.float64
    (X.sum() + V.sum()).backward()
    assert A.grad.shape == (4, 3, 3)
    with pytest.raises(ValueError, match="x0 must have shape"):
        local_linear_step(A, torch.empty(4, 2, device="meta", dtype=torch.float64), dt)
