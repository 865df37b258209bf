"""Triton backend of ``sde_covariance``: the Taylor-and-doubling covariance (``common.py``) and its
adjoint, one launch each, for D <= MAX_D = 16 in float32 and float64.

Layout: a program owns BC cells x BT target times (BP = BC * BT pairs, the cell index slowest) and
walks the cell's T times in blocks of BT.  Every matrix of a pair is a slice of a (BP, DP, DP)
register tile (D padded to the power of two DP, the padding zero in A and g); a product is a
broadcast multiply over a (BP, DP, DP, DP) tile reduced over the inner axis, so nothing goes
through global memory but the inputs and the outputs.  BP * DP^2 is 256 matrix elements per
program (128 in float64; at least one pair), over 4 or 8 warps (``config``).

Scheme (one s for the call, the smallest with ||(tau / 2^s) A||_1 <= theta for every pair; the
host finds it, one synchronisation): h = tau / 2^s, Z = h A, F0 = E0 - I = sum_{1<=k<=m} Z^k / k!,
T_0 = h Q, T_n = (Z T_{n-1} + T_{n-1} Z^T) / (n+1), S0 = sum_n T_n; s doublings S <- S + E S E^T,
E <- E^2 with E = I + F carried as F (2 S + F S + S F^T + F S F^T and 2 F + F^2: a pair whose h is
far below the largest keeps the digits of F that I + F would round away); output (S + S^T) / 2.
A pair with dt <= 0 has h = 0, so S = 0 and a zero gradient.

Backward (``_sde_cov_bwd_kernel``), per pair, from the symmetrised upstream G: the Taylor part and
the doublings are recomputed; the doublings' intermediates (F_i, S_i) of levels i < LMAX = 8 are
kept in a register stack (LMAX, BP, DP, DP) written and read by a select on the level; a level at
or above LMAX (s > 8, ||dt A||_1 > 128) is recomputed from level LMAX - 1 when the reverse sweep
reaches it.  The sweep runs Sbar <- Sbar + E^T Sbar E, Ebar <- 2 Sbar E S + Ebar E^T + E^T Ebar
from the last doubling down; then the Taylor chains T_n and Z^n / n! are recomputed (kept as
tuples of tiles, m of each) and reversed: Zbar, and Qbar = h Gbar_0.  Per pair hbar = <Gbar_0, Q>
+ <Zbar, A>, ddt = hbar / 2^s (0 for dt <= 0); per cell dA = sum_pairs h Zbar and
dg = 2 g sum_pairs diag(Qbar), reduced inside the program.  No global scratch at any D; ptxas
(sm_90, triton 3.8) spills part of the float64 backward's tiles (about 1 kB per thread at D = 5,
2 kB at D = 16: the kept Taylor chains) to thread-local memory; float32 at D <= 8 does not spill.

``VARIANT`` is this family as the dispatch and the compile tools see it.
"""
from __future__ import annotations

import torch

from ..utils import HAS_TRITON, first_order_only, next_power_of_2, tl, triton
from ..variant import KernelVariant, launch_kwargs
from .common import TAYLOR, doublings
from .torch_impl import sde_covariance_torch

MAX_D = 16  # largest D the kernels serve
LMAX = 8  # doubling levels the backward keeps in registers (a power of two)
SECOND_ORDER = ("sde_covariance: the triton backend has first derivatives only; use backend='torch' for "
                "second derivatives (e.g. create_graph=True and a gradient of a gradient)")


def config(kind: str, D: int, dtype: torch.dtype, T: int = 16) -> dict:
    """Compile-time configuration: DP = D padded to a power of two (at least 2); BP = MB / DP^2 pairs
    per program (at least one) with MB = 256 matrix elements (float64: 128); BT = min(BP, T rounded
    up to a power of two) times per program, BC = BP // BT cells; M = the Taylor degree of ``dtype``.
    4 warps in the forward (a thread holds at most 2 entries of a matrix and 16 of a product), 8 in
    the backward (more matrices live) and at DP = 16."""
    DP = max(2, next_power_of_2(D))
    BP = max(1, (128 if dtype == torch.float64 else 256) // (DP * DP))
    BT = min(BP, next_power_of_2(max(1, T)))
    warps = 8 if DP >= 16 or kind == "bwd" else 4
    cfg = dict(D=D, DP=DP, BC=BP // BT, BT=BT, M=TAYLOR[dtype][1], num_warps=warps)
    if kind == "bwd":
        cfg["LMAX"] = LMAX
    return cfg


if HAS_TRITON:

    @triton.jit
    def _mm(X, Y):
        """X Y for (BP, DP, DP) tiles."""
        return tl.sum(X[:, :, :, None] * Y[:, None, :, :], axis=2)

    @triton.jit
    def _mtm(X, Y):
        """X^T Y."""
        return tl.sum(X[:, :, :, None] * Y[:, :, None, :], axis=1)

    @triton.jit
    def _mmt(X, Y):
        """X Y^T."""
        return tl.sum(X[:, :, None, :] * Y[:, None, :, :], axis=3)

    @triton.jit
    def _over(X, den, num=1.0):
        """X * (num / den), the ratio formed in X's dtype (a float constexpr could be rounded to float32)."""
        return X * (tl.full((), num, X.dtype) / den)

    @triton.jit
    def _tr(X):
        """X^T."""
        return tl.permute(X, (0, 2, 1))

    @triton.jit
    def _pairs(dt_ptr, pid, t0, B, T, stb, stt, n_dbl, BC: tl.constexpr, BT: tl.constexpr):
        """This program's pairs of time block t0: cell (int64), time, mask, dt, h = max(dt, 0) / 2^s."""
        p = tl.arange(0, BC * BT)
        cell = pid * BC + p // BT
        t = t0 + p % BT
        pm = (cell < B) & (t < T)
        dt = tl.load(dt_ptr + cell * stb + t * stt, mask=pm, other=0.0)
        h = tl.maximum(dt, 0.0)
        for _ in range(n_dbl):
            h = h * 0.5
        return cell, t, pm, dt, h

    @triton.jit
    def _load_cells(A_ptr, g_ptr, pid, B, sAb, sAi, sAj, sgb, sgd, D: tl.constexpr, DP: tl.constexpr,
                    BC: tl.constexpr, BT: tl.constexpr):
        """A (BP, DP, DP) and q = g^2 (BP, DP) of every pair's cell, zero-padded; the identity tile."""
        p = tl.arange(0, BC * BT)
        cell = pid * BC + p // BT
        i = tl.arange(0, DP)
        cm = cell < B
        i3 = i[None, :, None]
        j3 = i[None, None, :]
        c3 = cell[:, None, None]
        A = tl.load(A_ptr + c3 * sAb + i3 * sAi + j3 * sAj, mask=cm[:, None, None] & (i3 < D) & (j3 < D), other=0.0)
        g = tl.load(g_ptr + cell[:, None] * sgb + i[None, :] * sgd, mask=cm[:, None] & (i[None, :] < D), other=0.0)
        eye = tl.where((i3 == j3) & (c3 >= 0), 1.0, 0.0).to(A.dtype)
        return A, g * g, eye

    @triton.jit
    def _taylor(Z, T0, M: tl.constexpr):
        """F0 = E0 - I = sum_{1<=k<=M} Z^k / k! and S0 = sum_{n<=M} T_n."""
        T = T0
        S = T0
        P = Z
        F = Z
        for n in tl.static_range(1, M + 1):
            W = _mm(Z, T)
            T = _over(W + _tr(W), n + 1)
            S = S + T
            if n < M:
                P = _over(_mm(P, Z), n + 1)
                F = F + P
        return F, S

    @triton.jit
    def _double(F, S):
        """One doubling with E = I + F carried as F: S + E S E^T and E^2 - I."""
        W = _mm(F, S)
        return 2.0 * F + _mm(F, F), 2.0 * S + W + _tr(W) + _mmt(W, F)

    @triton.jit
    def _sde_cov_fwd_kernel(A_ptr, dt_ptr, g_ptr, S_ptr, B, T, n_dbl, sAb, sAi, sAj, stb, stt, sgb, sgd,
                            D: tl.constexpr, DP: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr, M: tl.constexpr):
        """S (B, T, D, D) contiguous from A (B, D, D), dt (B, T) and g (per cell: sgb = its row stride;
        shared: sgb = 0), any strides; n_dbl = s."""
        pid = tl.program_id(0).to(tl.int64)
        A, q, eye = _load_cells(A_ptr, g_ptr, pid, B, sAb, sAi, sAj, sgb, sgd, D, DP, BC, BT)
        Qd = eye * q[:, :, None]
        i = tl.arange(0, DP)
        i3 = i[None, :, None]
        j3 = i[None, None, :]
        for t0 in range(0, T, BT):
            cell, t, pm, dt, h = _pairs(dt_ptr, pid, t0, B, T, stb, stt, n_dbl, BC, BT)
            h3 = h[:, None, None]
            F, S = _taylor(A * h3, Qd * h3, M)
            for _ in range(n_dbl):
                F, S = _double(F, S)
            S = (S + _tr(S)) * 0.5
            off = ((cell * T + t) * D)[:, None, None] * D + i3 * D + j3
            tl.store(S_ptr + off, S, mask=pm[:, None, None] & (i3 < D) & (j3 < D))

    @triton.jit
    def _pick(stack, lv, level):
        """Level ``level`` of a (LMAX, BP, DP, DP) stack."""
        return tl.sum(tl.where(lv == level, stack, 0.0), axis=0)

    @triton.jit
    def _sde_cov_bwd_kernel(A_ptr, dt_ptr, g_ptr, G_ptr, dA_ptr, ddt_ptr, dg_ptr, B, T, n_dbl,
                            sAb, sAi, sAj, stb, stt, sgb, sgd,
                            D: tl.constexpr, DP: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr, M: tl.constexpr,
                            LMAX: tl.constexpr):
        """dA (B, D, D), ddt (B, T) and dgc (B, D) (per cell; the caller sums it over cells for a shared
        g) from the upstream G (B, T, D, D) contiguous; inputs as the forward's.  Registers only."""
        pid = tl.program_id(0).to(tl.int64)
        A, q, eye = _load_cells(A_ptr, g_ptr, pid, B, sAb, sAi, sAj, sgb, sgd, D, DP, BC, BT)
        Qd = eye * q[:, :, None]
        i = tl.arange(0, DP)
        i3 = i[None, :, None]
        j3 = i[None, None, :]
        lv = tl.arange(0, LMAX)[:, None, None, None]
        dA = A * 0.0
        dq = q * 0.0
        for t0 in range(0, T, BT):
            cell, t, pm, dt, h = _pairs(dt_ptr, pid, t0, B, T, stb, stt, n_dbl, BC, BT)
            h3 = h[:, None, None]
            Z = A * h3
            T0 = Qd * h3
            # forward, keeping the doublings' inputs of levels < LMAX
            F, S = _taylor(Z, T0, M)
            stF = tl.zeros((LMAX, BC * BT, DP, DP), dtype=A.dtype)
            stS = tl.zeros((LMAX, BC * BT, DP, DP), dtype=A.dtype)
            for lev in range(n_dbl):
                stF = tl.where(lv == lev, F[None, :, :, :], stF)
                stS = tl.where(lv == lev, S[None, :, :, :], stS)
                F, S = _double(F, S)
            # upstream, symmetrised
            off = ((cell * T + t) * D)[:, None, None] * D + i3 * D + j3
            G = tl.load(G_ptr + off, mask=pm[:, None, None] & (i3 < D) & (j3 < D), other=0.0)
            Sb = (G + _tr(G)) * 0.5
            Eb = Sb * 0.0
            # the doublings in reverse
            for r in range(n_dbl):
                lev = n_dbl - 1 - r
                Fi = _pick(stF, lv, tl.minimum(lev, LMAX - 1))
                Si = _pick(stS, lv, tl.minimum(lev, LMAX - 1))
                for _ in range(LMAX - 1, lev):  # levels beyond the stack: recomputed
                    Fi, Si = _double(Fi, Si)
                Ei = eye + Fi
                Eb = 2.0 * _mm(Sb, _mm(Ei, Si)) + _mmt(Eb, Ei) + _mtm(Ei, Eb)
                W = _mm(_mtm(Ei, Sb), Ei)
                Sb = Sb + (W + _tr(W)) * 0.5
            # the Taylor chains again, kept: T_{n-1} and P_{n-1} = Z^(n-1) / (n-1)!
            Ts = (T0,)
            Ps = (eye,)
            Tn = T0
            P = eye
            for n in tl.static_range(1, M):
                W = _mm(Z, Tn)
                Tn = _over(W + _tr(W), n + 1)
                P = _over(_mm(P, Z), n)
                Ts = Ts + (Tn,)
                Ps = Ps + (P,)
            # ... in reverse: Gb = adjoint of T_n, Pb = adjoint of P_n
            Gb = Sb
            Pb = Eb
            Zb = _over(_mm(Gb, Ts[M - 1]), M + 1, 2.0) + _over(_mtm(Ps[M - 1], Pb), M)
            for n in tl.static_range(M - 1, 0, -1):
                W = _mtm(Z, Gb)
                Gb = Sb + _over(W + _tr(W), n + 2)
                Pb = Eb + _over(_mmt(Pb, Z), n + 1)
                Zb = Zb + _over(_mm(Gb, Ts[n - 1]), n + 1, 2.0) + _over(_mtm(Ps[n - 1], Pb), n)
            W = _mtm(Z, Gb)
            Gb = Sb + (W + _tr(W)) * 0.5  # adjoint of T_0 = h Q
            dq_p = tl.sum(tl.where(i3 == j3, Gb, 0.0), axis=2)  # diag(Gbar_0)
            hb = tl.sum(tl.sum(Zb * A, axis=2), axis=1) + tl.sum(dq_p * q, axis=1)
            tl.store(ddt_ptr + cell * T + t, tl.where(dt > 0, hb * (h / tl.where(dt > 0, dt, 1.0)), 0.0), mask=pm)
            dA = dA + Zb * h3
            dq = dq + dq_p * h[:, None]
        # per cell: the sums over its pairs
        cc = pid * BC + tl.arange(0, BC)
        ccm = cc < B
        dA_c = tl.sum(tl.reshape(dA, (BC, BT, DP, DP)), axis=1)
        c3 = cc[:, None, None]
        tl.store(dA_ptr + c3 * (D * D) + i3 * D + j3, dA_c, mask=ccm[:, None, None] & (i3 < D) & (j3 < D))
        dq_c = tl.sum(tl.reshape(dq, (BC, BT, DP)), axis=1)
        gm = ccm[:, None] & (i[None, :] < D)
        g = tl.load(g_ptr + cc[:, None] * sgb + i[None, :] * sgd, mask=gm, other=0.0)
        tl.store(dg_ptr + cc[:, None] * D + i[None, :], 2.0 * g * dq_c, mask=gm)


def _scalars(A, dt, g, n_dbl):
    """The run-time scalars of both kernels, by their parameter names."""
    shared = g.dim() == 1
    return dict(B=A.shape[0], T=dt.shape[1], n_dbl=n_dbl, sAb=A.stride(0), sAi=A.stride(1), sAj=A.stride(2),
                stb=dt.stride(0), stt=dt.stride(1), sgb=0 if shared else g.stride(0), sgd=g.stride(-1))


def forward_launch(A, dt, g, S, n_dbl):
    """(kernel, grid, keyword arguments) of the forward: S (B, T, D, D) contiguous from A, dt, g
    (validated, any strides) with n_dbl = ``doublings(A, dt)``."""
    B, D, _ = A.shape
    cfg = config("fwd", D, A.dtype, dt.shape[1])
    kw = dict(A_ptr=A, dt_ptr=dt, g_ptr=g, S_ptr=S, **_scalars(A, dt, g, n_dbl),
              **launch_kwargs(_sde_cov_fwd_kernel, cfg))
    return _sde_cov_fwd_kernel, (triton.cdiv(B, cfg["BC"]),), kw


def backward_launch(A, dt, g, G, dA, ddt, dgc, n_dbl):
    """(kernel, grid, keyword arguments) of the backward: dA (B, D, D), ddt (B, T), dgc (B, D)
    contiguous from the upstream G (B, T, D, D) contiguous."""
    B, D, _ = A.shape
    cfg = config("bwd", D, A.dtype, dt.shape[1])
    kw = dict(A_ptr=A, dt_ptr=dt, g_ptr=g, G_ptr=G, dA_ptr=dA, ddt_ptr=ddt, dg_ptr=dgc,
              **_scalars(A, dt, g, n_dbl), **launch_kwargs(_sde_cov_bwd_kernel, cfg))
    return _sde_cov_bwd_kernel, (triton.cdiv(B, cfg["BC"]),), kw


if HAS_TRITON:
    _BOTH = (torch.float32, torch.float64)
    VARIANT = KernelVariant(
        name="sde_cov", dims={dt: range(1, MAX_D + 1) for dt in _BOTH},
        kernels={"fwd": _sde_cov_fwd_kernel, "bwd": _sde_cov_bwd_kernel}, config=config,
        # D = 5 (the paper's), float32, sm_90 (the rest, e.g. D = 16 in float64, three minutes of ptxas
        # alone, is compiled with every configuration: ``-m compile_all``).
        representative=tuple((kind, 5, torch.float32, 90) for kind in ("fwd", "bwd")),
        forward_launch=forward_launch, backward_launch=backward_launch, times=(1, 2, 4, 8, 16, 32, 64, 128))
    VARIANTS = (VARIANT,)


def sde_cov_forward(A, dt, g, n_dbl):
    """Launch the forward; returns S (B, T, D, D) contiguous."""
    B, D, _ = A.shape
    S = torch.empty((B, dt.shape[1], D, D), dtype=A.dtype, device=A.device)
    kernel, grid, kw = forward_launch(A, dt, g, S, n_dbl)
    kernel[grid](**kw)
    return S


def sde_cov_backward(A, dt, g, G, n_dbl):
    """Launch the backward; returns dA (B, D, D), ddt (B, T), dg of g's shape."""
    B, D, _ = A.shape
    dA = torch.empty((B, D, D), dtype=A.dtype, device=A.device)
    ddt = torch.empty(dt.shape, dtype=A.dtype, device=A.device)
    dgc = torch.empty((B, D), dtype=A.dtype, device=A.device)
    kernel, grid, kw = backward_launch(A, dt, g, G.contiguous(), dA, ddt, dgc, n_dbl)
    kernel[grid](**kw)
    return dA, ddt, dgc.sum(0) if g.dim() == 1 else dgc


class SdeCovarianceFunction(torch.autograd.Function):
    """Autograd wrapper: one launch forward, one backward; first derivatives only."""

    @staticmethod
    def forward(ctx, A, dt, g):
        """S (B, T, D, D); A, dt, g and s saved for the backward."""
        n_dbl, _ = doublings(A, dt)
        ctx.n_dbl = n_dbl
        ctx.save_for_backward(A, dt, g)
        return sde_cov_forward(A, dt, g, n_dbl)

    @staticmethod
    def backward(ctx, gS):
        """dA, ddt, dg by the backward launch; refuses to be differentiated again."""
        A, dt, g = ctx.saved_tensors
        with torch.no_grad():
            grads = sde_cov_backward(A, dt, g, gS, ctx.n_dbl)
        return first_order_only(SECOND_ORDER, grads, (A, dt, g))


@torch.compiler.disable
def sde_covariance_triton(A: torch.Tensor, dt: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """S (B, T, D, D) through the Triton kernels (D <= MAX_D; A (B, D, D), dt (B, T), g (B, D) or (D,),
    one dtype and device); differentiable in A, dt and g (first derivatives)."""
    if A.shape[0] == 0 or dt.shape[1] == 0:
        return sde_covariance_torch(A, dt, g)
    return SdeCovarianceFunction.apply(A, dt, g)
