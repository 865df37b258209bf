"""Pure-PyTorch covariance of ``local_linear_sde_step`` (Taylor series and doublings, ``common.py``)
and the sample's noise L eps.

Only pairs with dt > 0 are computed: noise acts forward in time, every other pair's S is 0 (in
training on five snapshots half the pairs decode backwards or to the cell's own time).  The series'
degree is the one the largest scaled norm needs (``degree``), not the worst case's.

For D <= ``LANES_MATMUL_MAX_D`` the Taylor terms are formed once per cell, not per pair:
K_n = L^n(Q) / (n+1)! and A^n / n! (n <= m), so that a pair's S(h) = sum_n h^(n+1) K_n and
E(h) = sum_n h^n A^n / n! are Horner sums in its own h, O(m D^2); only the s doublings cost O(D^3)
per pair.  Matrices are (D, D, N) with the cells or pairs last and every product a broadcast
multiply-and-sum; the backward is analytic (first derivatives): the doublings reversed from saved
states, the Horner sums' adjoints summed per cell, then the chains reversed once per cell.
Above that D, per-pair Taylor terms in batched GEMMs, differentiated by autograd.
"""
from __future__ import annotations

import math

import torch

from ..utils import first_order_only
from .common import TAYLOR, doublings, guarded_cholesky

# Up to this D the lanes form (above); beyond it per-pair batched GEMMs.  Covariance forward+backward
# on one core of a 2-core x86-64 CPU (AMD EPYC), dt uniform in [0, 4], lanes against GEMMs: 200 cells
# x 5 times: 6.0 / 19.7 ms at D = 5, 10.1 / 44.8 at D = 7, 15.9 / 23.4 at D = 8, 37.7 / 39.8 at
# D = 10; 2048 x 5: 145 / 495 ms at D = 7, but 249 / 216 at D = 8 and 901 / 391 at D = 10 (the lanes'
# (2, D, D, D, cells) products outgrow the caches).
LANES_MATMUL_MAX_D = 7

SECOND_ORDER = ("sde_covariance: the torch backend has first derivatives only for D <= 7 and the triton backend "
                "for every D; use backend='reference' for second derivatives (e.g. create_graph=True)")


def _mm(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """X Y for matrices (..., D, D, N) with the batch last (leading dimensions broadcast)."""
    return (X.unsqueeze(-2) * Y.unsqueeze(-4)).sum(-3)


def _tr(X: torch.Tensor) -> torch.Tensor:
    """X^T for (..., D, D, N)."""
    return X.transpose(-3, -2)


def forward_pairs(A: torch.Tensor, dt: torch.Tensor):
    """The pairs that carry noise, their scaled steps and the series' degree (one host synchronisation).

    Returns the flat (cell, time) index (P,) of the pairs with dt > 0 (or not a number, so that NaN
    propagates), h = dt / 2^s (P,) (differentiable in dt), s (``common.doublings``), and m: the
    degree that the largest scaled norm rho actually reached needs (``degree``)."""
    idx = (~(dt.detach() <= 0)).reshape(-1).nonzero()[:, 0]
    s, nu = doublings(A, dt)
    m = TAYLOR[A.dtype][1]
    if math.isfinite(nu):
        m = degree(nu / 2.0**s, A.dtype, m)
    return idx, dt.reshape(-1).index_select(0, idx) / 2.0 ** s, s, m


def degree(rho: float, dtype: torch.dtype, m_max: int) -> int:
    """The smallest degree m <= m_max whose first omitted term of S, at most (2 rho)^(m+1) / (m+2)!
    ||h Q|| for ||h A||_1 <= rho (||h L||_1 <= 2 rho), is below the unit roundoff of dtype (the omitted
    term of E is smaller still for m >= 2): 9 in float32 and 17 in float64 at rho = theta = 1/2, 5
    and 11 at rho = 1/8.  Measured (200 cells x 5 times, ||dt A||_1 up to 2.2, forward and backward of
    the noise, one core): 9-15% faster than the worst case's fixed degree (then 13 at theta = 1);
    theta = 1/2 rather than 1 (one doubling more, a lower degree) 5-7% faster again at D = 2-5 and
    no slower on the benchmark's inputs, and no term then exceeds the result by more than about e."""
    u = torch.finfo(dtype).eps / 2
    bound = rho  # (2 rho)^(m+1) / (m+2)! at m = 0
    for m in range(1, m_max + 1):
        bound *= 2 * rho / (m + 2)
        if bound <= u and m >= 2:
            return m
    return m_max


def _tie(*tensors: torch.Tensor) -> torch.Tensor:
    """An exact 0 that depends on every input (an empty sum): an all-zero result stays differentiable."""
    return sum(t.reshape(-1)[:0].sum() for t in tensors)


def sde_covariance_torch(A: torch.Tensor, dt: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """S (B, T, D, D): covariance of x(dt) given x(0) under dx = A x ds + diag(g) dW; 0 for dt <= 0.

    A (B, D, D), dt (B, T), g (B, D) or (D,); differentiable in A, dt and g (first derivatives for
    D <= ``LANES_MATMUL_MAX_D``, by autograd above)."""
    B, D, _ = A.shape
    T = dt.shape[1]
    idx, h, s, m = forward_pairs(A, dt)
    out = A.new_zeros(B * T, D, D) + _tie(A, dt, g)
    if idx.numel():
        out = out.index_copy(0, idx, _pair_covariance(A, g, idx, T, h, s, m))
    return out.reshape(B, T, D, D)


def sde_noise_torch(A: torch.Tensor, dt: torch.Tensor, g: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """L eps (B, T, D) with L L^T = S the covariance of ``sde_covariance_torch`` (the guarded
    Cholesky factor, ``common.guarded_cholesky``); 0 for dt <= 0.  eps (B, T, D)."""
    B, D, _ = A.shape
    T = dt.shape[1]
    if D <= LANES_MATMUL_MAX_D:
        return _NoiseLanes.apply(A, g, dt, eps)
    idx, h, s, m = forward_pairs(A, dt)
    out = A.new_zeros(B * T, D) + _tie(A, dt, g, eps)
    if idx.numel():
        S = _pair_covariance(A, g, idx, T, h, s, m)
        e = eps.reshape(B * T, D).index_select(0, idx)
        out = out.index_copy(0, idx, (guarded_cholesky(S) @ e[..., None])[..., 0])
    return out.reshape(B, T, D)


def _pair_covariance(A, g, idx, T, h, s, m):
    """S (P, D, D) of the pairs idx (flat (cell, time) indices, steps h): degree m, s doublings."""
    B, D, _ = A.shape
    q = g.expand(B, D) ** 2
    if D <= LANES_MATMUL_MAX_D:
        return _CovarianceLanes.apply(A, q.t(), h, idx, T, s, m).permute(2, 0, 1)
    cell = torch.div(idx, T, rounding_mode="floor")
    return _covariance_gemm(A.index_select(0, cell), q.index_select(0, cell), h, s, m)


def _covariance_gemm(A, q, h, s, m):
    """S (P, D, D) for per-pair A (P, D, D), q (P, D), h (P,): Taylor terms per pair in batched GEMMs
    (autograd)."""
    Z = h[:, None, None] * A
    term = torch.diag_embed(q) * h[:, None, None]  # T_0 = h Q
    S, F, P = term, Z, Z
    for n in range(1, m + 1):
        M = Z @ term
        term = (M + M.transpose(1, 2)) / (n + 1)  # T_n = h^(n+1) / (n+1)! L^n(Q), symmetric
        S = S + term
        if n < m:
            P = P @ Z / (n + 1)  # Z^(n+1) / (n+1)!
            F = F + P
    for _ in range(s):  # S <- S + E S E^T, E <- E^2 with E = I + F carried as F (``common``)
        M = F @ S
        S = 2 * S + M + M.transpose(1, 2) + M @ F.transpose(1, 2)
        F = 2 * F + F @ F
    return 0.5 * (S + S.transpose(1, 2))


def _chain(Al: torch.Tensor, q: torch.Tensor, m: int):
    """Per cell C[n] = (K_n, A^(n+1) / (n+1)!) for n <= m, (m + 1, 2, D, D, B): K_0 = diag(q),
    K_n = (A K_{n-1} + K_{n-1} A^T) / (n + 1) = L^n(Q) / (n+1)!, and the powers from C[0] = A by
    A C[n-1] / (n + 1); and As[n - 1] = A / (n + 1) (m, D, D, B), which steps both chains.
    Al (D, D, B), q (D, B)."""
    D, _, B = Al.shape
    n = torch.arange(1, m + 1, dtype=Al.dtype, device=Al.device)
    As = (1 / (n + 1))[:, None, None, None] * Al
    C = Al.new_empty(m + 1, 2, D, D, B)
    eye = torch.eye(D, dtype=Al.dtype, device=Al.device)[:, :, None]
    torch.mul(eye, q[None], out=C[0, 0])
    C[0, 1] = Al
    work = Al.new_empty(2, D, D, D, B)
    for k in range(1, m + 1):
        torch.mul(As[k - 1].unsqueeze(-2), C[k - 1].unsqueeze(-4), out=work)  # A C[k-1] / (k+1), both chains
        torch.sum(work[1], -3, out=C[k, 1])
        M = work[0].sum(-3)
        torch.add(M, _tr(M), out=C[k, 0])
    return C, As


def _chain_backward(As: torch.Tensor, C: torch.Tensor, Cb: torch.Tensor):
    """Adjoint of ``_chain``: (dAl (D, D, B), dq (D, B)) from Cb, the adjoint of every C[n]."""
    m = As.shape[0]
    dAs = C.new_empty((m,) + C.shape[1:])  # per chain
    Mb = torch.empty_like(Cb[0])
    work = C.new_empty(Mb.shape[:-1] + Mb.shape[-2:])  # (2, D, D, D, B)
    G = Cb[m]
    for k in range(m, 0, -1):
        torch.add(G[0], _tr(G[0]), out=Mb[0])  # adjoint of M = As[k-1] C[k-1] (C[k, 0] = M_K + M_K^T)
        Mb[1].copy_(G[1])
        torch.mul(Mb.unsqueeze(-3), C[k - 1].unsqueeze(-4), out=work)  # Mb C[k-1]^T: [i, l, j] products
        torch.sum(work, -2, out=dAs[k - 1])
        G = Cb[k - 1] + _mtm(As[k - 1], Mb)
    n = torch.arange(1, m + 1, dtype=As.dtype, device=As.device)
    w = (1 / (n + 1))[:, None, None, None, None]
    return (w * dAs).sum((0, 1)) + G[1], torch.diagonal(G[0], dim1=0, dim2=1).t()  # G[1]: C[0, 1] = A


def _mtm(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """X^T Y for (..., D, D, N): sum_k X[k, i] Y[k, j]."""
    return (X.unsqueeze(-2) * Y.unsqueeze(-3)).sum(-4)


def _lanes_forward(A, q, h, idx, T, s, m):
    """S (D, D, P) of the pairs idx (flat (cell, time) indices, steps h) from per-cell chains, and
    what ``_lanes_backward`` needs.

    Forward: C = ``_chain``; H = sum_n h^n C[n] by Horner for every (cell, time) (the pairs that
    carry no noise have h = 0), S_0 = h H_K, F_0 = h H_F (E_0 = I + F_0); s doublings
    S <- S + E S E^T, E <- E E in F (``common``; the last F is not needed); output (S + S^T) / 2.
    A (B, D, D), q = g^2 (D, B), h (P,)."""
    B, D, _ = A.shape
    Al = A.permute(1, 2, 0).contiguous()
    C, As = _chain(Al, q, m)
    C = C.view(m + 1, 2 * D * D, B)
    col = _column(idx, T, B)
    hd = h.new_zeros(T * B).index_copy_(0, col, h).view(T, B)  # (time, cell): cells last
    H = C[m, :, None].expand(2 * D * D, T, B)
    for n in range(m - 1, -1, -1):
        H = torch.addcmul(C[n, :, None], H, hd)
    H = H.reshape(2, D, D, T * B).index_select(3, col)
    S, F = H[0] * h, H[1] * h
    states = []
    for i in range(s):
        states += [F, S]
        M = _mm(F, S)
        S = 2 * S + M + _tr(M) + _mm(M, _tr(F))
        if i < s - 1:
            F = 2 * F + _mm(F, F)
    return 0.5 * (S + _tr(S)), (As, C, H, hd, h, col, *states)


def _lanes_backward(saved, gS, need_dh: bool = True):
    """dA (B, D, D), dq (D, B), dh (P,) (None without ``need_dh``) from the adjoint gS (D, D, P) of
    ``_lanes_forward``'s S.

    The doublings in reverse, Sb <- Sb + E^T Sb E and Eb <- 2 Sb E S + Eb E^T + E^T Eb (Sb and S
    symmetric; Fb = Eb); then Cb[n] = sum over a cell's pairs of h^n Hb with Hb = h (Sb_0, Fb_0),
    and dh = <(Sb_0, Fb_0), H> + sum_n n h^(n-1) <C[n], Hb> (two batched products per cell); then
    ``_chain_backward``."""
    As, C, H, hd, h, col, *states = saved
    Sb, Fb = _undouble(states, 0.5 * (gS + _tr(gS)))
    m1, K, B = C.shape
    T = hd.shape[0]
    SF = torch.stack([Sb, Fb])
    Hb = (SF * h).reshape(K, -1)  # adjoint of H (K, P): S_0 = h H_K, F_0 = h H_F
    dense = Hb.new_zeros(K, T * B).index_copy_(1, col, Hb).view(K, T, B)
    Cb = torch.empty_like(C)  # sum over a cell's times of h^n Hb
    W = dense
    for n in range(m1):
        torch.sum(W, 1, out=Cb[n])
        if n < m1 - 1:
            W = W * hd
    dh = None
    if need_dh:
        dH = C[m1 - 1, :, None] * (m1 - 1)  # dH/dh = sum_n n h^(n-1) C[n], by Horner
        for n in range(m1 - 2, 0, -1):
            dH = torch.addcmul(C[n, :, None] * n, dH, hd)
        dh = (dense * dH).sum(0).reshape(-1).index_select(0, col) + (SF * H).sum((0, 1, 2))
    D = As.shape[1]
    dAl, dq = _chain_backward(As, C.view(m1, 2, D, D, B), Cb.view(m1, 2, D, D, B))
    return dAl.permute(2, 0, 1), dq, dh


class _CovarianceLanes(torch.autograd.Function):
    """S (D, D, P) of the pairs idx (``_lanes_forward``), with its analytic backward
    (``_lanes_backward``, first derivatives)."""

    @staticmethod
    def forward(ctx, A, q, h, idx, T, s, m):
        """A (B, D, D), q = g^2 (D, B), h (P,), idx (P,) -> S (D, D, P)."""
        S, saved = _lanes_forward(A, q, h, idx, T, s, m)
        ctx.inputs = (A, q, h)  # only to tie a second derivative to its error
        ctx.save_for_backward(*saved)
        return S

    @staticmethod
    def backward(ctx, gS):
        """dA, dq, dh (first derivatives only)."""
        with torch.no_grad():
            grads = _lanes_backward(ctx.saved_tensors, gS, ctx.needs_input_grad[2])
        return (*first_order_only(SECOND_ORDER, grads, ctx.inputs), None, None, None, None)


class _NoiseLanes(torch.autograd.Function):
    """L eps (B, T, D) for D <= ``LANES_MATMUL_MAX_D`` in one node: the pairs with dt > 0
    (``forward_pairs``), their covariance (``_lanes_forward``), its guarded Cholesky factor
    (``_cholesky_lanes``) times eps, scattered into zeros; the backward is analytic throughout
    (the factor's by reversing its column loop, ``_cholesky_lanes_backward``), first derivatives."""

    @staticmethod
    def forward(ctx, A, g, dt, eps):
        """A (B, D, D), g (B, D) or (D,), dt (B, T), eps (B, T, D) -> (B, T, D)."""
        B, D, _ = A.shape
        T = dt.shape[1]
        idx, h, s, m = forward_pairs(A, dt)
        out = A.new_zeros(B * T, D)
        ctx.inputs, ctx.s = (A, g, dt, eps), s
        if not idx.numel():
            ctx.save_for_backward(idx)
            return out.view(B, T, D)
        q = g.expand(B, D) ** 2
        S, saved = _lanes_forward(A, q.t(), h, idx, T, s, m)
        e = eps.reshape(B * T, D).index_select(0, idx).t()  # (D, P)
        L, roots, oks = _cholesky_lanes(S)
        out.index_copy_(0, idx, (L * e[None]).sum(1).t())
        ctx.save_for_backward(idx, g, e, L, roots, oks, *saved)
        return out.view(B, T, D)

    @staticmethod
    def backward(ctx, gY):
        """dA, dg, ddt, deps (first derivatives only)."""
        A, _, dt, _ = ctx.inputs
        idx, *rest = ctx.saved_tensors
        B, D, _ = A.shape
        T = dt.shape[1]
        if not idx.numel():  # no pair carries noise: zero gradients
            zeros = tuple(torch.zeros_like(t) if ctx.needs_input_grad[i] else None for i, t in enumerate(ctx.inputs))
            return first_order_only(SECOND_ORDER, zeros, ctx.inputs)
        g_, e, L, roots, oks, *saved = rest
        ddt = deps = None
        with torch.no_grad():
            y = gY.reshape(B * T, D).index_select(0, idx).t()  # (D, P)
            gS = _cholesky_lanes_backward(L, roots, oks, y[:, None] * e[None])  # Lb = y e^T on the factor
            dA, dq, dh = _lanes_backward(saved, gS, ctx.needs_input_grad[2])
            dqg = 2 * g_.expand(B, D) * dq.t()  # q = g^2
            dg = dqg if g_.dim() == 2 else dqg.sum(0)
            if dh is not None:
                ddt = gY.new_zeros(B * T).index_copy_(0, idx, dh / 2.0 ** ctx.s).view(B, T)
            if ctx.needs_input_grad[3]:
                deps = gY.new_zeros(B * T, D).index_copy_(0, idx, (L * y[:, None]).sum(0).t()).view(B, T, D)
        return first_order_only(SECOND_ORDER, (dA, dg, ddt, deps), ctx.inputs)


def _column(idx: torch.Tensor, T: int, B: int) -> torch.Tensor:
    """Flat (cell, time) indices b T + t as (time, cell) indices t B + b."""
    return (idx % T) * B + torch.div(idx, T, rounding_mode="floor")


def _undouble(states, Sb):
    """The doublings' adjoint: from Sb (D, D, P) of the output, (Sb, Fb) of S_0 and F_0 (F = E - I)."""
    Eb = None
    eye = torch.eye(Sb.shape[0], dtype=Sb.dtype, device=Sb.device)[:, :, None]
    for i in range(len(states) // 2 - 1, -1, -1):
        E, S = states[2 * i] + eye, states[2 * i + 1]
        M = _mm(Sb, E)
        Eb_new = 2 * _mm(M, S)
        if Eb is not None:  # the last doubling's E is not an output: no adjoint there
            Eb_new = Eb_new + _mm(Eb, _tr(E)) + _mm(_tr(E), Eb)
        Eb = Eb_new
        Sb = Sb + _mm(_tr(E), M)
    return Sb, (torch.zeros_like(Sb) if Eb is None else Eb)


def cholesky_lanes(S: torch.Tensor) -> torch.Tensor:
    """The guarded Cholesky factor (``common.guarded_cholesky``) of symmetric positive semi-definite
    S (D, D, N) with the matrices last, as (D, D, N) (the noise differentiates it analytically: ``_NoiseLanes``)."""
    return _cholesky_lanes(S)[0]


def _cholesky_lanes(S: torch.Tensor):
    """(L, roots, oks): the guarded factor of S (D, D, N) column by column, with each column's pivot
    root (D, N) and whether the pivot was kept (D, N) (a pivot at or below D * unit roundoff * max
    diag(S) ends its column, as ``guarded_cholesky``)."""
    D = S.shape[0]
    tol = D * torch.finfo(S.dtype).eps * torch.diagonal(S, dim1=0, dim2=1).amax(-1).clamp_min(0)
    rows = torch.arange(D, device=S.device)[:, None]
    L = torch.empty_like(S)
    roots, oks = S.new_empty(D, S.shape[-1]), torch.empty(D, S.shape[-1], dtype=torch.bool, device=S.device)
    for j in range(D):
        r = S[:, j]
        for k in range(j):
            r = torch.addcmul(r, L[:, k], L[j, k], value=-1.0)
        ok = ~(r[j] <= tol)  # NaN stays NaN
        root = torch.sqrt(torch.where(ok, r[j], torch.ones_like(r[j])))
        L[:, j] = torch.where(ok & (rows >= j), r / root, torch.zeros_like(r))
        roots[j], oks[j] = root, ok
    return L, roots, oks


def _cholesky_lanes_backward(L, roots, oks, Lb):
    """The adjoint of S from Lb (D, D, N), the adjoint of ``_cholesky_lanes``'s factor: its column
    loop reversed.  Column j is c_j = r_j / root_j on rows >= j (0 where the pivot was dropped), with
    r_j = S[:, j] - sum_{k<j} c_k c_k[j] and root_j = sqrt(r_j[j]); so rb_j = cb_j / root_j on those
    rows, r_j[j] gains -<rb_j, c_j> / (2 root_j), S[:, j] gains rb_j, and each earlier column k loses
    rb_j c_k[j] and, at row j, <rb_j, c_k>.  Only S's lower triangle receives an adjoint."""
    D = L.shape[0]
    rows = torch.arange(D, device=L.device)[:, None]
    Cb = Lb.clone()
    Sb = torch.zeros_like(L)
    for j in range(D - 1, -1, -1):
        rb = torch.where(oks[j] & (rows >= j), Cb[:, j] / roots[j], torch.zeros_like(Cb[:, j]))
        rb[j] -= (rb * L[:, j]).sum(0) / (2 * roots[j])
        Sb[:, j] = rb
        for k in range(j):
            Cb[:, k].addcmul_(rb, L[j, k], value=-1.0)
            Cb[j, k] -= (rb * L[:, k]).sum(0)
    return Sb
