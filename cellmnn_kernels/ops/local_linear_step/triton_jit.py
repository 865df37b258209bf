"""``@triton.jit`` helpers that more than one kernel family of ``local_linear_step`` calls.

Below every family (``triton_reg``, ``triton_group``; ``triton_tiled`` needs none of them): they
import from here and ``common.py``, never from each other.  Operators and states are tuples of
tensors unrolled at compile time, one tensor per entry (row-major for a matrix), each tensor
holding that entry for every cell (or lane) of the program.

* products: ``_mv`` (Z v, all rows or the first ROWS), ``_rank1`` (G + u v^T), ``_vadd``;
* the scheme's constants and scaling: ``_coefs`` (1/k!), ``_step_scale`` (h = theta / ||A||_1);
* pairs: ``_pair_level`` (a pair's dt, whether it is computable, its nearest anchor level),
  ``_pair_rho`` (its signed remainder), ``_pairs`` (a block of BT target times, forward),
  ``_pair_slot`` and ``_lane_tops`` (the backward's scratch slot of a pair, and each lane's
  highest level per direction);
* the backward's per-lane scratch: ``_park`` and ``_unpark``.
"""
from __future__ import annotations

from ..utils import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def _mv(Z, v, D: tl.constexpr, ROWS: tl.constexpr = None):
        """Z v: Z a row-major tuple of ROWS rows of D (D rows by default), v a D tuple."""
        out = ()
        for i in tl.static_range(D if ROWS is None else ROWS):
            acc = Z[i * D] * v[0]
            for j in tl.static_range(1, D):
                acc = tl.fma(Z[i * D + j], v[j], acc)
            out = out + (acc,)
        return out

    @triton.jit
    def _rank1(G, u, v, D: tl.constexpr, ROWS: tl.constexpr = None):
        """G + u v^T: G a row-major tuple of ROWS rows of D (D rows by default), u of ROWS, v of D."""
        out = ()
        for i in tl.static_range(D if ROWS is None else ROWS):
            for j in tl.static_range(D):
                out = out + (tl.fma(u[i], v[j], G[i * D + j]),)
        return out

    @triton.jit
    def _vadd(u, v, n: tl.constexpr):
        """u + v, element by element, for tuples of n tensors."""
        out = ()
        for e in tl.static_range(n):
            out = out + (u[e] + v[e],)
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
    def _step_scale(A, nrm, theta, n: tl.constexpr):
        """h = theta / ||A||_1 (1 for A = 0), 1 / h, and Z = h A for the n entries of A held."""
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
        for e in tl.static_range(n):
            Z = Z + (A[e] * h,)
        return h, inv_h, Z

    @triton.jit
    def _pair_level(dt_ptr, cell, m, t, stb, stt, nrm, finite, theta, nu_max):
        """dt of pair (cell, t), whether it can be computed, and its nearest anchor level (float).

        False for masked, NaN/Inf and out-of-range pairs, whose level is 0."""
        tau = tl.load(dt_ptr + cell * stb + t * stt, mask=m, other=0.0)
        nu = tl.abs(tau) * nrm
        okk = m & finite & (nu <= nu_max)
        return tau, okk, tl.floor(tl.where(okk, nu / theta + 0.5, 0.0))

    @triton.jit
    def _pair_rho(tau, okk, m, lv, inv_h):
        """Signed remainder dt / h -+ level of a pair.  A pair that cannot be computed gets
        rho = NaN: its X, V and ddt come out NaN."""
        return tl.where(okk | ~m, tau * inv_h - tl.where(tau < 0, -lv, lv), float("nan"))

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
    def _pair_slot(dt_ptr, cell, cm, t, stb, stt, nrm, finite, theta, nu_max, inv_h, LS):
        """Backward: whether pair (cell, t) can be computed, its rho, and the scratch slot of its
        anchor (direction * LS + level; a level the slots cannot hold makes the pair NaN)."""
        tau, okk, lv = _pair_level(dt_ptr, cell, cm, t, stb, stt, nrm, finite, theta, nu_max)
        okk = okk & (lv < LS)
        rho = _pair_rho(tau, okk, cm, lv, inv_h)
        return okk, rho, tl.where(tau < 0, LS, 0) + tl.where(okk, lv, 0.0).to(tl.int32)

    @triton.jit
    def _lane_tops(dt_ptr, cell, cm, T, stb, stt, nrm, finite, theta, nu_max, LS):
        """Highest anchor level of each lane's pairs per direction, dt >= 0 and dt < 0 (-1: none;
        pairs that cannot be computed count at level 0), at most LS - 1 so that the marches stay
        in their scratch slots (a pair beyond is NaN, ``_pair_slot``)."""
        top_p = (nrm * 0).to(tl.int32) - 1
        top_n = top_p
        for t in range(0, T):
            tau, okk, lv = _pair_level(dt_ptr, cell, cm, t, stb, stt, nrm, finite, theta, nu_max)
            lv = tl.minimum(lv.to(tl.int32), LS - 1)
            top_p = tl.maximum(top_p, tl.where(cm & (tau >= 0), lv, -1))
            top_n = tl.maximum(top_n, tl.where(cm & (tau < 0), lv, -1))
        return top_p, top_n

    @triton.jit
    def _park(ptr, v, n: tl.constexpr, BB: tl.constexpr):
        """Store the tuple v at scratch slots ptr, ptr + BB, .. (one value per lane and slot)."""
        for e in tl.static_range(n):
            tl.store(ptr + e * BB, v[e])

    @triton.jit
    def _unpark(ptr, n: tl.constexpr, BB: tl.constexpr, mask=None):
        """The tuple of n values ``_park`` stored at ptr (0 where ``mask`` is false)."""
        out = ()
        for e in tl.static_range(n):
            if mask is None:
                out = out + (tl.load(ptr + e * BB),)
            else:
                out = out + (tl.load(ptr + e * BB, mask=mask, other=0.0),)
        return out
