"""Lane-group forward kernel of ``local_linear_step``: float32, 5 < D <= 16.

The register kernels of ``triton_impl.py`` give each cell one lane; beyond D = 5 a cell's
operators no longer fit one thread's registers.  Here a cell has G lanes (G = 4 for D <= 8, 8 up
to D = 16; 32 / G cells per one-warp program) and each lane owns R = ceil(D / G) rows of every
D x D operator, as registers unrolled at compile time.  Every tensor has the shape (32 / G, G),
one element per lane:

* a matrix-vector product is R * D FMAs per lane on its own rows, giving the result distributed
  (row g R + r at lane g);
* the full vector every lane needs for the next product is gathered by D sums across the G lanes
  of the cell (butterfly shuffles inside the warp): no shared memory and no barrier anywhere.

The scheme is the register kernels' (``triton_impl``): per cell the anchor-step matrices
E+- = p_M(+-Z) (Paterson-Stockmeyer; the polynomials commute with Z, so every product is "rows
of the left operand times rows of the right one broadcast in turn"); per block of BT target
times the anchors are marched once, every pair captures its nearest anchor and is finished by a
degree-MF Horner, V = (Z X) / h.  The backward of these D is ``triton_tiled``'s.
"""
from __future__ import annotations

import torch

from ..utils import HAS_TRITON, tl, triton
from .common import FINISH, NU_MAX, taylor_params

MIN_D, MAX_D = 6, 16


def uses_group_kernel(D: int, dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and MIN_D <= D <= MAX_D


def block_config(D: int, dtype: torch.dtype = torch.float32) -> dict:
    theta, m = taylor_params(dtype)
    G = 4 if D <= 8 else 8
    return dict(D=D, G=G, R=-(-D // G), BT=8 if G == 4 else 4, M=m, MF=FINISH[dtype], num_warps=1)


def all_configs(dtype: torch.dtype):
    return [block_config(D, dtype) for D in range(MIN_D, MAX_D + 1) if uses_group_kernel(D, dtype)]


if HAS_TRITON:
    from .triton_impl import _coefs, _pairs

    @triton.jit
    def _allsum(x, BC: tl.constexpr, G: tl.constexpr):
        """Sum over the G lanes of each cell, in every lane."""
        return tl.broadcast_to(tl.sum(x, axis=1)[:, None], (BC, G))

    @triton.jit
    def _top(x):
        """Largest element over the program (scalar)."""
        return tl.max(tl.max(x, axis=1), axis=0)

    @triton.jit
    def _gather(v, gi, D: tl.constexpr, R: tl.constexpr, BC: tl.constexpr, G: tl.constexpr):
        """Full vector (D tensors, equal across a cell's lanes) from its distributed rows (R)."""
        out = ()
        for j in tl.static_range(D):
            out = out + (_allsum(tl.where(gi == j // R, v[j % R], 0.0), BC, G),)
        return out

    @triton.jit
    def _mvr(Zr, y, D: tl.constexpr, R: tl.constexpr):
        """This lane's rows of Z y (R tensors), y full."""
        out = ()
        for r in tl.static_range(R):
            acc = Zr[r * D] * y[0]
            for j in tl.static_range(1, D):
                acc = tl.fma(Zr[r * D + j], y[j], acc)
            out = out + (acc,)
        return out

    @triton.jit
    def _mmr(Pr, Qr, gi, n, D: tl.constexpr, R: tl.constexpr, BC: tl.constexpr, G: tl.constexpr, Cr=None):
        """This lane's rows of P Q (+ C): Q's rows are broadcast one at a time, in a loop over
        n = D given at run time so that the compiler keeps it a loop (small code, fast compiles)."""
        acc = ()
        for e in tl.static_range(R * D):
            if Cr is None:
                acc = acc + (tl.zeros_like(Pr[0]),)
            else:
                acc = acc + (Cr[e],)
        for j in range(0, n):
            q = ()  # row j of Q, in every lane of the cell
            for k in tl.static_range(D):
                v = tl.where(gi * R == j, Qr[k], 0.0)
                for r in tl.static_range(1, R):
                    v = tl.where(gi * R + r == j, Qr[r * D + k], v)
                q = q + (_allsum(v, BC, G),)
            nxt = ()
            for r in tl.static_range(R):
                p = Pr[r * D]  # P[row, j]
                for jj in tl.static_range(1, D):
                    p = tl.where(j == jj, Pr[r * D + jj], p)
                for k in tl.static_range(D):
                    nxt = nxt + (tl.fma(p, q[k], acc[r * D + k]),)
            acc = nxt
        return acc

    @triton.jit
    def _block_rows(Wr, W2r, coef, q: tl.constexpr, gi, D: tl.constexpr, R: tl.constexpr, Pr=None):
        """Rows of B_q = c_3q I + c_3q+1 W + c_3q+2 W^2 (+ P)."""
        out = ()
        for r in tl.static_range(R):
            for k in tl.static_range(D):
                v = Wr[r * D + k] * coef[3 * q + 1] + W2r[r * D + k] * coef[3 * q + 2]
                v += tl.where(gi * R + r == k, coef[3 * q], 0.0)
                if Pr is not None:
                    v += Pr[r * D + k]
                out = out + (v,)
        return out

    @triton.jit
    def _step_rows(Zr, SGN: tl.constexpr, gi, n, D: tl.constexpr, R: tl.constexpr, BC: tl.constexpr,
                   G: tl.constexpr, M: tl.constexpr):
        """Rows of p_M(SGN Z) by Paterson-Stockmeyer (``triton_impl._step_matrix``), with
        P_q = B_q + P_{q+1} W^3 (p commutes with W)."""
        Wr = ()
        for e in tl.static_range(R * D):
            Wr = Wr + (Zr[e] * SGN,)
        W2r = _mmr(Wr, Wr, gi, n, D, R, BC, G)
        W3r = _mmr(W2r, Wr, gi, n, D, R, BC, G)
        coef = _coefs(Zr[0].dtype, M)
        P = _block_rows(Wr, W2r, coef, M // 3, gi, D, R)
        for q in tl.static_range(1, M // 3 + 1):
            P = _block_rows(Wr, W2r, coef, M // 3 - q, gi, D, R, _mmr(P, W3r, gi, n, D, R, BC, G))
        return P

    @triton.jit
    def _march(E, x0f, Y, ok, neg, lev, NEG: tl.constexpr, gi, D: tl.constexpr, R: tl.constexpr,
               BC: tl.constexpr, G: tl.constexpr, BT: tl.constexpr):
        """Anchor states of one direction, distributed: Y[k*R + r] = rows of E^lev[k] x0."""
        L = tl.zeros_like(gi)
        for k in tl.static_range(BT):
            L = tl.maximum(L, tl.where(ok[k] & (neg[k] == NEG), lev[k], 0))
        y = x0f
        for a in range(1, _top(L) + 1):
            yd = _mvr(E, y, D, R)
            Yn = ()
            for k in tl.static_range(BT):
                at = ok[k] & (neg[k] == NEG) & (lev[k] == a)
                for r in tl.static_range(R):
                    Yn = Yn + (tl.where(at, yd[r], Y[k * R + r]),)
            Y = Yn
            y = _gather(yd, gi, D, R, BC, G)
        return Y

    @triton.jit
    def _llstep_fwd_group_kernel(A_ptr, x0_ptr, dt_ptr, X_ptr, V_ptr, B, T, D_rt,
                                 sAb, sAi, sAj, sxb, sxd, stb, stt, theta, nu_max,
                                 D: tl.constexpr, G: tl.constexpr, R: tl.constexpr, BT: tl.constexpr,
                                 M: tl.constexpr, MF: tl.constexpr):
        """X, V (B, T, D) contiguous from A (B, D, D), x0 (B, D), dt (B, T), any strides.
        D_rt: D again, at run time (``_mmr``)."""
        BC: tl.constexpr = 32 // G
        pid = tl.program_id(0).to(tl.int64)
        cell = pid * BC + tl.arange(0, BC)[:, None] + tl.zeros((BC, G), tl.int64)
        gi = tl.arange(0, G)[None, :] + tl.zeros((BC, G), tl.int32)
        cm = cell < B
        Ar = ()
        for r in tl.static_range(R):
            for j in tl.static_range(D):
                row = gi * R + r
                Ar = Ar + (tl.load(A_ptr + cell * sAb + row * sAi + j * sAj, mask=cm & (row < D), other=0.0),)
        x0 = ()
        for r in tl.static_range(R):
            row = gi * R + r
            x0 = x0 + (tl.load(x0_ptr + cell * sxb + row * sxd, mask=cm & (row < D), other=0.0),)
        # ||A||_1 and h = theta / ||A||_1 as in triton_impl._load_cell.
        nrm = tl.zeros((BC, G), tl.float32)
        total = tl.zeros((BC, G), tl.float32)
        for j in tl.static_range(D):
            part = tl.abs(Ar[j])
            for r in tl.static_range(1, R):
                part += tl.abs(Ar[r * D + j])
            col = _allsum(part, BC, G)
            total += col
            nrm = tl.maximum(nrm, col)
        finite = total < float("inf")
        n_safe = tl.maximum(nrm, 1.1754943508222875e-38)
        live = nrm > 0
        h = tl.where(live, theta / n_safe, 1.0)
        inv_h = tl.where(live, n_safe / theta, 1.0)
        Zr = ()
        for e in tl.static_range(R * D):
            Zr = Zr + (Ar[e] * h,)
        # Highest anchor level per direction over the program.
        hi_pos = tl.zeros((BC, G), tl.int32)
        hi_neg = tl.zeros((BC, G), tl.int32) - 1
        for t0 in range(0, T, BT):
            inr, ok, neg, lev, rho = _pairs(dt_ptr, cell, cm, t0, T, stb, stt, nrm, finite, inv_h,
                                            theta, nu_max, BT)
            for k in tl.static_range(BT):
                hi_pos = tl.maximum(hi_pos, tl.where(ok[k] & ~neg[k], lev[k], 0))
                hi_neg = tl.maximum(hi_neg, tl.where(ok[k] & neg[k], lev[k], -1))
        top_pos = _top(hi_pos)
        top_neg = _top(hi_neg)
        Ep = Zr
        En = Zr
        if top_pos > 0:
            Ep = _step_rows(Zr, 1.0, gi, D_rt, D, R, BC, G, M)
        if top_neg > 0:
            En = _step_rows(Zr, -1.0, gi, D_rt, D, R, BC, G, M)
        x0f = _gather(x0, gi, D, R, BC, G)
        for t0 in range(0, T, BT):
            inr, ok, neg, lev, rho = _pairs(dt_ptr, cell, cm, t0, T, stb, stt, nrm, finite, inv_h,
                                            theta, nu_max, BT)
            # Anchor states, distributed: Y[k*R + r].
            Y = ()
            for k in tl.static_range(BT):
                Y = Y + x0
            # (No branch on the direction: its loop is empty when no pair needs it, and a
            # loop-invariant branch would make the compiler copy the whole time loop.)
            Y = _march(Ep, x0f, Y, ok, neg, lev, False, gi, D, R, BC, G, BT)
            Y = _march(En, x0f, Y, ok, neg, lev, True, gi, D, R, BC, G, BT)
            for k in tl.static_range(BT):
                yd = ()
                for r in tl.static_range(R):
                    yd = yd + (Y[k * R + r],)
                X = _gather(yd, gi, D, R, BC, G)
                Xd = yd
                for jj in tl.static_range(MF):  # X <- y + (rho / j) Z X, j = MF .. 1
                    W = _mvr(Zr, X, D, R)
                    c = rho[k] * (1.0 / (MF - jj))
                    Xd = ()
                    for r in tl.static_range(R):
                        Xd = Xd + (tl.fma(W[r], c, yd[r]),)
                    X = _gather(Xd, gi, D, R, BC, G)
                W = _mvr(Zr, X, D, R)
                for r in tl.static_range(R):
                    row = gi * R + r
                    m = inr[k] & (row < D)
                    off = (cell * T + t0 + k) * D + row
                    tl.store(X_ptr + off, Xd[r], mask=m)
                    tl.store(V_ptr + off, W[r] * inv_h, mask=m)


def forward_launch(A, x0, dt, X, V):
    """(kernel, grid, keyword arguments) of the forward launch."""
    cfg = block_config(x0.shape[1], A.dtype)
    theta, _ = taylor_params(A.dtype)
    B = x0.shape[0]
    kw = dict(A_ptr=A, x0_ptr=x0, dt_ptr=dt, X_ptr=X, V_ptr=V, B=B, T=dt.shape[1], D_rt=x0.shape[1],
              sAb=A.stride(0), sAi=A.stride(1), sAj=A.stride(2), sxb=x0.stride(0), sxd=x0.stride(1),
              stb=dt.stride(0), stt=dt.stride(1), theta=theta, nu_max=NU_MAX,
              D=cfg["D"], G=cfg["G"], R=cfg["R"], BT=cfg["BT"], M=cfg["M"], MF=cfg["MF"],
              num_warps=cfg["num_warps"])
    return _llstep_fwd_group_kernel, (triton.cdiv(B, 32 // cfg["G"]),), kw


def llstep_forward(A, x0, dt):
    """X, V (B, T, D) contiguous; inputs validated, any strides."""
    B, D = x0.shape
    X = torch.empty((B, dt.shape[1], D), dtype=A.dtype, device=A.device)
    V = torch.empty_like(X)
    kernel, grid, kw = forward_launch(A, x0, dt, X, V)
    kernel[grid](**kw)
    return X, V
