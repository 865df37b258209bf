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

Backward, per cell (``_llstep_bwd_kernel``), per block of BT = 16 target times (the forward's
block): the anchor march is repeated (the same @jit helpers, so its states are bit for bit the
forward's), storing each pair's anchor state and CAP checkpoints per direction in a per-lane
scratch; then, one pair at a time, the pair's Horner is recomputed and run in reverse
(dZ += sum_j (rho/j) Xbar_j X_{j+1}^T, drho, and the anchor adjoint Ybar, stored in place of the
anchor state); then the march is reversed once for the whole block (dE += ybar_a y_{a-1}^T,
ybar_{a-1} = E^T ybar_a + the Ybar of the pairs at level a-1, with y_{a-1} recomputed from the
nearest checkpoint); finally dZ += the gradient through p(+-Z), by reverse mode through the
Paterson-Stockmeyer evaluation of ``_step_matrix``.

float32 with REG_MAX_D < D <= 16 takes the lane-group forward of ``triton_group.py``; those D
(backward) and D up to 64, and float64, take the lane-tiled kernels of ``triton_tiled.py``.
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
    forward, 9.8 kB backward): float32 up to D = 16 takes the lane-group forward
    (``triton_group``), and the lane-tiled kernels take the rest."""
    return dtype == torch.float32 and D <= REG_MAX_D


def block_config(D: int, dtype: torch.dtype) -> dict:
    """Compile-time configuration of the register kernels (``uses_register_kernels``)."""
    theta, m = taylor_params(dtype)
    return dict(D=D, BB=BB, BT=16, BT_BWD=16, M=m, MF=FINISH[dtype],
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
    def _mm(P, Q, D: tl.constexpr, TP: tl.constexpr, TQ: tl.constexpr = False, C=None):
        """op(P) op(Q) (+ C), op(P) = P^T when TP, op(Q) = Q^T when TQ."""
        out = ()
        for i in tl.static_range(D):
            for k in tl.static_range(D):
                for j in tl.static_range(D):
                    p = P[j * D + i] if TP else P[i * D + j]
                    q = Q[k * D + j] if TQ else Q[j * D + k]
                    if j == 0:
                        if C is None:
                            acc = p * q
                        else:
                            acc = tl.fma(p, q, C[i * D + k])
                    else:
                        acc = tl.fma(p, q, acc)
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
    def _coefs(dtype, M: tl.constexpr):
        """(c_0, .., c_{M+2}): c_k = 1/k! up to k = M, then 0."""
        c = tl.cast(1.0, dtype)
        coef = ()
        for k in tl.static_range(M + 3):
            if k > M:
                coef = coef + (c * 0.0,)
            else:
                if k > 0:
                    c = c / k
                coef = coef + (c,)
        return coef

    @triton.jit
    def _ps_block(W, W2, coef, q: tl.constexpr, D: tl.constexpr, P=None):
        """B_q = c_3q I + c_3q+1 W + c_3q+2 W^2 (+ P)."""
        out = ()
        for e in tl.static_range(D * D):
            v = W[e] * coef[3 * q + 1] + W2[e] * coef[3 * q + 2]
            if e % (D + 1) == 0:
                v += coef[3 * q]
            if P is not None:
                v += P[e]
            out = out + (v,)
        return out

    @triton.jit
    def _scaled(Z, s, D: tl.constexpr):
        out = ()
        for e in tl.static_range(D * D):
            out = out + (Z[e] * s,)
        return out

    @triton.jit
    def _step_matrix(Z, SGN: tl.constexpr, D: tl.constexpr, M: tl.constexpr):
        """p_M(SGN Z) = sum_{k<=M} (SGN Z)^k / k! by Paterson-Stockmeyer with blocks of three
        (Higham, Functions of Matrices, 2008, sec. 4.4.3): with W = SGN Z,
        p = P_0, P_q = B_q + W^3 P_{q+1}, P_top = B_top (top = M // 3),
        B_q = c_3q I + c_3q+1 W + c_3q+2 W^2: M // 3 + 2 matrix products instead of M - 1."""
        W = _scaled(Z, SGN, D)
        W2 = _mm(W, W, D, False)
        W3 = _mm(W, W2, D, False)
        coef = _coefs(Z[0].dtype, M)
        P = _ps_block(W, W2, coef, M // 3, D)
        for q in tl.static_range(1, M // 3 + 1):
            P = _ps_block(W, W2, coef, M // 3 - q, D, _mm(W3, P, D, False))
        return P

    @triton.jit
    def _step_matrix_grad(Z, G, SGN: tl.constexpr, D: tl.constexpr, M: tl.constexpr):
        """d<G, p_M(SGN Z)>/dZ: reverse mode through ``_step_matrix``'s Paterson-Stockmeyer
        scheme: 3 (M // 3) + 5 matrix products (14 at M = 11), against 3 (M - 1) (30) for Horner on
        the block form of the Frechet derivative (Mathias 1996)."""
        W = _scaled(Z, SGN, D)
        W2 = _mm(W, W, D, False)
        W3 = _mm(W, W2, D, False)
        coef = _coefs(Z[0].dtype, M)
        NB: tl.constexpr = M // 3 + 1
        # The forward's partial results P_1 .. P_top, concatenated (P_q at (q - 1) * D * D).
        P = _ps_block(W, W2, coef, NB - 1, D)
        Ps = P
        for q in tl.static_range(1, NB - 1):
            P = _ps_block(W, W2, coef, NB - 1 - q, D, _mm(W3, P, D, False))
            Ps = P + Ps
        # Adjoints: Gq of P_q (G of P_0), W3bar; B_q's adjoint is Gq.
        Wb = _scaled(G, coef[1], D)
        W2b = _scaled(G, coef[2], D)
        W3b = ()
        Gq = G
        for q in tl.static_range(NB - 1):  # P_q = B_q + W3 P_{q+1}
            Pn = ()
            for e in tl.static_range(D * D):
                Pn = Pn + (Ps[q * D * D + e],)
            if q == 0:
                W3b = _mm(Gq, Pn, D, False, True)
            else:
                W3b = _mm(Gq, Pn, D, False, True, W3b)
            Gq = _mm(W3, Gq, D, True)
            Wn = ()
            W2n = ()
            for e in tl.static_range(D * D):
                Wn = Wn + (tl.fma(Gq[e], coef[3 * q + 4], Wb[e]),)
                W2n = W2n + (tl.fma(Gq[e], coef[3 * q + 5], W2b[e]),)
            Wb = Wn
            W2b = W2n
        # W3 = W W2, W2 = W W.
        Wb = _mm(W3b, W2, D, False, True, Wb)
        W2b = _mm(W, W3b, D, True, False, W2b)
        Wb = _mm(W2b, W, D, False, True, Wb)
        Wb = _mm(W, W2b, D, True, False, Wb)
        return _scaled(Wb, SGN, D)

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
            rho = rho + (_pair_rho(tau, okk, m, lv, inv_h),)
        return inr, ok, neg, lev, rho

    @triton.jit
    def _pair_rho(tau, okk, m, lv, inv_h):
        """Signed remainder dt / h -+ level of a pair.  A pair that cannot be computed gets
        rho = NaN: its X, V and ddt come out NaN."""
        return tl.where(okk | ~m, tau * inv_h - tl.where(tau < 0, -lv, lv), float("nan"))

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
    def _march(E, x0, Y, ok, neg, lev, NEG: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
               ring_ptr=None, CAP: tl.constexpr = 1, BB: tl.constexpr = 1):
        """Anchor states of one direction: Y[k] = E^lev[k] x0 for the pairs of that direction.

        With ``ring_ptr`` (backward), the states y_0, y_c, y_2c, .. (c = ceil(L / CAP), L the top
        level) are stored there as checkpoints for the reverse march (``_ring``)."""
        L = _top_level(ok, neg, lev, NEG, BT)
        c = tl.maximum((L + CAP - 1) // CAP, 1)
        nxt = L * 0  # the next checkpoint's level
        y = x0
        for a in range(1, L + 1):
            if ring_ptr is not None:
                if a - 1 == nxt:
                    _park(ring_ptr + (nxt // c) * D * BB, y, D, BB)
                    nxt += c
            y = _mv(E, y, D)
            Yn = ()
            for k in tl.static_range(BT):
                at = ok[k] & (neg[k] == NEG) & (lev[k] == a)
                for i in tl.static_range(D):
                    Yn = Yn + (tl.where(at, y[i], Y[k * D + i]),)
            Y = Yn
        return Y

    @triton.jit
    def _anchor_states(Ep, En, x0, ok, neg, lev, HAS_POS, HAS_NEG, D: tl.constexpr, BT: tl.constexpr,
                       ring_ptr=None, CAP: tl.constexpr = 1, BB: tl.constexpr = 1):
        """Y[k*D + i]: the state at the anchor of pair k (x0 at level 0).  With ``ring_ptr``, each
        direction's checkpoints go there (+ at slots 0 .. CAP-1, - at CAP .. 2 CAP-1)."""
        Y = ()
        for k in tl.static_range(BT):
            for i in tl.static_range(D):
                Y = Y + (x0[i],)
        if HAS_POS:
            Y = _march(Ep, x0, Y, ok, neg, lev, False, D, BT, ring_ptr, CAP, BB)
        if HAS_NEG:
            if ring_ptr is None:
                Y = _march(En, x0, Y, ok, neg, lev, True, D, BT)
            else:
                Y = _march(En, x0, Y, ok, neg, lev, True, D, BT, ring_ptr + CAP * D * BB, CAP, BB)
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
    def _park(ptr, v, n: tl.constexpr, BB: tl.constexpr):
        """Store the tuple v at scratch slots ptr, ptr + BB, .. (one value per lane and slot)."""
        for e in tl.static_range(n):
            tl.store(ptr + e * BB, v[e])

    @triton.jit
    def _unpark(ptr, n: tl.constexpr, BB: tl.constexpr):
        out = ()
        for e in tl.static_range(n):
            out = out + (tl.load(ptr + e * BB),)
        return out

    @triton.jit
    def _llstep_bwd_kernel(A_ptr, x0_ptr, dt_ptr, gX_ptr, gV_ptr, dA_ptr, dx0_ptr, ddt_ptr, S_ptr, Y_ptr, B, T,
                           sAb, sAi, sAj, sxb, sxd, stb, stt, theta, nu_max,
                           D: tl.constexpr, BB: tl.constexpr, BT: tl.constexpr,
                           M: tl.constexpr, MF: tl.constexpr, CAP: tl.constexpr,
                           SAVE_ANCHORS: tl.constexpr):
        """dA (B, D, D), dx0 (B, D), ddt (B, T) from the upstream gX, gV (B, T, D) contiguous.

        S: scratch of ``scratch_size`` elements, private to each program and lane (the lane index
        fastest, so every access is coalesced).  Per time block of BT pairs:
        1. the anchor march of ``_anchor_states`` (bit for bit the forward's), which stores each
           pair's anchor state and CAP checkpoints per direction in S;
        2. one pair at a time: its Horner finish recomputed and run in reverse (dZ, ddt, and the
           pair's anchor adjoint Ybar, which replaces its anchor state in S);
        3. the anchor marches reversed once for all pairs of the block (dE, dx0).
        The D x D quantities each phase does not use wait in S (``_park``), so that no phase holds
        all of them in registers.
        A pair with NaN/Inf or out-of-range inputs poisons its cell's dA and dx0 (as it would in
        a dense computation) and its own ddt; it is never silently dropped.
        """
        cell, cm, Z, x0, nrm, finite, h, inv_h = _load_cell(
            A_ptr, x0_ptr, B, sAb, sAi, sAj, sxb, sxd, theta, D, BB)
        hi_pos, hi_neg = _levels(dt_ptr, cell, cm, T, stb, stt, nrm, finite, theta, nu_max, BT)
        TP = tl.cdiv(T, BT) * BT
        # S per program: pair slots (t, i), checkpoints (2 CAP D), then Z, dZ, E+, E-, dE+, dE-.
        sbase = S_ptr + tl.program_id(0).to(tl.int64) * ((TP + 2 * CAP + 6 * D) * D * BB) + tl.arange(0, BB)
        ring = sbase + TP * D * BB
        s_z = ring + 2 * CAP * D * BB
        s_dz = s_z + D * D * BB
        s_ep = s_dz + D * D * BB
        s_en = s_ep + D * D * BB
        s_dep = s_en + D * D * BB
        s_den = s_dep + D * D * BB
        Ep, En = _step_matrices(Z, hi_pos, hi_neg, D, M)
        zero = tl.zeros_like(x0[0])
        dZ = ()
        for e in tl.static_range(D * D):
            dZ = dZ + (zero,)
        _park(s_z, Z, D * D, BB)
        _park(s_dz, dZ, D * D, BB)
        _park(s_ep, Ep, D * D, BB)
        _park(s_en, En, D * D, BB)
        _park(s_dep, dZ, D * D, BB)
        _park(s_den, dZ, D * D, BB)
        dx0 = ()
        for i in tl.static_range(D):
            dx0 = dx0 + (zero,)
        cell_bad = cm & ~cm
        for t0 in range(0, T, BT):
            inr, ok, neg, lev, rho = _pairs(dt_ptr, cell, cm, t0, T, stb, stt, nrm, finite, inv_h,
                                            theta, nu_max, BT)
            Y = _anchor_states(_unpark(s_ep, D * D, BB), _unpark(s_en, D * D, BB), x0, ok, neg, lev,
                               hi_pos > 0, hi_neg > 0, D, BT, ring, CAP, BB)
            if SAVE_ANCHORS:
                _save_anchors(Y_ptr, Y, cell, t0, T, inr, D, BT)
            _park(sbase + t0 * D * BB, Y, BT * D, BB)
            # 2. pairs, one at a time
            Z = _unpark(s_z, D * D, BB)
            dZ = _unpark(s_dz, D * D, BB)
            for t in range(t0, tl.minimum(t0 + BT, T)):
                tau, okk, lv = _pair_level(dt_ptr, cell, cm, t, stb, stt, nrm, finite, theta, nu_max)
                r = _pair_rho(tau, okk, cm, lv, inv_h)
                y = _unpark(sbase + t * D * BB, D, BB)
                gx = ()
                gvh = ()  # upstream of Z X (V = (Z X) / h)
                for i in tl.static_range(D):
                    gx = gx + (tl.load(gX_ptr + (cell * T + t) * D + i, mask=cm, other=0.0),)
                    gvh = gvh + (tl.load(gV_ptr + (cell * T + t) * D + i, mask=cm, other=0.0) * inv_h,)
                dZ, ybar, drho = _pair_adjoint(Z, y, r, gx, gvh, dZ, D, MF)
                _park(sbase + t * D * BB, ybar, D, BB)
                tl.store(ddt_ptr + cell * T + t, drho * inv_h, mask=cm)
                cell_bad = cell_bad | (cm & ~okk)
            _park(s_dz, dZ, D * D, BB)
            # 3. the anchor marches in reverse, all pairs of the block at once
            GY = _unpark(sbase + t0 * D * BB, BT * D, BB)
            dx0 = _level0(GY, dx0, inr, lev, D, BT)
            if hi_pos > 0:
                dEp, dx0 = _march_back(_unpark(s_ep, D * D, BB), GY, _unpark(s_dep, D * D, BB), dx0,
                                       ok, neg, lev, ring, False, D, BT, CAP, BB)
                _park(s_dep, dEp, D * D, BB)
            if hi_neg > 0:
                dEn, dx0 = _march_back(_unpark(s_en, D * D, BB), GY, _unpark(s_den, D * D, BB), dx0,
                                       ok, neg, lev, ring + CAP * D * BB, True, D, BT, CAP, BB)
                _park(s_den, dEn, D * D, BB)
        Z = _unpark(s_z, D * D, BB)
        dZ = _unpark(s_dz, D * D, BB)
        if hi_pos > 0:
            G = _step_matrix_grad(Z, _unpark(s_dep, D * D, BB), 1.0, D, M)
            dZn = ()
            for e in tl.static_range(D * D):
                dZn = dZn + (dZ[e] + G[e],)
            dZ = dZn
        if hi_neg > 0:
            G = _step_matrix_grad(Z, _unpark(s_den, D * D, BB), -1.0, D, M)
            dZn = ()
            for e in tl.static_range(D * D):
                dZn = dZn + (dZ[e] + G[e],)
            dZ = dZn
        for e in tl.static_range(D * D):
            tl.store(dA_ptr + cell * (D * D) + e, tl.where(cell_bad, float("nan"), dZ[e] * h), mask=cm)
        for i in tl.static_range(D):
            tl.store(dx0_ptr + cell * D + i, tl.where(cell_bad, float("nan"), dx0[i]), mask=cm)

    @triton.jit
    def _pair_adjoint(Z, y, rho, gx, gvh, dZ, D: tl.constexpr, MF: tl.constexpr):
        """One pair's finish X = p_MF(rho Z) y, V = (Z X) / h in reverse: dZ accumulated, and the
        adjoints of the anchor state y and of rho, from the upstream gx of X and gvh of Z X."""
        X, Ws = _finish(Z, y, rho, D, MF)  # X_{j+1} is re-formed from W_{j+1} below
        # V: dZ += gvh X^T, and X receives Z^T gvh.
        dZ = _rank1(dZ, gvh, X, D)
        ZTg = _mtv(Z, gvh, D)
        xbar = ()
        for i in tl.static_range(D):
            xbar = xbar + (gx[i] + ZTg[i],)
        ybar = xbar
        drho = tl.zeros_like(rho)
        for j in tl.static_range(1, MF + 1):  # X_j = y + (rho/j) W_j, W_j = Z X_{j+1}
            wbar = ()
            xn = ()  # X_{j+1}, exactly as the Horner above formed it
            dr = tl.zeros_like(rho)
            for i in tl.static_range(D):  # W_j sits at position MF - j of Ws
                dr = tl.fma(xbar[i], Ws[(MF - j) * D + i], dr)
                wbar = wbar + (xbar[i] * (rho * (1.0 / j)),)
                if j == MF:
                    xn = xn + (y[i],)
                else:
                    xn = xn + (tl.fma(Ws[(MF - j - 1) * D + i], rho * (1.0 / (j + 1)), y[i]),)
            drho += dr * (1.0 / j)
            dZ = _rank1(dZ, wbar, xn, D)
            xbar = _mtv(Z, wbar, D)
            yb = ()
            for i in tl.static_range(D):
                yb = yb + (ybar[i] + xbar[i],)
            ybar = yb
        return dZ, ybar, drho

    @triton.jit
    def _save_anchors(Y_ptr, Y, cell, t0, T, inr, D: tl.constexpr, BT: tl.constexpr):
        for k in tl.static_range(BT):
            for i in tl.static_range(D):
                tl.store(Y_ptr + (cell * T + t0 + k) * D + i, Y[k * D + i], mask=inr[k])

    @triton.jit
    def _level0(GY, dx0, inr, lev, D: tl.constexpr, BT: tl.constexpr):
        """dx0 += Ybar of the pairs at level 0, either direction (their anchor is x0)."""
        out = ()
        for i in tl.static_range(D):
            acc = dx0[i]
            for k in tl.static_range(BT):
                acc += tl.where(inr[k] & (lev[k] == 0), GY[k * D + i], 0.0)
            out = out + (acc,)
        return out

    @triton.jit
    def _march_back(E, GY, dE, dx0, ok, neg, lev, ring_ptr, NEG: tl.constexpr, D: tl.constexpr,
                    BT: tl.constexpr, CAP: tl.constexpr, BB: tl.constexpr):
        """Adjoint of one direction's anchor march of this time block: ybar_{a-1} = E^T ybar_a +
        the Ybar of the pairs at level a-1, dE += ybar_a y_{a-1}^T, dx0 += ybar_0.

        The states y_{a-1} are needed in reverse order: each is recomputed from the nearest
        checkpoint below it (``_march``'s ring, every c-th level), at most c - 1 matvecs."""
        L = _top_level(ok, neg, lev, NEG, BT)
        c = tl.maximum((L + CAP - 1) // CAP, 1)
        # 1.0 for the pairs of this direction at the level of the loop below, else 0.0: their
        # Ybar enter ybar by FMA.  (0 * Ybar of a pair that could not be computed is NaN, but such
        # a pair makes its cell's dA and dx0 NaN anyway.)
        sl = ()
        for k in tl.static_range(BT):
            sl = sl + (tl.where(ok[k] & (neg[k] == NEG), lev[k], 0),)
        ybar = ()
        for i in tl.static_range(D):
            ybar = ybar + (tl.zeros_like(GY[0]),)
        seg = (L - 1) // c  # checkpoint below level a - 1
        for ia in range(0, L):
            a = L - ia
            hit = ()
            for k in tl.static_range(BT):
                hit = hit + (tl.where(sl[k] == a, 1.0, 0.0),)
            yb = ()
            for i in tl.static_range(D):
                acc = ybar[i]
                for k in tl.static_range(BT):
                    acc = tl.fma(hit[k], GY[k * D + i], acc)
                yb = yb + (acc,)
            ybar = yb
            if a - 1 < seg * c:
                seg -= 1
            yp = _unpark(ring_ptr + seg * D * BB, D, BB)
            for r in range(0, a - 1 - seg * c):
                yp = _mv(E, yp, D)
            dE = _rank1(dE, ybar, yp, D)
            ybar = _mtv(E, ybar, D)
        out = ()
        for i in tl.static_range(D):
            out = out + (dx0[i] + ybar[i],)
        return dE, out


def scratch_size(B: int, T: int, D: int) -> int:
    """Elements of the backward kernel's scratch S."""
    cfg = block_config(D, torch.float32)
    bt = cfg["BT_BWD"]
    return triton.cdiv(B, cfg["BB"]) * cfg["BB"] * (triton.cdiv(T, bt) * bt + 2 * cfg["CAP"] + 6 * D) * D


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


def backward_launch(A, x0, dt, gX, gV, dA, dx0, ddt, S, anchors=None):
    """(kernel, grid, keyword arguments) of the backward launch; S: ``scratch_size`` elements."""
    cfg = block_config(x0.shape[1], A.dtype)
    kw = dict(A_ptr=A, x0_ptr=x0, dt_ptr=dt, gX_ptr=gX, gV_ptr=gV, dA_ptr=dA, dx0_ptr=dx0, ddt_ptr=ddt, S_ptr=S,
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
        from . import triton_group  # (it imports helpers from this module)

        if anchors is None and triton_group.uses_group_kernel(D, A.dtype):
            return triton_group.llstep_forward(A, x0, dt)
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
    S = torch.empty(scratch_size(B, T, D), dtype=A.dtype, device=A.device)
    kernel, grid, kw = backward_launch(A, x0, dt, gX, gV, dA, dx0, ddt, S, anchors)
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
