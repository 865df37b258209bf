"""Register kernels of ``local_linear_step``: float32, D <= REG_MAX_D = 5.

Layout: one cell per lane, BB = 32 cells per program (one warp).  Every quantity of a cell is a
tuple of 1-D tensors over the program's cells, unrolled over D at compile time: the operator is
D*D registers, a state D registers, and a matrix-vector product is D*D FMAs inside one thread,
with no cross-lane traffic (no shared memory, no barriers).  Beyond D = 5 the unrolled code
outgrows the register file (sm_90, triton 3.8: D = 8 float32 spills 1.4 kB and compiles in
minutes; D = 5 float64 spills 1.6 kB forward, 9.8 kB backward): float32 up to D = 16 takes the
lane-group kernels (``triton_group``), the rest the tiled ones (``triton_tiled``).

Scheme (the anchored Taylor steps of ``common.py``, evaluated for registers):

* per cell once: Z = h A with h = theta / ||A||_1, and the anchor-step matrices
  E+ = p_M(Z), E- = p_M(-Z) (degree-M Taylor polynomial, Paterson-Stockmeyer on D x D
  matrices), each only if some pair of the program needs it;
* per block of BT target times: the anchors y_a = E^a x0 of each direction are marched once
  (one matvec per level) and every pair captures the state at its own level: the nearest
  anchor, so that its signed remainder rho = dt / h - (+-a) has |rho| <= 1/2;
* every pair is then finished once: X = p_MF(rho Z) y_a by Horner on vectors (MF matvecs; MF is
  lower than M because |rho Z| <= theta / 2), and V = A X = (Z X) / h.

Backward, per cell (``_llstep_bwd_reg_kernel``), over all T target times at once: each
direction's anchors are marched again (the same arithmetic, so the states are bit for bit the
forward's) and every level's state is kept in a per-lane scratch; then, one pair at a time, the
pair's Horner is recomputed from its anchor's state and run in reverse (dZ += sum_j (rho/j)
Xbar_j X_{j+1}^T, drho, and the anchor adjoint Ybar, summed per level); then each march is
reversed (dE += ybar_a y_{a-1}^T, ybar_{a-1} = E^T ybar_a + the summed Ybar of level a-1) and dZ
+= the gradient through p(+-Z), by reverse mode through the Paterson-Stockmeyer evaluation of
``_step_matrix``.  The scratch holds, per cell, a state and an adjoint sum for each of LS levels
per direction, and E+-: 4 LS D + 2 D^2 floats (``VARIANT.scratch``), LS from
``triton_impl.anchor_slots`` (the launch's highest level + 2).

``VARIANT`` is this family as the dispatch (``triton_impl``) and the compile tools see it.
"""
from __future__ import annotations

import torch

from ..utils import HAS_TRITON, tl, triton
from ..variant import KernelVariant, launch_kwargs
from .common import FINISH, launch_scalars, taylor_params

REG_MAX_D = 5  # largest D of the register kernels (float32 only)
BB = 32  # cells per program: one warp, one cell per lane


def config(kind: str, D: int, dtype: torch.dtype, T: int = 16) -> dict:
    """Compile-time configuration of the register kernels, forward and backward alike (the
    backward takes all T target times at once: BT is the forward's time block)."""
    _, m = taylor_params(dtype)
    return dict(D=D, BB=BB, BT=16, M=m, MF=FINISH[dtype], num_warps=1)


def scratch(D: int, LS: int) -> tuple[int, int]:
    """Cells per program and scratch elements per program of the backward (``_scratch_base``)."""
    return BB, BB * (4 * LS * D + 2 * D * D)


if HAS_TRITON:
    from .triton_jit import (_coefs, _lane_tops, _mv, _pair_level, _pair_slot, _pairs, _park, _rank1, _step_scale,
                             _unpark, _vadd)

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
    def _step_matrix(Z, SGN, D: tl.constexpr, M: tl.constexpr):
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
    def _step_matrix_grad(Z, G, SGN, D: tl.constexpr, M: tl.constexpr):
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
        h, inv_h, Z = _step_scale(A, nrm, theta, D * D)
        return cell, cm, Z, x0, nrm, finite, h, inv_h

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
        L = _top_level(ok, neg, lev, NEG, BT)
        y = x0
        for a in range(1, L + 1):
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
    def _llstep_fwd_reg_kernel(A_ptr, x0_ptr, dt_ptr, X_ptr, V_ptr, B, T,
                               sAb, sAi, sAj, sxb, sxd, stb, stt, theta, nu_max,
                               D: tl.constexpr, BB: tl.constexpr, BT: tl.constexpr,
                               M: tl.constexpr, MF: tl.constexpr):
        """X, V (B, T, D) contiguous from A (B, D, D), x0 (B, D), dt (B, T), any strides."""
        cell, cm, Z, x0, nrm, finite, h, inv_h = _load_cell(
            A_ptr, x0_ptr, B, sAb, sAi, sAj, sxb, sxd, theta, D, BB)
        hi_pos, hi_neg = _levels(dt_ptr, cell, cm, T, stb, stt, nrm, finite, theta, nu_max, BT)
        Ep, En = _step_matrices(Z, hi_pos, hi_neg, D, M)
        for t0 in range(0, T, BT):
            inr, ok, neg, lev, rho = _pairs(dt_ptr, cell, cm, t0, T, stb, stt, nrm, finite, inv_h,
                                            theta, nu_max, BT)
            Y = _anchor_states(Ep, En, x0, ok, neg, lev, hi_pos > 0, hi_neg > 0, D, BT)
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
    def _scratch_base(S_ptr, LS, D: tl.constexpr, BB: tl.constexpr):
        """This program's lanes in the backward's scratch S (``_llstep_bwd_reg_kernel``): per
        program, the states (2 LS slots of D), the adjoint sums (2 LS slots of D), E+ and E-; a
        slot holds one value per lane, the lane index fastest."""
        return S_ptr + tl.program_id(0).to(tl.int64) * ((4 * LS * D + 2 * D * D) * BB) + tl.arange(0, BB)

    @triton.jit
    def _llstep_bwd_reg_kernel(A_ptr, x0_ptr, dt_ptr, gX_ptr, gV_ptr, dA_ptr, dx0_ptr, ddt_ptr, S_ptr, B, T, LS,
                               sAb, sAi, sAj, sxb, sxd, stb, stt, theta, nu_max,
                               D: tl.constexpr, BB: tl.constexpr, M: tl.constexpr, MF: tl.constexpr):
        """dA (B, D, D), dx0 (B, D), ddt (B, T) from the upstream gX, gV (B, T, D) contiguous.

        S: scratch of ``VARIANT.scratch_size(B, D, LS)`` elements, private to each program and lane (the
        lane index fastest, so every access is coalesced); LS - 1 >= every pair's anchor level
        (``anchor_slots``).  Per cell, with slot (d, a) for direction d (0: dt >= 0, 1: dt < 0)
        and level a:
        1. per direction, the anchor march of the forward (the same arithmetic, so its states are
           bit for bit the forward's) stores every level's state y_a in its slot;
        2. one pair at a time: its Horner finish recomputed from the state in its slot and run in
           reverse (dZ, ddt, and the anchor adjoint Ybar, summed into the slot's accumulator);
        3. per direction, the march reversed: ybar_{a-1} = E^T ybar_a + the accumulated Ybar of
           level a-1, dE += ybar_a y_{a-1}^T, dx0 += ybar_0; then dZ += the gradient through
           E = p(+-Z).
        A pair with NaN/Inf or out-of-range inputs poisons its cell's dA and dx0 (as it would in
        a dense computation) and its own ddt; it is never silently dropped.
        """
        cell, cm, Z, x0, nrm, finite, h, inv_h = _load_cell(
            A_ptr, x0_ptr, B, sAb, sAi, sAj, sxb, sxd, theta, D, BB)
        sbase = _scratch_base(S_ptr, LS, D, BB)
        s_acc = sbase + 2 * LS * D * BB
        s_e = s_acc + 2 * LS * D * BB
        zero = tl.zeros_like(x0[0])
        zeros = ()
        for i in tl.static_range(D):
            zeros = zeros + (zero,)
        top_p, top_n = _lane_tops(dt_ptr, cell, cm, T, stb, stt, nrm, finite, theta, nu_max, LS)
        # 1. the anchor states of each direction
        for d in range(0, 2):
            sgn = 1.0 - 2.0 * d
            top = tl.maximum(tl.max(tl.where(d == 0, top_p, top_n), axis=0), 0)
            E = Z
            if top > 0:
                E = _step_matrix(Z, sgn, D, M)
                _park(s_e + d * (D * D * BB), E, D * D, BB)
            y = x0
            for a in range(0, top + 1):
                if a > 0:
                    y = _mv(E, y, D)
                _park(sbase + (d * LS + a) * (D * BB), y, D, BB)
                _park(s_acc + (d * LS + a) * (D * BB), zeros, D, BB)
        # 2. the pairs, one at a time
        zmat = ()
        for e in tl.static_range(D * D):
            zmat = zmat + (zero,)
        dZ = zmat
        cell_bad = cm & ~cm
        for t in range(0, T):
            okk, r, slot = _pair_slot(dt_ptr, cell, cm, t, stb, stt, nrm, finite, theta, nu_max, inv_h, LS)
            slot = slot * (D * BB)
            y = _unpark(sbase + slot, D, BB)
            gx = ()
            gvh = ()  # upstream of Z X (V = (Z X) / h)
            for i in tl.static_range(D):
                gx = gx + (tl.load(gX_ptr + (cell * T + t) * D + i, mask=cm, other=0.0),)
                gvh = gvh + (tl.load(gV_ptr + (cell * T + t) * D + i, mask=cm, other=0.0) * inv_h,)
            dZ, ybar, drho = _pair_adjoint(Z, y, r, gx, gvh, dZ, D, MF)
            _park(s_acc + slot, _vadd(_unpark(s_acc + slot, D, BB), ybar, D), D, BB)
            tl.store(ddt_ptr + cell * T + t, drho * inv_h, mask=cm)
            cell_bad = cell_bad | (cm & ~okk)
        # 3. the marches in reverse
        dx0 = zeros
        for d in range(0, 2):
            sgn = 1.0 - 2.0 * d
            mine = tl.where(d == 0, top_p, top_n)
            top = tl.maximum(tl.max(mine, axis=0), 0)
            E = Z
            if top > 0:
                E = _unpark(s_e + d * (D * D * BB), D * D, BB)
            dE = zmat
            ybar = _unpark(s_acc + (d * LS + top) * (D * BB), D, BB)
            for ia in range(0, top):
                a = top - ia
                # (a lane whose own pairs stop below level a has ybar = 0 here; its state is not
                # read, so that a state that overflowed cannot turn 0 into NaN)
                y = _unpark(sbase + (d * LS + a - 1) * (D * BB), D, BB, a <= mine)
                dE = _rank1(dE, ybar, y, D)
                ybar = _mtv(E, ybar, D)
                ybar = _vadd(ybar, _unpark(s_acc + (d * LS + a - 1) * (D * BB), D, BB), D)
            dx0 = _vadd(dx0, ybar, D)
            if top > 0:
                dZ = _vadd(dZ, _step_matrix_grad(Z, dE, sgn, D, M), D * D)
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


def forward_launch(A, x0, dt, X, V):
    """(kernel, grid, keyword arguments) of the forward launch: X, V (B, T, D) contiguous from
    A, x0, dt (validated, any strides)."""
    cfg = config("fwd", x0.shape[1], A.dtype)
    kw = dict(A_ptr=A, x0_ptr=x0, dt_ptr=dt, X_ptr=X, V_ptr=V, **launch_scalars(A, x0, dt),
              **launch_kwargs(_llstep_fwd_reg_kernel, cfg))
    return _llstep_fwd_reg_kernel, (triton.cdiv(x0.shape[0], cfg["BB"]),), kw


def backward_launch(A, x0, dt, gX, gV, dA, dx0, ddt, S, LS):
    """(kernel, grid, keyword arguments) of the backward launch: dA, dx0, ddt from the upstream
    gX, gV (B, T, D) contiguous; S: ``VARIANT.scratch_size(B, D, LS)`` elements, LS from
    ``triton_impl.anchor_slots``."""
    cfg = config("bwd", x0.shape[1], A.dtype)
    kw = dict(A_ptr=A, x0_ptr=x0, dt_ptr=dt, gX_ptr=gX, gV_ptr=gV, dA_ptr=dA, dx0_ptr=dx0, ddt_ptr=ddt, S_ptr=S,
              LS=LS, **launch_scalars(A, x0, dt), **launch_kwargs(_llstep_bwd_reg_kernel, cfg))
    return _llstep_bwd_reg_kernel, (triton.cdiv(x0.shape[0], cfg["BB"]),), kw


if HAS_TRITON:
    VARIANT = KernelVariant(
        name="llstep_reg", dims={torch.float32: range(1, REG_MAX_D + 1)},
        kernels={"fwd": _llstep_fwd_reg_kernel, "bwd": _llstep_bwd_reg_kernel}, config=config,
        # sm_90: D = 5, the paper's dimension and the cost model's (its test reads these compiles
        # from the cache); sm_80: D = 2, the same code unrolled less (6 s to compile, not 100 s).
        representative=(("fwd", 5, torch.float32, 90), ("bwd", 5, torch.float32, 90),
                        ("fwd", 2, torch.float32, 80), ("bwd", 2, torch.float32, 80)),
        forward_launch=forward_launch, backward_launch=backward_launch, scratch=scratch)
