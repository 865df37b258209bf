"""sde_covariance's Triton backend (interpreted on CPU) against float64 oracles.

Forward: Van Loan's block exponential in float64 (``sde_covariance_reference``), per pair, relative
Frobenius error <= 1e-4 in float32 and 1e-9 in float64 for ||dt A||_1 <= 6: the kernel runs the
torch path's scheme (m + s rounded matrix products, each doubling adding a positive semi-definite
term, little cancellation), held to the same tolerances by test_local_linear_sde.py; float64 leaves room for
the oracle's own error (it subtracts through expm(-tau A)).  Long steps (||dt A||_1 ~ 200), where
that oracle loses digits, compare with the float64 torch path instead.
Gradients: float64 autograd through ``sde_covariance_torch``, relative Frobenius error over the
batch <= 1e-3 in float32 (the adjoint sweeps as many rounded products again as the forward, and
dA sums T pairs) and 1e-8 in float64.  Pairs with dt <= 0 have S = 0 and a zero gradient exactly.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cellmnn_kernels.ops.local_linear_sde import BACKENDS, sde_covariance, sde_covariance_reference
from cellmnn_kernels.ops.local_linear_sde.torch_impl import sde_covariance_torch
from cellmnn_kernels.testing import KINDS, assert_rel_close, backend_param, build_inputs

RTOL = {torch.float32: 1e-4, torch.float64: 1e-9}
GRAD_RTOL = {torch.float32: 1e-3, torch.float64: 1e-8}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]
TRITON = backend_param("triton")


@st.composite
def cases(draw):
    return dict(seed=draw(st.integers(0, 2**32 - 1)), B=draw(st.integers(1, 3)), T=draw(st.integers(1, 4)),
                D=draw(st.integers(1, 6)), kind=draw(st.sampled_from(KINDS)), nu=draw(st.floats(0.0, 6.0)),
                shared=draw(st.booleans()), sign=draw(st.sampled_from(["pos", "mixed"])),
                layout=draw(st.sampled_from(["contiguous", "strided"])))


def make(case, dtype):
    """A, dt, g (shared (D,) or per cell (B, D)) and an upstream gradient of S (float64)."""
    A, _, dt = build_inputs(case["seed"], case["B"], case["T"], case["D"], case["kind"], case["nu"],
                            case.get("sign", "pos"), dtype, case.get("layout", "contiguous"))
    rng = np.random.default_rng(case["seed"] + 1)
    shape = (case["D"],) if case["shared"] else (case["B"], case["D"])
    g = torch.tensor(rng.uniform(0.2, 1.0, shape), dtype=dtype)
    gS = torch.tensor(rng.standard_normal(tuple(dt.shape) + (case["D"], case["D"])))
    return A, dt, g, gS


def grads(fn, A, dt, g, gS, dtype):
    """S and (dA, ddt, dg) of <gS, fn(A, dt, g)> with the inputs cast to ``dtype``."""
    ins = [t.detach().to(dtype).requires_grad_() for t in (A, dt, g)]
    S = fn(*ins)
    S.backward(gS.to(dtype))
    return S.detach(), [t.grad for t in ins]


def check(case, dtype, forward_oracle="reference"):
    """Forward against the oracle per pair, gradients against float64 autograd of the torch path.
    At dt = 0 exactly the kernel's ddt is one-sided (0: no noise runs backward in time), the torch
    path's clamp passes the right derivative: that entry of the oracle is set to 0."""
    A, dt, g, gS = make(case, dtype)
    S, got = grads(lambda *a: sde_covariance(*a, backend="triton"), A, dt, g, gS, dtype)
    S64, want = grads(sde_covariance_torch, A, dt, g, gS, torch.float64)
    ref = sde_covariance_reference(A.double(), dt.double(), g.double()) if forward_oracle == "reference" else S64
    assert S.shape == ref.shape and S.dtype == dtype and S.is_contiguous()
    assert_rel_close(S, ref, RTOL[dtype], "S", dim=(-2, -1))
    back = dt <= 0
    want[1] = torch.where(back, 0.0, want[1])
    for name, a, b in zip(("dA", "ddt", "dg"), got, want):
        assert a.shape == b.shape and a.dtype == dtype
        assert_rel_close(a, b, GRAD_RTOL[dtype], name)
    assert not S[back].any() and not got[1][back].any()


@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("dtype", DTYPES)
@given(case=cases())
def test_matches_van_loan_and_float64_autograd(backend, dtype, case):
    check(case, dtype)


@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D, shared", [(9, True), (16, False)])
def test_wide_operators(backend, dtype, D, shared):
    check(dict(seed=D, B=2, T=2, D=D, kind="random", nu=4.0, shared=shared, sign="mixed"), dtype)


@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("dtype", DTYPES)
def test_long_step_many_doublings(backend, dtype):
    """||dt A||_1 up to 200: s = 9 doublings, beyond the backward's register stack of 8 levels."""
    check(dict(seed=4, B=2, T=3, D=4, kind="decaying", nu=200.0, shared=False, sign="pos"), dtype,
          forward_oracle="torch")


@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("dtype", DTYPES)
def test_no_noise_gives_zero_covariance_and_gradients(backend, dtype):
    A, dt, g, gS = make(dict(seed=2, B=2, T=3, D=3, kind="random", nu=3.0, shared=True, sign="mixed"), dtype)
    S, (dA, ddt, dg) = grads(lambda *a: sde_covariance(*a, backend="triton"), A, dt, torch.zeros_like(g), gS, dtype)
    assert not S.any() and not dA.any() and not ddt.any() and not dg.any()


@pytest.mark.parametrize("backend", [TRITON])
def test_dispatch(backend):
    assert "triton" in BACKENDS
    A, dt, g, _ = make(dict(seed=1, B=2, T=2, D=3, kind="random", nu=2.0, shared=True), torch.float32)
    assert torch.equal(sde_covariance(A, dt, g), sde_covariance_torch(A, dt, g))  # auto on CPU: torch
    with pytest.raises(ValueError, match="D <= 16"):
        sde_covariance(torch.zeros(1, 17, 17), torch.ones(1, 1), torch.ones(17), backend="triton")
    Ar = A.clone().requires_grad_()
    S = sde_covariance(Ar, dt, g, backend="triton")
    (dA,) = torch.autograd.grad(S.sum(), Ar, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        dA.sum().backward()
