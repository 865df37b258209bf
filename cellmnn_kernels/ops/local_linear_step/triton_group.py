"""Lane-group kernels of ``local_linear_step``: float32, 5 < D <= 16.

The register kernels of ``triton_reg.py`` give each cell one lane; beyond D = 5 a cell's
operators no longer fit one thread's registers.  Here a cell has G lanes (G = 4 for D <= 8, 8 up
to D = 16; 32 / G cells per one-warp program) and each lane owns R = ceil(D / G) rows of every
D x D operator, as registers unrolled at compile time.  Every tensor has the shape (32 / G, G),
one element per lane:

* a matrix-vector product is R * D FMAs per lane on its own rows, giving the result distributed
  (row g R + r at lane g);
* the full vector every lane needs for the next product is gathered by D sums across the G lanes
  of the cell (butterfly shuffles inside the warp): no shared memory and no barrier anywhere.

The scheme is the register kernels' (``triton_reg``): per cell the anchor-step matrices
E+- = p_M(+-Z) (Paterson-Stockmeyer; the polynomials commute with Z, so every product is "rows
of the left operand times rows of the right one broadcast in turn"); per block of BT target
times the anchors are marched once, every pair captures its nearest anchor and is finished by a
degree-MF Horner, V = (Z X) / h.

The backward (``_llstep_bwd_group_kernel``) is the register backward's scheme on the same rows;
it never needs a column of an operator it holds by rows: Z^T is loaded as rows too, E^T =
p(+-Z^T) is formed from them, gradients are accumulated transposed, and the gradient through the
step matrix is a Frechet derivative in forward mode (``_step_rows_tangent``).

``VARIANT`` is this family as the dispatch (``triton_impl``) and the compile tools see it.
"""
from __future__ import annotations

import torch

from ..utils import HAS_TRITON, tl, triton
from ..variant import KernelVariant, launch_kwargs
from .common import FINISH, launch_scalars, taylor_params

MIN_D, MAX_D = 6, 16  # the D of the lane-group kernels (float32 only)


def config(kind: str, D: int, dtype: torch.dtype = torch.float32, T: int = 16) -> dict:
    """G lanes per cell, R = ceil(D / G) rows per lane, BT target times per forward block.  The
    backward (kind "bwd") holds more operators at once (Z, Z^T, gradients): beyond D = 8 it takes
    16 lanes and one row per lane (8 lanes and 2 rows spill 140 B to 1.8 kB at D = 10..16 on
    sm_90)."""
    _, m = taylor_params(dtype)
    G = 4 if D <= 8 else (16 if kind == "bwd" else 8)
    return dict(D=D, G=G, R=-(-D // G), BT=8 if G == 4 else 4, M=m, MF=FINISH[dtype], num_warps=1)


def scratch(D: int, LS: int) -> tuple[int, int]:
    """Cells per program and scratch elements per program of the backward: per lane, a state
    and an adjoint sum (R rows each) for each of LS levels per direction."""
    cfg = config("bwd", D)
    return 32 // cfg["G"], 32 * 4 * LS * cfg["R"]


if HAS_TRITON:
    from .triton_jit import _coefs, _lane_tops, _mv, _pair_slot, _pairs, _park, _rank1, _step_scale, _unpark, _vadd

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
    def _block_rows(Wr, W2r, coef, q: tl.constexpr, gi, D: tl.constexpr, R: tl.constexpr, Pr=None,
                    EYE: tl.constexpr = True):
        """Rows of B_q = c_3q I + c_3q+1 W + c_3q+2 W^2 (+ P); without the identity if not EYE."""
        out = ()
        for r in tl.static_range(R):
            for k in tl.static_range(D):
                v = Wr[r * D + k] * coef[3 * q + 1] + W2r[r * D + k] * coef[3 * q + 2]
                if EYE:
                    v += tl.where(gi * R + r == k, coef[3 * q], 0.0)
                if Pr is not None:
                    v += Pr[r * D + k]
                out = out + (v,)
        return out

    @triton.jit
    def _step_rows(Zr, SGN, gi, n, D: tl.constexpr, R: tl.constexpr, BC: tl.constexpr,
                   G: tl.constexpr, M: tl.constexpr):
        """Rows of p_M(SGN Z) by Paterson-Stockmeyer (``triton_reg._step_matrix``), with
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
    def _step_rows_tangent(Zr, Fr, SGN, gi, n, D: tl.constexpr, R: tl.constexpr, BC: tl.constexpr,
                           G: tl.constexpr, M: tl.constexpr):
        """Rows of L(W, F), the Frechet derivative of p_M at W = SGN Z in the direction F: forward
        mode through ``_step_rows`` (P_q' = B_q' + P_{q+1}' W^3 + P_{q+1} (W^3)'), 15 products."""
        Wr = ()
        for e in tl.static_range(R * D):
            Wr = Wr + (Zr[e] * SGN,)
        W2r = _mmr(Wr, Wr, gi, n, D, R, BC, G)
        W2t = _mmr(Fr, Wr, gi, n, D, R, BC, G, _mmr(Wr, Fr, gi, n, D, R, BC, G))
        W3r = _mmr(W2r, Wr, gi, n, D, R, BC, G)
        W3t = _mmr(W2t, Wr, gi, n, D, R, BC, G, _mmr(W2r, Fr, gi, n, D, R, BC, G))
        coef = _coefs(Zr[0].dtype, M)
        P = _block_rows(Wr, W2r, coef, M // 3, gi, D, R)
        Pt = _block_rows(Fr, W2t, coef, M // 3, gi, D, R, None, False)
        for q in tl.static_range(1, M // 3 + 1):
            Pt = _block_rows(Fr, W2t, coef, M // 3 - q, gi, D, R,
                             _mmr(Pt, W3r, gi, n, D, R, BC, G, _mmr(P, W3t, gi, n, D, R, BC, G)), False)
            P = _block_rows(Wr, W2r, coef, M // 3 - q, gi, D, R, _mmr(P, W3r, gi, n, D, R, BC, G))
        return Pt

    @triton.jit
    def _march(E, x0f, Y, ok, neg, lev, NEG: tl.constexpr, gi, D: tl.constexpr, R: tl.constexpr,
               BC: tl.constexpr, G: tl.constexpr, BT: tl.constexpr):
        """Anchor states of one direction, distributed: Y[k*R + r] = rows of E^lev[k] x0."""
        L = tl.zeros_like(gi)
        for k in tl.static_range(BT):
            L = tl.maximum(L, tl.where(ok[k] & (neg[k] == NEG), lev[k], 0))
        y = x0f
        for a in range(1, _top(L) + 1):
            yd = _mv(E, y, D, R)
            Yn = ()
            for k in tl.static_range(BT):
                at = ok[k] & (neg[k] == NEG) & (lev[k] == a)
                for r in tl.static_range(R):
                    Yn = Yn + (tl.where(at, yd[r], Y[k * R + r]),)
            Y = Yn
            y = _gather(yd, gi, D, R, BC, G)
        return Y

    @triton.jit
    def _load_cell_rows(A_ptr, x0_ptr, B, sAb, sAi, sAj, sxb, sxd, theta, D: tl.constexpr, G: tl.constexpr,
                        R: tl.constexpr):
        """The program's cells (32 / G, G lanes each), this lane's rows of Z = h A and of x0,
        ||A||_1 and h = theta / ||A||_1 as in ``triton_reg._load_cell``."""
        BC: tl.constexpr = 32 // G
        pid = tl.program_id(0).to(tl.int64)
        cell = pid * BC + tl.arange(0, BC)[:, None] + tl.zeros((BC, G), tl.int64)
        gi = tl.arange(0, G)[None, :] + tl.zeros((BC, G), tl.int32)
        cm = cell < B
        Ar = _load_rows(A_ptr + cell * sAb, sAi, sAj, gi, cm, 1.0, D, R)
        x0 = ()
        for r in tl.static_range(R):
            row = gi * R + r
            x0 = x0 + (tl.load(x0_ptr + cell * sxb + row * sxd, mask=cm & (row < D), other=0.0),)
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
        h, inv_h, Zr = _step_scale(Ar, nrm, theta, R * D)
        return cell, gi, cm, Zr, x0, nrm, finite, h, inv_h

    @triton.jit
    def _load_rows(base, s_row, s_col, gi, cm, scale, D: tl.constexpr, R: tl.constexpr):
        """This lane's R rows of the D x D matrix at base (strides s_row, s_col), times scale."""
        out = ()
        for r in tl.static_range(R):
            row = gi * R + r
            for j in tl.static_range(D):
                out = out + (tl.load(base + row * s_row + j * s_col, mask=cm & (row < D), other=0.0) * scale,)
        return out

    @triton.jit
    def _llstep_fwd_group_kernel(A_ptr, x0_ptr, dt_ptr, X_ptr, V_ptr, B, T, D_rt,
                                 sAb, sAi, sAj, sxb, sxd, stb, stt, theta, nu_max,
                                 D: tl.constexpr, G: tl.constexpr, R: tl.constexpr, BT: tl.constexpr,
                                 M: tl.constexpr, MF: tl.constexpr):
        """X, V (B, T, D) contiguous from A (B, D, D), x0 (B, D), dt (B, T), any strides.
        D_rt: D again, at run time (``_mmr``)."""
        BC: tl.constexpr = 32 // G
        cell, gi, cm, Zr, x0, nrm, finite, h, inv_h = _load_cell_rows(
            A_ptr, x0_ptr, B, sAb, sAi, sAj, sxb, sxd, theta, D, G, R)
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
                    W = _mv(Zr, X, D, R)
                    c = rho[k] * (1.0 / (MF - jj))
                    Xd = ()
                    for r in tl.static_range(R):
                        Xd = Xd + (tl.fma(W[r], c, yd[r]),)
                    X = _gather(Xd, gi, D, R, BC, G)
                W = _mv(Zr, X, D, R)
                for r in tl.static_range(R):
                    row = gi * R + r
                    m = inr[k] & (row < D)
                    off = (cell * T + t0 + k) * D + row
                    tl.store(X_ptr + off, Xd[r], mask=m)
                    tl.store(V_ptr + off, W[r] * inv_h, mask=m)

    @triton.jit
    def _llstep_bwd_group_kernel(A_ptr, x0_ptr, dt_ptr, gX_ptr, gV_ptr, dA_ptr, dx0_ptr, ddt_ptr, S_ptr,
                                 B, T, LS, D_rt, sAb, sAi, sAj, sxb, sxd, stb, stt, theta, nu_max,
                                 D: tl.constexpr, G: tl.constexpr, R: tl.constexpr,
                                 M: tl.constexpr, MF: tl.constexpr):
        """dA (B, D, D), dx0 (B, D), ddt (B, T) from the upstream gX, gV (B, T, D) contiguous.

        The register backward's three phases (``triton_reg._llstep_bwd_reg_kernel``: the anchor
        states of every level in the scratch S, the pairs one at a time with their anchor
        adjoints summed per level, the marches reversed) on rows distributed as in the forward.
        Every transposed product is a product with rows of a transposed operator, so nothing
        crosses lanes but the gathers: Z^T is loaded as rows, E^T = p(+-Z^T) is formed from
        them, and the gradients are accumulated transposed (dZ^T, dE^T: a rank-1 update u v^T
        becomes v u^T, rows of v times the full u); the gradient through E = p(+-Z) is then
        dZ^T += +-L(+-Z, dE^T), the Frechet derivative (``_step_rows_tangent``).
        S: ``VARIANT.scratch_size(B, D, LS)`` elements, LS from ``triton_impl.anchor_slots``.
        """
        BC: tl.constexpr = 32 // G
        cell, gi, cm, Zr, x0, nrm, finite, h, inv_h = _load_cell_rows(
            A_ptr, x0_ptr, B, sAb, sAi, sAj, sxb, sxd, theta, D, G, R)
        ZTr = _load_rows(A_ptr + cell * sAb, sAj, sAi, gi, cm, h, D, R)  # rows of Z^T
        x0f = _gather(x0, gi, D, R, BC, G)
        lane = tl.arange(0, BC)[:, None] * G + gi
        sbase = S_ptr + tl.program_id(0).to(tl.int64) * (4 * LS * R * 32) + lane
        s_acc = sbase + 2 * LS * R * 32
        zero = tl.zeros((BC, G), tl.float32)
        zd = ()
        for r in tl.static_range(R):
            zd = zd + (zero,)
        zmat = ()
        for e in tl.static_range(R * D):
            zmat = zmat + (zero,)
        top_p, top_n = _lane_tops(dt_ptr, cell, cm, T, stb, stt, nrm, finite, theta, nu_max, LS)
        # 1. the anchor states of each direction, distributed
        for d in range(0, 2):
            sgn = 1.0 - 2.0 * d
            top = tl.maximum(_top(tl.where(d == 0, top_p, top_n)), 0)
            E = Zr
            if top > 0:
                E = _step_rows(Zr, sgn, gi, D_rt, D, R, BC, G, M)
            y = x0f
            yd = x0
            for a in range(0, top + 1):
                if a > 0:
                    yd = _mv(E, y, D, R)
                    y = _gather(yd, gi, D, R, BC, G)
                _park(sbase + (d * LS + a) * (R * 32), yd, R, 32)
                _park(s_acc + (d * LS + a) * (R * 32), zd, R, 32)
        # 2. the pairs, one at a time
        dZT = zmat
        cell_bad = cm & ~cm
        for t in range(0, T):
            okk, rho, slot = _pair_slot(dt_ptr, cell, cm, t, stb, stt, nrm, finite, theta, nu_max, inv_h, LS)
            slot = slot * (R * 32)
            yd = _unpark(sbase + slot, R, 32)
            # the Horner finish again, keeping W_j = Z X_{j+1} (at MF - j)
            Xf = _gather(yd, gi, D, R, BC, G)
            Xd = yd
            Ws = ()
            for jj in tl.static_range(MF):
                W = _mv(Zr, Xf, D, R)
                c = rho * (1.0 / (MF - jj))
                Xd = ()
                for r in tl.static_range(R):
                    Xd = Xd + (tl.fma(W[r], c, yd[r]),)
                if jj < MF - 1:
                    Xf = _gather(Xd, gi, D, R, BC, G)
                Ws = Ws + W
            off = (cell * T + t) * D
            gvf = ()  # upstream of Z X (V = (Z X) / h), full
            for j in tl.static_range(D):
                gvf = gvf + (tl.load(gV_ptr + off + j, mask=cm, other=0.0) * inv_h,)
            dZT = _rank1(dZT, Xd, gvf, D, R)
            xb = _mv(ZTr, gvf, D, R)
            xbn = ()
            for r in tl.static_range(R):
                row = gi * R + r
                xbn = xbn + (xb[r] + tl.load(gX_ptr + off + row, mask=cm & (row < D), other=0.0),)
            xb = xbn
            yb = xb
            drho = zero
            for j in tl.static_range(1, MF + 1):  # X_j = y + (rho/j) W_j
                part = xb[0] * Ws[(MF - j) * R]
                for r in tl.static_range(1, R):
                    part = tl.fma(xb[r], Ws[(MF - j) * R + r], part)
                drho += _allsum(part, BC, G) * (1.0 / j)
                wb = ()
                Xn = ()
                for r in tl.static_range(R):
                    wb = wb + (xb[r] * (rho * (1.0 / j)),)
                    if j == MF:
                        Xn = Xn + (yd[r],)
                    else:
                        Xn = Xn + (tl.fma(Ws[(MF - j - 1) * R + r], rho * (1.0 / (j + 1)), yd[r]),)
                wf = _gather(wb, gi, D, R, BC, G)
                dZT = _rank1(dZT, Xn, wf, D, R)
                xb = _mv(ZTr, wf, D, R)
                yb = _vadd(yb, xb, R)
            _park(s_acc + slot, _vadd(_unpark(s_acc + slot, R, 32), yb, R), R, 32)
            tl.store(ddt_ptr + cell * T + t, drho * inv_h, mask=cm & (gi == 0))
            cell_bad = cell_bad | (cm & ~okk)
        # 3. the marches in reverse, with E^T = p(+-Z^T) as rows
        dx0 = zd
        for d in range(0, 2):
            sgn = 1.0 - 2.0 * d
            mine = tl.where(d == 0, top_p, top_n)
            top = tl.maximum(_top(mine), 0)
            ET = ZTr
            if top > 0:
                ET = _step_rows(ZTr, sgn, gi, D_rt, D, R, BC, G, M)
            dET = zmat
            yb = _unpark(s_acc + (d * LS + top) * (R * 32), R, 32)
            for ia in range(0, top):
                a = top - ia
                ybf = _gather(yb, gi, D, R, BC, G)
                yd = _unpark(sbase + (d * LS + a - 1) * (R * 32), R, 32, a <= mine)
                dET = _rank1(dET, yd, ybf, D, R)  # dE += ybar_a y_{a-1}^T, transposed
                yb = _mv(ET, ybf, D, R)
                yb = _vadd(yb, _unpark(s_acc + (d * LS + a - 1) * (R * 32), R, 32), R)
            dx0 = _vadd(dx0, yb, R)
            if top > 0:
                Lr = _step_rows_tangent(Zr, dET, sgn, gi, D_rt, D, R, BC, G, M)
                dzn = ()
                for e in tl.static_range(R * D):
                    dzn = dzn + (tl.fma(Lr[e], sgn, dZT[e]),)
                dZT = dzn
        for r in tl.static_range(R):
            row = gi * R + r
            m = cm & (row < D)
            for j in tl.static_range(D):
                tl.store(dA_ptr + cell * (D * D) + j * D + row,
                         tl.where(cell_bad, float("nan"), dZT[r * D + j] * h), mask=m)
            tl.store(dx0_ptr + cell * D + row, tl.where(cell_bad, float("nan"), dx0[r]), mask=m)


def forward_launch(A, x0, dt, X, V):
    """(kernel, grid, keyword arguments) of the forward launch: X, V (B, T, D) contiguous from
    A, x0, dt (validated, any strides)."""
    cfg = config("fwd", x0.shape[1], A.dtype)
    kw = dict(A_ptr=A, x0_ptr=x0, dt_ptr=dt, X_ptr=X, V_ptr=V, D_rt=x0.shape[1], **launch_scalars(A, x0, dt),
              **launch_kwargs(_llstep_fwd_group_kernel, cfg))
    return _llstep_fwd_group_kernel, (triton.cdiv(x0.shape[0], 32 // cfg["G"]),), kw


def backward_launch(A, x0, dt, gX, gV, dA, dx0, ddt, S, LS):
    """(kernel, grid, keyword arguments) of the backward launch: dA, dx0, ddt from the upstream
    gX, gV (B, T, D) contiguous; S: ``VARIANT.scratch_size(B, D, LS)`` elements."""
    cfg = config("bwd", x0.shape[1], A.dtype)
    kw = dict(A_ptr=A, x0_ptr=x0, dt_ptr=dt, gX_ptr=gX, gV_ptr=gV, dA_ptr=dA, dx0_ptr=dx0, ddt_ptr=ddt, S_ptr=S,
              LS=LS, D_rt=x0.shape[1], **launch_scalars(A, x0, dt), **launch_kwargs(_llstep_bwd_group_kernel, cfg))
    return _llstep_bwd_group_kernel, (triton.cdiv(x0.shape[0], 32 // cfg["G"]),), kw


if HAS_TRITON:
    VARIANT = KernelVariant(
        name="llstep_group", dims={torch.float32: range(MIN_D, MAX_D + 1)},
        kernels={"fwd": _llstep_fwd_group_kernel, "bwd": _llstep_bwd_group_kernel}, config=config,
        # D = 6: the family's smallest, with the layout of D <= 8 (4 lanes, 2 rows each); 72 s to
        # compile on one core against 135 s at D = 8
        representative=(("fwd", 6, torch.float32), ("bwd", 6, torch.float32)),
        forward_launch=forward_launch, backward_launch=backward_launch, scratch=scratch)
