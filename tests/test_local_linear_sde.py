"""local_linear_sde_step: the Taylor-and-doubling covariance against float64 oracles.

Oracles: Van Loan's block exponential (dense, float64) and, independently of any exponential, the
Lyapunov ODE dS/ds = A S + S A^T + Q integrated by RK4 in float64; for stable operators and long
steps the algebraic Lyapunov equation's solution (the stationary covariance).

Tolerances, per pair, relative to ||S_ref|| (Frobenius): 1e-4 in float32 (unit roundoff 6e-8,
some m + s = 11 + 6 rounded matrix products and sums, each doubling adding a positive semi-definite
term and no Taylor term above about e times S, so little cancels) and 1e-9 in float64 (1.1e-16, the same
count with room for the oracle's own error at ||dt A||_1 <= 6). Samples Y = X + L eps compare with
the oracle's Cholesky factor at 1e-3 / 1e-8: L inherits the conditioning of S (test operators keep
cond(S) below ~1e4).
Gradients: float64 gradcheck, and float32 against float64 autograd through the oracle at 1e-3.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cellmnn_kernels import local_linear_sde_step, local_linear_step, sde_covariance
from cellmnn_kernels.ops.local_linear_sde import psd_cholesky, sde_covariance_reference, sde_noise
from cellmnn_kernels.ops.local_linear_sde.common import TAYLOR, guarded_cholesky
from cellmnn_kernels.ops.local_linear_sde.torch_impl import LANES_MATMUL_MAX_D, cholesky_lanes, degree
from cellmnn_kernels.testing import KINDS, assert_rel_close, backend_param, build_inputs

RTOL = {torch.float32: 1e-4, torch.float64: 1e-9}
SAMPLE_RTOL = {torch.float32: 1e-3, torch.float64: 1e-8}
DTYPES = [torch.float32, torch.float64]


@st.composite
def cases(draw, max_nu=6.0, max_d=6, signs=("pos",)):
    return dict(seed=draw(st.integers(0, 2**32 - 1)), B=draw(st.integers(1, 4)), T=draw(st.integers(1, 4)),
                D=draw(st.integers(1, max_d)), kind=draw(st.sampled_from(KINDS)), nu=draw(st.floats(0.0, max_nu)),
                shared=draw(st.booleans()), sign=draw(st.sampled_from(signs)))


def make(case, dtype):
    A, x0, dt = build_inputs(case["seed"], case["B"], case["T"], case["D"], case["kind"], case["nu"],
                             case.get("sign", "pos"), dtype)
    rng = np.random.default_rng(case["seed"] + 1)
    shape = (case["D"],) if case["shared"] else (case["B"], case["D"])
    g = torch.tensor(rng.uniform(0.2, 1.0, shape), dtype=dtype)
    eps = torch.tensor(rng.standard_normal((case["B"], case["T"], case["D"])), dtype=dtype)
    return A, x0, dt, g, eps


def lyapunov_rk4(A, dt, g, steps=2000):
    """S(dt) for one cell and one offset by RK4 on dS/ds = A S + S A^T + Q (float64)."""
    Q = torch.diag(g.double() ** 2)
    A = A.double()
    f = lambda S: A @ S + S @ A.T + Q  # noqa: E731
    S, h = torch.zeros_like(Q), float(dt) / steps
    for _ in range(steps):
        k1 = f(S)
        k2 = f(S + 0.5 * h * k1)
        k3 = f(S + 0.5 * h * k2)
        k4 = f(S + h * k3)
        S = S + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return S


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@given(case=cases())
def test_covariance_matches_van_loan(dtype, case):
    A, x0, dt, g, eps = make(case, dtype)
    S = sde_covariance(A, dt, g)
    ref = sde_covariance_reference(A.double(), dt.double(), g.double())
    assert S.shape == ref.shape and S.dtype == dtype
    assert_rel_close(S, ref, RTOL[dtype], "S", dim=(-2, -1))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@given(case=cases())
def test_sample_is_mean_plus_cholesky_factor_times_eps(dtype, case):
    A, x0, dt, g, eps = make(case, dtype)
    X, V, Y, S = local_linear_sde_step(A, x0, dt, g, eps, return_cov=True)
    X0, V0 = local_linear_step(A, x0, dt)
    assert torch.equal(X, X0) and torch.equal(V, V0)  # the mean is the deterministic step, bit for bit
    Sr = sde_covariance_reference(A.double(), dt.double(), g.double())
    Lr = torch.linalg.cholesky(Sr)
    want = X.double() + (Lr @ eps.double()[..., None])[..., 0]
    assert_rel_close(Y - X, want - X.double(), SAMPLE_RTOL[dtype], "Y - X", dim=-1)


@pytest.mark.parametrize("D", [1, 3, 5, 8])  # D = 8: the torch path's batched GEMMs (above LANES_MATMUL_MAX_D)
def test_covariance_matches_the_lyapunov_ode(D):
    A, _, dt, g, _ = make(dict(seed=D, B=2, T=2, D=D, kind="nonnormal", nu=4.0, shared=False), torch.float64)
    S = sde_covariance(A, dt, g)
    for b in range(2):
        for k in range(2):
            assert_rel_close(S[b, k], lyapunov_rk4(A[b], dt[b, k], g[b]), 1e-9, "S vs RK4")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_long_steps_of_stable_operators_reach_the_stationary_covariance(dtype):
    """||dt A||_1 up to 2000 (10 doublings and more): S -> the solution of A S + S A^T + Q = 0."""
    rng = np.random.default_rng(3)
    D = 4
    M = rng.standard_normal((D, D))
    A = torch.tensor(-(M @ M.T + np.eye(D)), dtype=dtype)[None]  # symmetric negative definite
    g = torch.tensor(rng.uniform(0.3, 1.0, D), dtype=dtype)
    dt = torch.tensor([[75.0]], dtype=dtype)  # ||dt A||_1 = 1930
    S = sde_covariance(A, dt, g)[0, 0].double()
    Ad = A[0].double()
    K = torch.kron(torch.eye(D, dtype=torch.float64), Ad) + torch.kron(Ad, torch.eye(D, dtype=torch.float64))
    stat = torch.linalg.solve(K, -torch.diag(g.double() ** 2).reshape(-1)).reshape(D, D)
    assert torch.isfinite(S).all()
    assert_rel_close(S, stat, RTOL[dtype] * 10, "stationary S")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@given(case=cases(max_nu=20.0))
def test_covariance_is_symmetric_positive_semidefinite(dtype, case):
    A, x0, dt, g, eps = make(case, dtype)
    S = sde_covariance(A, dt, g).double()
    assert torch.equal(S, S.transpose(-1, -2))
    lam = torch.linalg.eigvalsh(S)
    assert (lam >= -RTOL[dtype] * lam.abs().amax(-1, keepdim=True)).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_no_noise_or_no_time_is_the_deterministic_step_exactly(dtype):
    A, x0, dt, g, eps = make(dict(seed=5, B=3, T=4, D=4, kind="random", nu=3.0, shared=False), dtype)
    X0, V0 = local_linear_step(A, x0, dt)
    X, V, Y, S = local_linear_sde_step(A, x0, dt, torch.zeros_like(g), eps, return_cov=True)
    assert torch.equal(Y, X0) and torch.equal(X, X0) and torch.equal(V, V0) and not S.any()
    dt2 = dt.clone()
    dt2[:, ::2] = -dt2[:, ::2]
    dt2[0, 1] = 0.0
    X, V, Y, S = local_linear_sde_step(A, x0, dt2, g, eps, return_cov=True)
    back = dt2 <= 0
    assert not S[back].any() and torch.equal(Y[back], X[back])
    assert (S[~back].diagonal(dim1=-2, dim2=-1) > 0).all()


def test_small_noise_converges_to_the_deterministic_step():
    A, x0, dt, g, eps = make(dict(seed=7, B=2, T=3, D=3, kind="mixed", nu=2.0, shared=True), torch.float64)
    X = local_linear_step(A, x0, dt)[0]
    gaps = [(local_linear_sde_step(A, x0, dt, g * s, eps)[2] - X).norm().item() for s in (1e-2, 1e-4, 1e-6)]
    assert gaps[0] > 0 and abs(gaps[1] / gaps[0] - 1e-2) < 1e-6 and abs(gaps[2] / gaps[1] - 1e-2) < 1e-6


def test_cholesky_of_zero_singular_and_definite_matrices():
    """psd_cholesky: LAPACK where every matrix is zero or definite, the guarded factor otherwise."""
    L0 = psd_cholesky(torch.zeros(2, 3, 3, dtype=torch.float64))
    assert not L0.any()
    v = torch.tensor([[1.0], [2.0], [-1.0]], dtype=torch.float64)
    S = v @ v.T  # rank one
    for f in (psd_cholesky, guarded_cholesky):
        L = f(S)
        assert torch.allclose(L @ L.T, S, atol=1e-12) and torch.isfinite(L).all()
    S2 = torch.diag(torch.tensor([4.0, 0.0, 9.0], dtype=torch.float64))
    assert torch.allclose(psd_cholesky(S2), torch.diag(torch.tensor([2.0, 0.0, 3.0], dtype=torch.float64)))
    M = torch.randn(4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    P = M @ M.transpose(1, 2) + 0.1 * torch.eye(3, dtype=torch.float64)
    P[1] = 0.0
    assert torch.allclose(psd_cholesky(P), guarded_cholesky(P), atol=1e-12)


def test_gradcheck_float64():
    A, x0, dt, g, eps = make(dict(seed=11, B=2, T=2, D=3, kind="random", nu=2.5, shared=False), torch.float64)
    dt[0, 1] = -0.3  # a backward offset: the sample is the mean there
    args = [t.clone().requires_grad_() for t in (A, x0, dt, g)]

    def f(A, x0, dt, g):
        X, V, Y, S = local_linear_sde_step(A, x0, dt, g, eps, return_cov=True)
        return Y, V, S

    assert torch.autograd.gradcheck(f, args, atol=1e-7, rtol=1e-6)


@given(case=cases())
def test_float32_gradients_match_float64_oracle(case):
    A, x0, dt, g, eps = make(case, torch.float32)
    gen = torch.Generator().manual_seed(case["seed"] % 1000)
    gY = torch.randn(dt.shape + (case["D"],), generator=gen, dtype=torch.float64)
    gS = torch.randn(dt.shape + (case["D"], case["D"]), generator=gen, dtype=torch.float64)

    def run(dtype, reference):
        ins = [t.detach().to(dtype).requires_grad_() for t in (A, g, dt)]
        if reference:
            S = sde_covariance_reference(*ins[:1], ins[2], ins[1])
            Y = (torch.linalg.cholesky(S) @ eps.to(dtype)[..., None])[..., 0]
        else:
            S = sde_covariance(ins[0], ins[2], ins[1])
            Y = (psd_cholesky(S) @ eps.to(dtype)[..., None])[..., 0]
        torch.autograd.backward([Y, S], [gY.to(dtype), gS.to(dtype)])
        return [t.grad for t in ins]

    got, want = run(torch.float32, False), run(torch.float64, True)
    assert_rel_close(got[0], want[0], 1e-3, "dA")
    assert_rel_close(got[1], want[1], 1e-3, "dg")
    assert_rel_close(got[2], want[2], 1e-3, "ddt", floor=dt_cancellation_floor(A, dt, g, eps, gS, gY, 1e-3))


def dt_cancellation_floor(A, dt, g, eps, gS, gY, rtol, dtype=torch.float32):
    """The dt gradient is dS/ddt = A S + S A^T + Q (Lyapunov) contracted with the upstream gradients, and
    for a strongly decaying A that sum is exponentially smaller than its terms: a dtype of unit roundoff
    u cannot do better than about u (2 ||A|| ||S|| + ||Q||) per pair, times the upstream weights of S and
    of L eps (through the Cholesky factor, 1 / (2 sqrt(lambda_min(S))) per unit of S).  Returned as the
    floor of assert_rel_close that allows 8 such roundings per pair with dt > 0, summed."""
    A, g = A.double(), g.double()
    S = sde_covariance_reference(A, dt.double().clamp_min(1e-3), g)
    Ac = A.flatten(1).norm(dim=-1)[:, None]
    Q = (g**2).sum(-1) if g.dim() == 1 else (g**2).sum(-1)[:, None]
    lam = torch.linalg.eigvalsh(S)[..., 0].clamp_min(1e-300)
    weight = gS.flatten(-2).norm(dim=-1) + gY.norm(dim=-1) * eps.double().norm(dim=-1) / (2 * lam.sqrt())
    u = torch.finfo(dtype).eps / 2
    per_pair = (2 * Ac * S.flatten(-2).norm(dim=-1) + Q) * weight
    return float(8 * u / rtol * torch.where(dt > 0, per_pair, 0.0).sum())


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@given(case=cases(max_d=LANES_MATMUL_MAX_D + 2, signs=("pos", "mixed")))
def test_torch_backend_noise_and_gradients_on_mixed_directions_of_time(dtype, case):
    """Both torch forms (lanes up to D = 6 with the analytic backward, GEMMs above) against the float64
    oracle, with offsets of both signs and exactly 0: S and the noise L eps are 0 where dt <= 0 and
    match elsewhere (tolerances as above); gradients in A, g and dt (where dt != 0: the reference's
    clamp takes the right derivative at 0, the op the left one) at 1e-3 in float32 and 1e-9 in float64,
    dt's above the floor its cancellation sets (dt_cancellation_floor)."""
    A, x0, dt, g, eps = make(case, dtype)
    gen = torch.Generator().manual_seed(case["seed"] % 1000)
    gS = torch.randn(dt.shape + (case["D"], case["D"]), generator=gen, dtype=torch.float64)
    gN = torch.randn(dt.shape + (case["D"],), generator=gen, dtype=torch.float64)

    def run(to, backend):
        ins = [t.detach().to(to).requires_grad_() for t in (A, g, dt)]
        S = sde_covariance(ins[0], ins[2], ins[1], backend=backend)
        N = sde_noise(ins[0], ins[2], ins[1], eps.to(ins[0].dtype), backend=backend)
        torch.autograd.backward([S, N], [gS.to(S.dtype), gN.to(S.dtype)])
        return S, N, [t.grad for t in ins]

    S, N, got = run(dtype, "torch")
    Sr, Nr, want = run(torch.float64, "reference")
    back = dt <= 0
    assert not S[back].any() and not N[back].any()
    assert_rel_close(S, Sr, RTOL[dtype], "S", dim=(-2, -1))
    assert_rel_close(N, Nr, SAMPLE_RTOL[dtype], "L eps", dim=-1)
    want[2] = torch.where(dt == 0, 0.0, want[2])
    rtol = 1e-3 if dtype == torch.float32 else 1e-9
    assert_rel_close(got[0], want[0], rtol, "dA")
    assert_rel_close(got[1], want[1], rtol, "dg")
    floor = dt_cancellation_floor(A, dt, g, eps, gS, gN, rtol, dtype)
    assert_rel_close(got[2], want[2], rtol, "ddt", floor=floor)


def test_lanes_backend_refuses_a_second_derivative_and_the_reference_gives_it():
    A, x0, dt, g, eps = make(dict(seed=4, B=2, T=3, D=3, kind="random", nu=2.0, shared=False), torch.float64)
    for backend in ("torch", "reference"):
        Ar = A.clone().requires_grad_()
        (dA,) = torch.autograd.grad(sde_covariance(Ar, dt, g, backend=backend).square().sum(), Ar, create_graph=True)
        if backend == "torch":
            with pytest.raises(RuntimeError, match="first derivatives only.*backend='reference'"):
                dA.sum().backward()
        else:
            dA.sum().backward()
            assert torch.isfinite(Ar.grad).all() and Ar.grad.abs().sum() > 0


def test_not_a_number_propagates_with_the_checks_off():
    A, x0, dt, g, eps = make(dict(seed=6, B=3, T=2, D=3, kind="random", nu=2.0, shared=False), torch.float32)
    dt[1, 0] = float("nan")
    X, V, Y, S = local_linear_sde_step(A, x0, dt, g, eps, return_cov=True, check_finite=False)
    N = sde_noise(A, dt, g, eps, check_finite=False)
    with pytest.raises(ValueError, match="dt has 1 non-finite"):
        sde_noise(A, dt, g, eps)  # the default checks on the CPU
    assert torch.isnan(S[1, 0]).all() and torch.isnan(N[1, 0]).all()
    assert torch.isfinite(S[0]).all() and torch.isfinite(N[0]).all()


@given(seed=st.integers(0, 2**32 - 1), D=st.integers(1, LANES_MATMUL_MAX_D), shared=st.booleans())
def test_noise_backward_through_the_factor_matches_autograd_of_the_guarded_factor(seed, D, shared):
    """The lanes noise differentiates its Cholesky factor by the reversed column loop: float64
    gradients in A, g, dt and eps against autograd through the reference covariance and
    ``guarded_cholesky``, at 1e-9 (float64 rounding amplified by the factor's conditioning), with
    offsets of both signs (none exactly 0, where the two take the derivative from opposite sides)
    and, in half the cells, a coordinate with no noise and no coupling, so that S is singular and
    the factor drops that pivot."""
    gen = torch.Generator().manual_seed(seed % 2**31)
    B, T = 4, 3
    A = torch.randn(B, D, D, generator=gen, dtype=torch.float64) / math.sqrt(D)
    g = 0.2 + torch.rand(D if shared else (B, D), generator=gen, dtype=torch.float64)
    if D > 1 and not shared:
        A[::2, 0, 1:], A[::2, 1:, 0] = 0.0, 0.0  # coordinate 0 decoupled ...
        g[::2, 0] = 0.0  # ... and without noise: S[0, :] = 0
    dt = (torch.rand(B, T, generator=gen, dtype=torch.float64) * 3 + 0.05) * torch.tensor([1.0, -1.0, 1.0])
    eps = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    gN = torch.randn(B, T, D, generator=gen, dtype=torch.float64)

    def grads(noise):
        ins = [t.detach().clone().requires_grad_() for t in (A, g, dt, eps)]
        N = noise(*ins)
        N.backward(gN)
        return N.detach(), [t.grad for t in ins]

    def oracle(A, g, dt, eps):
        return (guarded_cholesky(sde_covariance_reference(A, dt, g)) @ eps[..., None])[..., 0]

    N, got = grads(lambda A, g, dt, eps: sde_noise(A, dt, g, eps, backend="torch"))
    Nr, want = grads(oracle)
    assert_rel_close(N, Nr, 1e-9, "L eps")
    for name, a, b in zip(("dA", "dg", "ddt", "deps"), got, want):
        assert_rel_close(a, b, 1e-9, name)


def test_cholesky_lanes_is_the_guarded_factor():
    M = torch.randn(6, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    S = M @ M.transpose(1, 2) + 0.05 * torch.eye(4, dtype=torch.float64)
    S[1] = 0.0
    v = M[2, :, :1]
    S[2] = v @ v.T  # rank one
    S[3, 3, :], S[3, :, 3] = 0.0, 0.0  # a zero row and column
    L = cholesky_lanes(S.permute(1, 2, 0)).permute(2, 0, 1)
    assert torch.allclose(L, guarded_cholesky(S), rtol=0, atol=1e-14)  # the same factor, up to summation order
    assert torch.allclose(L @ L.transpose(1, 2), S, atol=1e-12) and not L[1].any()


@pytest.mark.parametrize("bad, err, match", [
    (dict(g=-0.1), ValueError, "g must be non-negative"),
    (dict(g=float("nan")), ValueError, "g has 1 non-finite"),
    (dict(g_shape=(2, 4)), ValueError, "g must have shape"),
    (dict(eps_shape=(3, 3, 3)), ValueError, "eps must have shape"),
    (dict(g_dtype=torch.float64), TypeError, "must share one dtype"),
    (dict(A_shape=(3, 3)), ValueError, "A must have shape"),
    (dict(dt_shape=(2,)), ValueError, "dt must have shape"),
    (dict(dt_shape=(4, 2)), ValueError, "dt must have shape"),
])
def test_bad_input_names_the_argument(bad, err, match):
    """The step, and the covariance (which takes no eps) and the noise called alone, check their
    inputs before any work."""
    A, x0, dt = torch.zeros(bad.get("A_shape", (3, 3, 3))), torch.zeros(3, 3), torch.ones(bad.get("dt_shape", (3, 2)))
    g = torch.full(bad.get("g_shape", (3,)), 0.5, dtype=bad.get("g_dtype", torch.float32))
    if "g" in bad:
        g[0] = bad["g"]
    eps = torch.zeros(bad.get("eps_shape", (3, 2, 3)))
    calls = [lambda: local_linear_sde_step(A, x0, dt, g, eps), lambda: sde_noise(A, dt, g, eps)]
    if "eps_shape" not in bad:
        calls.append(lambda: sde_covariance(A, dt, g))
    for call in calls:
        with pytest.raises(err, match=match):
            call()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_the_degree_is_the_smallest_whose_omitted_term_is_below_roundoff(dtype):
    """degree(rho): (2 rho)^(m+1) / (m+2)! <= u at m and not at m - 1 (m >= 2), never above the
    worst case's degree, which it reaches at rho = theta."""
    theta, m_max = TAYLOR[dtype]
    u = torch.finfo(dtype).eps / 2
    omitted = lambda rho, m: (2 * rho) ** (m + 1) / math.factorial(m + 2)  # noqa: E731
    for rho in np.geomspace(1e-4, theta, 40):
        m = degree(float(rho), dtype, m_max)
        assert 2 <= m <= m_max and omitted(rho, m) <= u * (1 + 1e-12)
        assert m == 2 or omitted(rho, m - 1) > u
    assert omitted(theta, degree(theta, dtype, m_max)) <= u


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", ["torch", backend_param("triton")])
@pytest.mark.parametrize("D", [2, 5, 9])
def test_a_short_step_beside_a_long_one_keeps_its_digits(backend, D, dtype):
    """One s serves the call, so a pair 10^3-10^7 times shorter than the longest is doubled some 12
    times more than it needs: E = I + F is carried as F, whose digits I + F would round away in float32
    (that form was off by up to 4.2e-4 relative here).  Every pair within 1e-4 / 1e-9 of the oracle."""
    rng = np.random.default_rng(D)
    A = torch.tensor(rng.standard_normal((3, D, D)) / D, dtype=dtype)
    dt = torch.tensor([[2e3, 0.5, 1e-3], [2.0, 3e-4, 0.0], [1.5e3, 1.0, 0.02]], dtype=dtype)  # ||dt A||_1 < 1e4
    g = torch.tensor(rng.uniform(0.2, 1.0, D), dtype=dtype)
    S = sde_covariance(A, dt, g, backend=backend)
    short = dt < 10  # the oracle itself (expm(-dt A)) is not accurate for the long pairs
    ref = sde_covariance_reference(A.double(), dt.double().clamp_max(10), g.double())
    assert_rel_close(S[short], ref[short], RTOL[dtype], "S of the short pairs", floor=1e-30, dim=(-2, -1))
