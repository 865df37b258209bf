"""Triton backend of ``local_linear_step``: register-resident kernels, launchers, autograd.

Layout (float32, D <= REG_MAX_D): one cell per lane, BB = 32 cells per program (one warp).  Every
quantity of a cell is a tuple of 1-D tensors over the program's cells, unrolled over D at
compile time: the operator is D*D registers, a state D registers, and a matrix-vector product
is D*D FMAs inside one thread, with no cross-lane traffic (no shared memory, no barriers).

Scheme (the anchored Taylor steps of ``common.py``, evaluated for registers):

* per cell once: Z = h A with h = theta / ||A||_1, and the anchor-step matrices
  E+ = p_M(Z), E- = p_M(-Z) (degree-M Taylor polynomial, Paterson-Stockmeyer on D x D
  matrices), each only if some pair of the program needs it;
* per block of BT target times: the anchors y_a = E^a x0 of each direction are marched once
  (one matvec per level) and every pair captures the state at its own level: the nearest
  anchor, so that its signed remainder rho = dt / h - (+-a) has |rho| <= 1/2;
* every pair is then finished once: X = p_MF(rho Z) y_a by Horner on vectors (MF matvecs; MF is
  lower than M because |rho Z| <= theta / 2), and V = A X = (Z X) / h.

Backward, per cell (``_llstep_bwd_kernel``): each pair's Horner is recomputed and run in reverse
(dZ += sum_j (rho/j) Xbar_j X_{j+1}^T, Ybar, drho); the anchor march is reversed level by level
(dE += ybar_{a} y_{a-1}^T, ybar_{a-1} = E^T ybar_a + the captured pairs' Ybar) with the states
y_{a-1} recomputed from CAP checkpoints; finally dZ += L_p(Z^T, dE+) - L_p(-Z^T, dE-), the
Frechet derivative of the Taylor polynomial evaluated as the upper-right block of
p([[Z^T, dE], [0, Z^T]]) by Horner (Mathias 1996).  The same @jit helpers compute the anchor
states in both kernels, so the backward sees bit for bit the forward's states.

float64, and float32 with D > REG_MAX_D (up to 64), use the lane-tiled kernels of
``triton_tiled.py``.
"""
from __future__ import annotations

import torch

from ..utils import HAS_TRITON, first_order_only, tl, triton
from . import triton_tiled
from .common import FINISH, NU_MAX, SECOND_ORDER, empty_result, taylor_params

REG_MAX_D = 5  # largest D of the register-resident kernels (float32 only)
BB = 32  # cells per program: one warp, one cell per lane
CAP = 4  # anchor checkpoints per direction in the backward


def uses_register_kernels(D: int, dtype: torch.dtype) -> bool:
    """float32 with D <= 5.  Beyond, the unrolled code outgrows the register file (sm_90, triton
    3.8: D = 8 float32 spills 1.4 kB and compiles in minutes; D = 5 float64 spills 1.6 kB
    forward, 9.8 kB backward), and the lane-tiled kernels take over."""
    return dtype == torch.float32 and D <= REG_MAX_D


def block_config(D: int, dtype: torch.dtype) -> dict:
    """Compile-time configuration of the register kernels (``uses_register_kernels``)."""
    theta, m = taylor_params(dtype)
    return dict(D=D, BB=BB, BT=16, BT_BWD=4, M=m, MF=FINISH[dtype],
                CAP=CAP, num_warps=1)


def all_configs(dtype: torch.dtype):
    """Every configuration the launchers can choose (register kernels; tiled ones separately)."""
    return [block_config(D, dtype) for D in range(1, REG_MAX_D + 1) if uses_register_kernels(D, dtype)]


if HAS_TRITON:

    @triton.jit
    def _mv(Z, v, D: tl.constexpr):
        """Z v: Z a row-major D*D tuple, v a D tuple."""
        out = ()
        for i in tl.static_range(D):
            acc = Z[i * D] * v[0]
            for j in tl.static_range(1, D):
                acc = tl.fma(Z[i * D + j], v[j], acc)
            out = out + (acc,)
        return out

    @triton.jit
    def _mtv(Z, v, D: tl.constexpr):
        """Z^T v."""
        out = ()
        for j in tl.static_range(D):
            acc = Z[j] * v[0]
            for i in tl.static_range(1, D):
                acc = tl.fma(Z[i * D + j], v[i], acc)
            out = out + (acc,)
        return out

    @triton.jit
    def _mm(P, Q, D: tl.constexpr, TP: tl.constexpr):
        """P Q, or P^T Q when TP."""
        out = ()
        for i in tl.static_range(D):
            for k in tl.static_range(D):
                if TP:
                    acc = P[i] * Q[k]
                else:
                    acc = P[i * D] * Q[k]
                for j in tl.static_range(1, D):
                    if TP:
                        acc = tl.fma(P[j * D + i], Q[j * D + k], acc)
                    else:
                        acc = tl.fma(P[i * D + j], Q[j * D + k], acc)
                out = out + (acc,)
        return out

    @triton.jit
    def _rank1(G, u, v, D: tl.constexpr):
        """G + u v^T."""
        out = ()
        for i in tl.static_range(D):
            for j in tl.static_range(D):
                out = out + (tl.fma(u[i], v[j], G[i * D + j]),)
        return out

    @triton.jit
    def _plus_identity(P, c, D: tl.constexpr):
        """c P + I."""
        out = ()
        for e in tl.static_range(D * D):
            if e % (D + 1) == 0:
                out = out + (P[e] * c + 1.0,)
            else:
                out = out + (P[e] * c,)
        return out

    @triton.jit
    def _transpose(P, D: tl.constexpr):
        out = ()
        for e in tl.static_range(D * D):
            out = out + (P[(e % D) * D + e // D],)
        return out

    @triton.jit
    def _step_matrix(Z, SGN: tl.constexpr, D: tl.constexpr, M: tl.constexpr):
        """p_M(SGN Z) = sum_{k<=M} (SGN Z)^k / k! by Paterson-Stockmeyer with blocks of three
        (Higham, Functions of Matrices, 2008, sec. 4.4.3): with W = SGN Z,
        p = B_0 + W^3 (B_1 + W^3 (B_2 + ...)), B_q = c_3q I + c_3q+1 W + c_3q+2 W^2:
        M // 3 + 1 matrix products instead of M - 1."""
        W = ()
        for e in tl.static_range(D * D):
            W = W + (Z[e] * SGN,)
        W2 = _mm(W, W, D, False)
        W3 = _mm(W, W2, D, False)
        c = tl.cast(1.0, Z[0].dtype)
        coef = ()
        for k in tl.static_range(M + 3):  # c_k = 1/k! up to k = M, then 0
            if k > M:
                coef = coef + (c * 0.0,)
            else:
                if k > 0:
                    c = c / k
                coef = coef + (c,)
        P = ()
        for q in tl.static_range(M // 3 + 1):  # block M // 3 - q, from the top
            if q > 0:
                P = _mm(W3, P, D, False)
            Pn = ()
            for e in tl.static_range(D * D):
                v = W[e] * coef[3 * (M // 3 - q) + 1] + W2[e] * coef[3 * (M // 3 - q) + 2]
                if e % (D + 1) == 0:
                    v += coef[3 * (M // 3 - q)]
                if q > 0:
                    v += P[e]
                Pn = Pn + (v,)
            P = Pn
        return P

    @triton.jit
    def _step_matrix_grad(Z, G, SGN: tl.constexpr, D: tl.constexpr, M: tl.constexpr):
        """d<G, p_M(SGN Z)>/dZ = SGN L_p(SGN Z^T, G): SGN times the upper-right block of
        p_M([[SGN Z^T, G], [0, SGN Z^T]]) (Mathias 1996), by Horner on the two blocks:
        P = I + (SGN/k) Z^T P, R = (SGN/k) Z^T R + (1/k) G P; R is kept multiplied by SGN."""
        P = _plus_identity(_transpose(Z, D), SGN / M, D)
        R = ()
        for e in tl.static_range(D * D):
            R = R + (G[e] * (SGN / M),)
        for kk in range(1, M):
            c = SGN / tl.cast(M - kk, Z[0].dtype)
            ZR = _mm(Z, R, D, True)
            GP = _mm(G, P, D, False)
            P = _plus_identity(_mm(Z, P, D, True), c, D)
            Rn = ()
            for e in tl.static_range(D * D):
                Rn = Rn + ((ZR[e] + GP[e]) * c,)
            R = Rn
        return R

    @triton.jit
    def _finish(Z, y, rho, D: tl.constexpr, MF: tl.constexpr):
        """X = p_MF(rho Z) y by Horner, X <- y + (rho / j) Z X for j = MF .. 1; also the products
        W_j = Z X_{j+1}, concatenated for j = MF .. 1 (the backward needs them, the forward does
        not and the compiler drops them)."""
        X = y
        Ws = ()
        for jj in tl.static_range(MF):
            W = _mv(Z, X, D)
            c = rho * (1.0 / (MF - jj))
            Xn = ()
            for i in tl.static_range(D):
                Xn = Xn + (tl.fma(W[i], c, y[i]),)
            X = Xn
            Ws = Ws + W
        return X, Ws

    @triton.jit
    def _load_cell(A_ptr, x0_ptr, B, sAb, sAi, sAj, sxb, sxd, theta, D: tl.constexpr, BB: tl.constexpr):
        """The program's cells: Z = h A, x0, ||A||_1, whether A is finite, h and 1/h.

        h = theta / ||A||_1; where A = 0, h = 1 (any h is exact there, gradients included).
        """
        cell = tl.program_id(0).to(tl.int64) * BB + tl.arange(0, BB)
        cm = cell < B
        A = ()
        for e in tl.static_range(D * D):
            A = A + (tl.load(A_ptr + cell * sAb + (e // D) * sAi + (e % D) * sAj, mask=cm, other=0.0),)
        x0 = ()
        for i in tl.static_range(D):
            x0 = x0 + (tl.load(x0_ptr + cell * sxb + i * sxd, mask=cm, other=0.0),)
        nrm = tl.abs(A[0])
        for i in tl.static_range(1, D):
            nrm += tl.abs(A[i * D])
        total = nrm
        for j in tl.static_range(1, D):
            col = tl.abs(A[j])
            for i in tl.static_range(1, D):
                col += tl.abs(A[i * D + j])
            total += col
            nrm = tl.maximum(nrm, col)
        finite = total < float("inf")  # false for NaN and Inf entries
        # Subnormal norms are raised to the smallest normal number so that theta / n cannot
        # overflow; h and 1/h stay exact partners.
        if A[0].dtype == tl.float64:
            n_safe = tl.maximum(nrm, 2.2250738585072014e-308)
        else:
            n_safe = tl.maximum(nrm, 1.1754943508222875e-38)
        live = nrm > 0
        h = tl.where(live, theta / n_safe, 1.0)
        inv_h = tl.where(live, n_safe / theta, 1.0)
        Z = ()
        for e in tl.static_range(D * D):
            Z = Z + (A[e] * h,)
        return cell, cm, Z, x0, nrm, finite, h, inv_h

    @triton.jit
    def _pair_level(dt_ptr, cell, m, t, stb, stt, nrm, finite, theta, nu_max):
        """dt of pair (cell, t), whether it can be computed, and its nearest anchor level (float).

        False for masked, NaN/Inf and out-of-range pairs, whose level is 0."""
        tau = tl.load(dt_ptr + cell * stb + t * stt, mask=m, other=0.0)
        nu = tl.abs(tau) * nrm
        okk = m & finite & (nu <= nu_max)
        return tau, okk, tl.floor(tl.where(okk, nu / theta + 0.5, 0.0))

    @triton.jit
    def _pairs(dt_ptr, cell, cm, t0, T, stb, stt, nrm, finite, inv_h, theta, nu_max, BT: tl.constexpr):
        """Per pair of the time block t0..t0+BT-1: in range, computable, direction, level, rho."""
        inr = ()
        ok = ()
        neg = ()
        lev = ()
        rho = ()
        for k in tl.static_range(BT):
            m = cm & (t0 + k < T)
            tau, okk, lv = _pair_level(dt_ptr, cell, m, t0 + k, stb, stt, nrm, finite, theta, nu_max)
            ng = tau < 0
            inr = inr + (m,)
            ok = ok + (okk,)
            neg = neg + (ng,)
            lev = lev + (lv.to(tl.int32),)
            # A pair that cannot be computed gets rho = NaN: its X, V and ddt come out NaN.
            rho = rho + (tl.where(okk | ~m, tau * inv_h - tl.where(ng, -lv, lv), float("nan")),)
        return inr, ok, neg, lev, rho

    @triton.jit
    def _levels(dt_ptr, cell, cm, T, stb, stt, nrm, finite, theta, nu_max, BT: tl.constexpr):
        """Highest anchor level any pair of the program needs, per direction (scalars)."""
        hi_pos = tl.zeros_like(nrm).to(tl.int32)
        hi_neg = tl.zeros_like(nrm).to(tl.int32) - 1
        for t0 in range(0, T, BT):
            for k in tl.static_range(BT):
                tau, okk, lv = _pair_level(dt_ptr, cell, cm & (t0 + k < T), t0 + k, stb, stt, nrm, finite,
                                           theta, nu_max)
                lv = lv.to(tl.int32)
                hi_pos = tl.maximum(hi_pos, tl.where(okk & (tau >= 0), lv, 0))
                hi_neg = tl.maximum(hi_neg, tl.where(okk & (tau < 0), lv, -1))
        return tl.max(hi_pos, axis=0), tl.max(hi_neg, axis=0)

    @triton.jit
    def _top_level(ok, neg, lev, NEG: tl.constexpr, BT: tl.constexpr):
        """Highest level among the time block's pairs of one direction, over the program (scalar)."""
        hi = tl.where(ok[0] & (neg[0] == NEG), lev[0], 0)
        for k in tl.static_range(1, BT):
            hi = tl.maximum(hi, tl.where(ok[k] & (neg[k] == NEG), lev[k], 0))
        return tl.max(hi, axis=0)

    @triton.jit
    def _march(E, x0, Y, ok, neg, lev, NEG: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
        """Anchor states of one direction: Y[k] = E^lev[k] x0 for the pairs of that direction."""
        y = x0
        for a in range(1, _top_level(ok, neg, lev, NEG, BT) + 1):
            y = _mv(E, y, D)
            Yn = ()
            for k in tl.static_range(BT):
                at = ok[k] & (neg[k] == NEG) & (lev[k] == a)
                for i in tl.static_range(D):
                    Yn = Yn + (tl.where(at, y[i], Y[k * D + i]),)
            Y = Yn
        return Y

    @triton.jit
    def _anchor_states(Ep, En, x0, ok, neg, lev, HAS_POS, HAS_NEG, D: tl.constexpr, BT: tl.constexpr):
        """Y[k*D + i]: the state at the anchor of pair k (x0 at level 0)."""
        Y = ()
        for k in tl.static_range(BT):
            for i in tl.static_range(D):
                Y = Y + (x0[i],)
        if HAS_POS:
            Y = _march(Ep, x0, Y, ok, neg, lev, False, D, BT)
        if HAS_NEG:
            Y = _march(En, x0, Y, ok, neg, lev, True, D, BT)
        return Y

    @triton.jit
    def _step_matrices(Z, hi_pos, hi_neg, D: tl.constexpr, M: tl.constexpr):
        Ep = Z
        En = Z
        if hi_pos > 0:
            Ep = _step_matrix(Z, 1.0, D, M)
        if hi_neg > 0:
            En = _step_matrix(Z, -1.0, D, M)
        return Ep, En

    @triton.jit
    def _llstep_fwd_kernel(A_ptr, x0_ptr, dt_ptr, X_ptr, V_ptr, Y_ptr, B, T,
                           sAb, sAi, sAj, sxb, sxd, stb, stt, theta, nu_max,
                           D: tl.constexpr, BB: tl.constexpr, BT: tl.constexpr,
                           M: tl.constexpr, MF: tl.constexpr, SAVE_ANCHORS: tl.constexpr):
        """X, V (B, T, D) contiguous from A (B, D, D), x0 (B, D), dt (B, T), any strides.

        With SAVE_ANCHORS, each pair's anchor state goes to Y (B, T, D) too (for tests)."""
        cell, cm, Z, x0, nrm, finite, h, inv_h = _load_cell(
            A_ptr, x0_ptr, B, sAb, sAi, sAj, sxb, sxd, theta, D, BB)
        hi_pos, hi_neg = _levels(dt_ptr, cell, cm, T, stb, stt, nrm, finite, theta, nu_max, BT)
        Ep, En = _step_matrices(Z, hi_pos, hi_neg, D, M)
        for t0 in range(0, T, BT):
            inr, ok, neg, lev, rho = _pairs(dt_ptr, cell, cm, t0, T, stb, stt, nrm, finite, inv_h,
                                            theta, nu_max, BT)
            Y = _anchor_states(Ep, En, x0, ok, neg, lev, hi_pos > 0, hi_neg > 0, D, BT)
            if SAVE_ANCHORS:
                _save_anchors(Y_ptr, Y, cell, t0, T, inr, D, BT)
            for k in tl.static_range(BT):
                y = ()
                for i in tl.static_range(D):
                    y = y + (Y[k * D + i],)
                X, _ = _finish(Z, y, rho[k], D, MF)
                W = _mv(Z, X, D)
                off = (cell * T + t0 + k) * D
                for i in tl.static_range(D):
                    tl.store(X_ptr + off + i, X[i], mask=inr[k])
                    tl.store(V_ptr + off + i, W[i] * inv_h, mask=inr[k])

    @triton.jit
    def _llstep_bwd_kernel(A_ptr, x0_ptr, dt_ptr, gX_ptr, gV_ptr, dA_ptr, dx0_ptr, ddt_ptr, Y_ptr, B, T,
                           sAb, sAi, sAj, sxb, sxd, stb, stt, theta, nu_max,
                           D: tl.constexpr, BB: tl.constexpr, BT: tl.constexpr,
                           M: tl.constexpr, MF: tl.constexpr, CAP: tl.constexpr,
                           SAVE_ANCHORS: tl.constexpr):
        """dA (B, D, D), dx0 (B, D), ddt (B, T) from the upstream gX, gV (B, T, D) contiguous.

        A pair with NaN/Inf or out-of-range inputs poisons its cell's dA and dx0 (as it would in a
        dense computation) and its own ddt; it is never silently dropped.
        """
        cell, cm, Z, x0, nrm, finite, h, inv_h = _load_cell(
            A_ptr, x0_ptr, B, sAb, sAi, sAj, sxb, sxd, theta, D, BB)
        hi_pos, hi_neg = _levels(dt_ptr, cell, cm, T, stb, stt, nrm, finite, theta, nu_max, BT)
        Ep, En = _step_matrices(Z, hi_pos, hi_neg, D, M)
        zero = tl.zeros_like(x0[0])
        dZ = ()
        dEp = ()
        for e in tl.static_range(D * D):
            dZ = dZ + (zero,)
            dEp = dEp + (zero,)
        dEn = dEp
        dx0 = ()
        for i in tl.static_range(D):
            dx0 = dx0 + (zero,)
        cell_bad = cm & ~cm
        for t0 in range(0, T, BT):
            inr, ok, neg, lev, rho = _pairs(dt_ptr, cell, cm, t0, T, stb, stt, nrm, finite, inv_h,
                                            theta, nu_max, BT)
            Y = _anchor_states(Ep, En, x0, ok, neg, lev, hi_pos > 0, hi_neg > 0, D, BT)
            if SAVE_ANCHORS:
                _save_anchors(Y_ptr, Y, cell, t0, T, inr, D, BT)
            # Each pair's Horner in reverse; GY[k] = Ybar of pair k.
            GY = ()
            for k in tl.static_range(BT):
                y = ()
                for i in tl.static_range(D):
                    y = y + (Y[k * D + i],)
                off = (cell * T + t0 + k) * D
                gx = ()
                gvh = ()  # upstream of Z X (V = (Z X) / h)
                for i in tl.static_range(D):
                    gx = gx + (tl.load(gX_ptr + off + i, mask=inr[k], other=0.0),)
                    gvh = gvh + (tl.load(gV_ptr + off + i, mask=inr[k], other=0.0) * inv_h,)
                X, Ws = _finish(Z, y, rho[k], D, MF)  # X_{j+1} is re-formed from W_{j+1} below
                # V: dZ += gvh X^T, and X receives Z^T gvh.
                dZ = _rank1(dZ, gvh, X, D)
                ZTg = _mtv(Z, gvh, D)
                xbar = ()
                for i in tl.static_range(D):
                    xbar = xbar + (gx[i] + ZTg[i],)
                ybar = xbar
                drho = zero
                for j in tl.static_range(1, MF + 1):  # X_j = y + (rho/j) W_j, W_j = Z X_{j+1}
                    wbar = ()
                    xn = ()  # X_{j+1}, exactly as the Horner above formed it
                    dr = zero
                    for i in tl.static_range(D):  # W_j sits at position MF - j of Ws
                        dr = tl.fma(xbar[i], Ws[(MF - j) * D + i], dr)
                        wbar = wbar + (xbar[i] * (rho[k] * (1.0 / j)),)
                        if j == MF:
                            xn = xn + (y[i],)
                        else:
                            xn = xn + (tl.fma(Ws[(MF - j - 1) * D + i], rho[k] * (1.0 / (j + 1)), y[i]),)
                    drho += dr * (1.0 / j)
                    dZ = _rank1(dZ, wbar, xn, D)
                    xbar = _mtv(Z, wbar, D)
                    yb = ()
                    for i in tl.static_range(D):
                        yb = yb + (ybar[i] + xbar[i],)
                    ybar = yb
                GY = GY + ybar
                bad = inr[k] & ~ok[k]
                cell_bad = cell_bad | bad
                tl.store(ddt_ptr + cell * T + t0 + k, drho * inv_h, mask=inr[k])
            # Reverse the anchor marches: ybar_{a-1} = E^T ybar_a + (pairs at a-1), dE += ybar_a y_{a-1}^T.
            if hi_pos > 0:
                dEp, dx0 = _march_back(Ep, x0, GY, dEp, dx0, ok, neg, lev, False, D, BT, CAP)
            else:
                dx0 = _level0(GY, dx0, ok, neg, lev, False, D, BT)
            if hi_neg > 0:
                dEn, dx0 = _march_back(En, x0, GY, dEn, dx0, ok, neg, lev, True, D, BT, CAP)
            else:
                dx0 = _level0(GY, dx0, ok, neg, lev, True, D, BT)
        if hi_pos > 0:
            G = _step_matrix_grad(Z, dEp, 1.0, D, M)
            dZn = ()
            for e in tl.static_range(D * D):
                dZn = dZn + (dZ[e] + G[e],)
            dZ = dZn
        if hi_neg > 0:
            G = _step_matrix_grad(Z, dEn, -1.0, D, M)
            dZn = ()
            for e in tl.static_range(D * D):
                dZn = dZn + (dZ[e] + G[e],)
            dZ = dZn
        for e in tl.static_range(D * D):
            tl.store(dA_ptr + cell * (D * D) + e, tl.where(cell_bad, float("nan"), dZ[e] * h), mask=cm)
        for i in tl.static_range(D):
            tl.store(dx0_ptr + cell * D + i, tl.where(cell_bad, float("nan"), dx0[i]), mask=cm)

    @triton.jit
    def _save_anchors(Y_ptr, Y, cell, t0, T, inr, D: tl.constexpr, BT: tl.constexpr):
        for k in tl.static_range(BT):
            for i in tl.static_range(D):
                tl.store(Y_ptr + (cell * T + t0 + k) * D + i, Y[k * D + i], mask=inr[k])

    @triton.jit
    def _level0(GY, dx0, ok, neg, lev, NEG: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
        """dx0 += Ybar of the pairs of one direction at level 0 (their anchor is x0)."""
        out = ()
        for i in tl.static_range(D):
            acc = dx0[i]
            for k in tl.static_range(BT):
                acc += tl.where((neg[k] == NEG) & (lev[k] == 0), GY[k * D + i], 0.0)
            out = out + (acc,)
        return out

    @triton.jit
    def _march_back(E, x0, GY, dE, dx0, ok, neg, lev, NEG: tl.constexpr, D: tl.constexpr,
                    BT: tl.constexpr, CAP: tl.constexpr):
        """Adjoint of one direction's anchor march of this time block.

        The states y_0 .. y_{L-1} are needed in reverse order: CAP checkpoints (every c-th level,
        c = ceil(L / CAP)) are kept and the rest recomputed, at most c - 1 matvecs per level.
        """
        L = _top_level(ok, neg, lev, NEG, BT)
        c = tl.maximum((L + CAP - 1) // CAP, 1)
        ring = ()
        for s in tl.static_range(CAP):
            ring = ring + x0
        y = x0
        for a in range(0, L):
            if a % c == 0:
                rn = ()
                for s in tl.static_range(CAP):
                    for i in tl.static_range(D):
                        rn = rn + (tl.where(a // c == s, y[i], ring[s * D + i]),)
                ring = rn
            y = _mv(E, y, D)
        ybar = ()
        for i in tl.static_range(D):
            ybar = ybar + (tl.zeros_like(x0[0]),)
        for ia in range(0, L):
            a = L - ia
            yb = ()
            for i in tl.static_range(D):
                acc = ybar[i]
                for k in tl.static_range(BT):
                    acc += tl.where(ok[k] & (neg[k] == NEG) & (lev[k] == a), GY[k * D + i], 0.0)
                yb = yb + (acc,)
            ybar = yb
            seg = (a - 1) // c
            yp = ()
            for i in tl.static_range(D):
                v = ring[i]
                for s in tl.static_range(1, CAP):
                    v = tl.where(seg == s, ring[s * D + i], v)
                yp = yp + (v,)
            for r in range(0, a - 1 - seg * c):
                yp = _mv(E, yp, D)
            dE = _rank1(dE, ybar, yp, D)
            ybar = _mtv(E, ybar, D)
        out = ()
        for i in tl.static_range(D):
            acc = dx0[i] + ybar[i]
            for k in tl.static_range(BT):
                acc += tl.where((neg[k] == NEG) & (lev[k] == 0), GY[k * D + i], 0.0)
            out = out + (acc,)
        return dE, out


def _kernel_args(A, x0, dt):
    theta, _ = taylor_params(A.dtype)
    B, D = x0.shape
    return dict(B=B, T=dt.shape[1], sAb=A.stride(0), sAi=A.stride(1), sAj=A.stride(2),
                sxb=x0.stride(0), sxd=x0.stride(1), stb=dt.stride(0), stt=dt.stride(1),
                theta=theta, nu_max=NU_MAX)


def forward_launch(A, x0, dt, X, V, anchors=None):
    """(kernel, grid, keyword arguments) of the forward launch."""
    cfg = block_config(x0.shape[1], A.dtype)
    kw = dict(A_ptr=A, x0_ptr=x0, dt_ptr=dt, X_ptr=X, V_ptr=V, Y_ptr=X if anchors is None else anchors,
              **_kernel_args(A, x0, dt), D=cfg["D"], BB=cfg["BB"], BT=cfg["BT"], M=cfg["M"], MF=cfg["MF"],
              SAVE_ANCHORS=anchors is not None, num_warps=cfg["num_warps"])
    return _llstep_fwd_kernel, (triton.cdiv(x0.shape[0], cfg["BB"]),), kw


def backward_launch(A, x0, dt, gX, gV, dA, dx0, ddt, anchors=None):
    """(kernel, grid, keyword arguments) of the backward launch."""
    cfg = block_config(x0.shape[1], A.dtype)
    kw = dict(A_ptr=A, x0_ptr=x0, dt_ptr=dt, gX_ptr=gX, gV_ptr=gV, dA_ptr=dA, dx0_ptr=dx0, ddt_ptr=ddt,
              Y_ptr=gX if anchors is None else anchors, **_kernel_args(A, x0, dt), D=cfg["D"], BB=cfg["BB"],
              BT=cfg["BT_BWD"], M=cfg["M"], MF=cfg["MF"], CAP=cfg["CAP"], SAVE_ANCHORS=anchors is not None,
              num_warps=cfg["num_warps"])
    return _llstep_bwd_kernel, (triton.cdiv(x0.shape[0], cfg["BB"]),), kw


def llstep_forward(A: torch.Tensor, x0: torch.Tensor, dt: torch.Tensor, anchors=None):
    """Launch the forward kernel; inputs validated, any strides; returns contiguous X, V (B,T,D).

    ``anchors``: an optional (B, T, D) tensor that receives each pair's anchor state (register
    kernels only)."""
    B, D = x0.shape
    if not uses_register_kernels(D, A.dtype):
        return triton_tiled.llstep_forward(A, x0, dt)
    X = torch.empty((B, dt.shape[1], D), dtype=A.dtype, device=A.device)
    V = torch.empty_like(X)
    kernel, grid, kw = forward_launch(A, x0, dt, X, V, anchors)
    kernel[grid](**kw)
    return X, V


def llstep_backward(A, x0, dt, gX, gV, anchors=None):
    """Launch the backward kernel; returns dA (B,D,D), dx0 (B,D), ddt (B,T).

    ``anchors``: an optional (B, T, D) tensor that receives the anchor states the backward
    recomputes (register kernels only)."""
    B, D = x0.shape
    if not uses_register_kernels(D, A.dtype):
        return triton_tiled.llstep_backward(A, x0, dt, gX, gV)
    T = dt.shape[1]
    gX = torch.zeros((B, T, D), dtype=A.dtype, device=A.device) if gX is None else gX.contiguous()
    gV = torch.zeros((B, T, D), dtype=A.dtype, device=A.device) if gV is None else gV.contiguous()
    dA = torch.empty((B, D, D), dtype=A.dtype, device=A.device)
    dx0 = torch.empty((B, D), dtype=A.dtype, device=A.device)
    ddt = torch.empty((B, T), dtype=A.dtype, device=A.device)
    kernel, grid, kw = backward_launch(A, x0, dt, gX, gV, dA, dx0, ddt, anchors)
    kernel[grid](**kw)
    return dA, dx0, ddt


class LocalLinearStepFunction(torch.autograd.Function):
    """Autograd wrapper: forward and backward are one kernel launch each."""

    @staticmethod
    def forward(ctx, A, x0, dt):
        X, V = llstep_forward(A, x0, dt)
        ctx.save_for_backward(A, x0, dt)
        return X, V

    @staticmethod
    def backward(ctx, gX, gV):
        A, x0, dt = ctx.saved_tensors
        with torch.no_grad():
            grads = llstep_backward(A, x0, dt, gX, gV)
        return first_order_only(SECOND_ORDER, grads, (A, x0, dt))


@torch.compiler.disable
def local_linear_step_triton(A: torch.Tensor, x0: torch.Tensor, dt: torch.Tensor):
    """X, V (B,T,D) through the Triton kernels; inputs validated; differentiable in A, x0, dt."""
    B, T = dt.shape
    if B == 0 or T == 0:
        return empty_result(A, x0, dt)
    return LocalLinearStepFunction.apply(A, x0, dt)
