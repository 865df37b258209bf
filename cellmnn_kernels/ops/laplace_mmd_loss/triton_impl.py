"""Triton backend of ``laplace_mmd_loss``: laplace_mmd's row-reduction kernels, then one launch
for the finish and one for the backward (common.py for the coefficients).

* ``_loss_finish_kernel``: a program per group sums its rows of every launch (key splits added,
  times the rows' coefficients, in float64), the given y-y means, the velocity energy and the
  penalty, in a fixed order (no atomics: the same loss on every run).
* ``_loss_bwd_kernel``: a program per block of X's rows writes their gradient rows (each X row is
  the query of at most one row per launch: ``inv``), the velocity's and the penalty's.

``VARIANT`` is this family as the compile tools see it.
"""
from __future__ import annotations

import torch

from ..laplace_mmd.triton_impl import row_partials_triton
from ..utils import HAS_TRITON, next_power_of_2, tl, triton
from ..variant import KernelVariant, launch_kwargs

MAX_D = 128  # laplace_mmd's row kernels
TILE = 1024  # values of a program's (rows, coordinates) tile: 8 per thread at 4 warps


def config(kind: str, D: int, dtype: torch.dtype = torch.float32, T: int = 16) -> dict:
    """Rows per program step (BLOCK for row sums, BV rows of DP coordinates for tiles), 4 warps;
    the flags are a training step's (two launches, given y-y means, a velocity term, no penalty):
    the launcher sets them per call."""
    DP = next_power_of_2(D)
    return dict(BLOCK=256 if kind == "fwd" else max(8, TILE // DP), BV=max(8, TILE // DP), DP=DP, N_LAUNCH=2,
                N_GRAD=2, HAS_YS=True, HAS_V=True, HAS_PEN=False, HAS_GM=False, num_warps=4)


if HAS_TRITON:
    @triton.jit
    def _rows_sum(R_ptr, C_ptr, LO_ptr, n_out, splits, g, BLOCK: tl.constexpr):
        """sum over group g's rows of one launch of (sum over key splits of r) * c, float64 lanes."""
        lo = tl.load(LO_ptr + g)
        hi = tl.load(LO_ptr + g + 1)
        acc = tl.zeros((BLOCK,), dtype=tl.float64)
        for i0 in range(lo, hi, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            m = i < hi
            r = tl.load(R_ptr + i, mask=m, other=0.0)
            for s in range(1, splits):
                r += tl.load(R_ptr + s * n_out + i, mask=m, other=0.0)
            acc += r.to(tl.float64) * tl.load(C_ptr + i, mask=m, other=0.0)
        return acc

    @triton.jit
    def _loss_finish_kernel(R0_ptr, C0_ptr, LO0_ptr, n0, s0, R1_ptr, C1_ptr, LO1_ptr, n1, s1, R2_ptr, C2_ptr,
                            LO2_ptr, n2, s2, YS_ptr, TW_ptr, TY_ptr, TLO_ptr, V_ptr, EW_ptr, XLO_ptr, sv, D,
                            PEN_ptr, PW_ptr, PLO_ptr, SH_ptr, LOSS_ptr, MMD_ptr, N_LAUNCH: tl.constexpr,
                            HAS_YS: tl.constexpr, HAS_V: tl.constexpr, HAS_PEN: tl.constexpr, BLOCK: tl.constexpr,
                            BV: tl.constexpr, DP: tl.constexpr):
        """loss[g], mmd[g] of group g = program 0's index; the y-y means, the energy and the penalty
        enter times share (SH_ptr, float64: 1 but for a data-parallel plan)."""
        g = tl.program_id(0).to(tl.int64)
        acc = _rows_sum(R0_ptr, C0_ptr, LO0_ptr, n0, s0, g, BLOCK)
        if N_LAUNCH > 1:
            acc += _rows_sum(R1_ptr, C1_ptr, LO1_ptr, n1, s1, g, BLOCK)
        if N_LAUNCH > 2:
            acc += _rows_sum(R2_ptr, C2_ptr, LO2_ptr, n2, s2, g, BLOCK)
        share = tl.load(SH_ptr)
        yacc = tl.zeros((BLOCK,), dtype=tl.float64)
        if HAS_YS:  # the given y-y means: sum over the group's terms of w_t * y_self[y segment of t]
            lo = tl.load(TLO_ptr + g)
            hi = tl.load(TLO_ptr + g + 1)
            for t0 in range(lo, hi, BLOCK):
                t = t0 + tl.arange(0, BLOCK)
                m = t < hi
                ys = tl.load(YS_ptr + tl.load(TY_ptr + t, mask=m, other=0), mask=m, other=0.0)
                yacc += tl.load(TW_ptr + t, mask=m, other=0.0) * ys.to(tl.float64)
        mmd = tl.sum(acc, axis=0) + tl.sum(yacc, axis=0) * share
        extra = tl.zeros((BV,), dtype=tl.float64)
        if HAS_V:  # sum over the group's rows of e_i ||V_i||^2
            lo = tl.load(XLO_ptr + g)
            hi = tl.load(XLO_ptr + g + 1)
            d = tl.arange(0, DP)
            for i0 in range(lo, hi, BV):
                i = i0 + tl.arange(0, BV)
                m = i < hi
                v = tl.load(V_ptr + i[:, None] * sv + d[None, :], mask=m[:, None] & (d[None, :] < D), other=0.0)
                e = tl.load(EW_ptr + i, mask=m, other=0.0)
                extra += (tl.sum(v * v, axis=1) * e).to(tl.float64)
        if HAS_PEN:  # sum over the group's entries of p_j pen_j
            lo = tl.load(PLO_ptr + g)
            hi = tl.load(PLO_ptr + g + 1)
            for j0 in range(lo, hi, BV):
                j = j0 + tl.arange(0, BV)
                m = j < hi
                p = tl.load(PEN_ptr + j, mask=m, other=0.0) * tl.load(PW_ptr + j, mask=m, other=0.0)
                extra += p.to(tl.float64)
        out_t = LOSS_ptr.dtype.element_ty
        tl.store(MMD_ptr + g, mmd.to(out_t))
        tl.store(LOSS_ptr + g, (mmd.to(out_t) + (tl.sum(extra, axis=0) * share).to(out_t)))

    @triton.jit
    def _grad_rows(G_ptr, CG_ptr, INV_ptr, n_out, splits, i, m, d, dm, D, g_mmd, out_t: tl.constexpr):
        """(BLOCK, DP) gradient of X's rows i from one launch: its row p = inv[i] (if any), the key
        splits of G added, times cg[p] * the group's upstream."""
        p = tl.load(INV_ptr + i, mask=m, other=-1)
        has = m & (p >= 0)
        coef = (tl.load(CG_ptr + p, mask=has, other=0.0) * g_mmd).to(out_t)
        mm = has[:, None] & dm[None, :]
        Gs = tl.load(G_ptr + p[:, None] * D + d[None, :], mask=mm, other=0.0)
        for s in range(1, splits):
            Gs += tl.load(G_ptr + (s * n_out + p)[:, None] * D + d[None, :], mask=mm, other=0.0)
        return coef[:, None] * Gs

    @triton.jit
    def _loss_bwd_kernel(GL_ptr, sgl, GM_ptr, sgm, RG_ptr, N, D, GX_ptr, G0_ptr, CG0_ptr, INV0_ptr, n0, s0,
                         G1_ptr, CG1_ptr, INV1_ptr, n1, s1, V_ptr, sv, EW_ptr, GV_ptr, PG_ptr, PW_ptr, GP_ptr, n_pen,
                         N_GRAD: tl.constexpr, HAS_GM: tl.constexpr, HAS_V: tl.constexpr, HAS_PEN: tl.constexpr,
                         BLOCK: tl.constexpr, DP: tl.constexpr):
        """Gradient rows of X (and V, penalty) for the program's BLOCK rows."""
        out_t = GX_ptr.dtype.element_ty
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < N
        d = tl.arange(0, DP)
        dm = d < D
        grp = tl.load(RG_ptr + i, mask=m, other=0)
        gl = tl.load(GL_ptr + grp * sgl, mask=m, other=0.0)
        g_mmd = gl.to(tl.float64)
        if HAS_GM:
            g_mmd += tl.load(GM_ptr + grp * sgm, mask=m, other=0.0).to(tl.float64)
        gx = tl.zeros((BLOCK, DP), dtype=out_t)
        if N_GRAD > 0:
            gx += _grad_rows(G0_ptr, CG0_ptr, INV0_ptr, n0, s0, i, m, d, dm, D, g_mmd, out_t)
        if N_GRAD > 1:
            gx += _grad_rows(G1_ptr, CG1_ptr, INV1_ptr, n1, s1, i, m, d, dm, D, g_mmd, out_t)
        m2 = m[:, None] & dm[None, :]
        tl.store(GX_ptr + i[:, None] * D + d[None, :], gx, mask=m2)
        if HAS_V:
            v = tl.load(V_ptr + i[:, None] * sv + d[None, :], mask=m2, other=0.0)
            e = tl.load(EW_ptr + i, mask=m, other=0.0)
            tl.store(GV_ptr + i[:, None] * D + d[None, :], (2 * e * gl)[:, None] * v, mask=m2)
        if HAS_PEN:
            mp = i < n_pen
            pg = tl.load(PG_ptr + i, mask=mp, other=0)
            gp = tl.load(GL_ptr + pg * sgl, mask=mp, other=0.0) * tl.load(PW_ptr + i, mask=mp, other=0.0)
            tl.store(GP_ptr + i, gp, mask=mp)


def rows_triton(Q, K, b, i):
    """(R (splits, n), G (splits, n, D) or None) of launch i of the plan's inner laplace_mmd plan:
    one row-reduction launch, key splits left for the finish to add."""
    return row_partials_triton(Q, K, None, b.inner, i)


def finish_launch(b, parts, y_self, V, penalty, loss, mmd):
    """(kernel, grid, keyword arguments) of the finish; ``parts``: [(R, G)] of the launches."""
    D = V.shape[1] if V is not None else 1  # the velocity tile's width
    cfg = {**config("fwd", D, loss.dtype), "N_LAUNCH": len(parts), "HAS_YS": y_self is not None,
           "HAS_V": V is not None, "HAS_PEN": penalty is not None}
    kw = {}
    for k in range(3):
        R, _ = parts[min(k, len(parts) - 1)]
        j = min(k, len(parts) - 1)
        kw.update({f"R{k}_ptr": R, f"C{k}_ptr": b.c[j], f"LO{k}_ptr": b.lo[j], f"n{k}": R.shape[1],
                   f"s{k}": R.shape[0]})
    dummy = loss
    kw.update(YS_ptr=dummy if y_self is None else y_self, TW_ptr=b.term_w, TY_ptr=b.term_y, TLO_ptr=b.term_lo,
              V_ptr=dummy if V is None else V, EW_ptr=dummy if V is None else b.energy, XLO_ptr=b.x_lo,
              sv=0 if V is None else V.stride(0), D=D, PEN_ptr=dummy if penalty is None else penalty,
              PW_ptr=dummy if penalty is None else b.pen_w, PLO_ptr=b.x_lo if penalty is None else b.pen_lo,
              SH_ptr=b.share,
              LOSS_ptr=loss, MMD_ptr=mmd)
    return _loss_finish_kernel, (loss.shape[0],), {**kw, **launch_kwargs(_loss_finish_kernel, cfg)}


def finish_triton(b, parts, y_self, V, penalty, G: int, dtype):
    """(loss (G,), mmd (G,)) in one launch."""
    loss = torch.empty(G, dtype=dtype, device=b.rows.device)
    mmd = torch.empty_like(loss)
    kernel, grid, kw = finish_launch(b, parts, y_self, V, penalty, loss, mmd)
    kernel[grid](**kw)
    return loss, mmd


def backward_launch(b, parts, gl, gm, V, gX, gV, gp):
    """(kernel, grid, keyword arguments) of the backward into gX (N, D), gV and gp (or None)."""
    N, D = gX.shape
    grads = [(Gr, b.cg[k], b.inv[k]) for k, (_, Gr) in enumerate(parts) if Gr is not None]
    n_pen = 0 if gp is None else gp.shape[0]
    cfg = {**config("bwd", D, gX.dtype), "N_GRAD": len(grads), "HAS_GM": gm is not None, "HAS_V": gV is not None,
           "HAS_PEN": gp is not None}
    kw = dict(GL_ptr=gl, sgl=gl.stride(0), GM_ptr=gl if gm is None else gm, sgm=0 if gm is None else gm.stride(0),
              RG_ptr=b.row_group, N=N, D=D, GX_ptr=gX)
    for k in range(2):
        Gr, cg, inv = grads[min(k, len(grads) - 1)] if grads else (gX, b.c[0], b.row_group)
        kw.update({f"G{k}_ptr": Gr, f"CG{k}_ptr": cg, f"INV{k}_ptr": inv, f"n{k}": Gr.shape[-2] if grads else 0,
                   f"s{k}": Gr.shape[0] if grads else 1})
    kw.update(V_ptr=gX if V is None else V, sv=0 if V is None else V.stride(0), EW_ptr=gl if V is None else b.energy,
              GV_ptr=gX if gV is None else gV, PG_ptr=b.row_group if gp is None else b.pen_group,
              PW_ptr=gl if gp is None else b.pen_w, GP_ptr=gl if gp is None else gp, n_pen=n_pen)
    grid = (triton.cdiv(max(N, n_pen), cfg["BLOCK"]),)
    return _loss_bwd_kernel, grid, {**kw, **launch_kwargs(_loss_bwd_kernel, cfg)}


def backward_triton(b, parts, gl, gm, V, N: int, need_v: bool, need_pen: bool):
    """Gradients (X, V or None, penalty or None), as ``torch_impl.backward_torch``, in one launch."""
    D = next(Gr for _, Gr in parts if Gr is not None).shape[-1]
    gX = torch.empty((N, D), dtype=gl.dtype, device=gl.device)
    gV = torch.empty_like(gX) if need_v else None
    gp = torch.empty(b.pen_group.shape[0], dtype=gl.dtype, device=gl.device) if need_pen else None
    kernel, grid, kw = backward_launch(b, parts, gl, gm, V if need_v else None, gX, gV, gp)
    kernel[grid](**kw)
    return gX, gV, gp


_INDEX = {f"{a}_ptr": "*i64" for a in ("LO0", "LO1", "LO2", "TY", "TLO", "XLO", "PLO", "RG", "INV0", "INV1", "PG")}
_F64 = {f"{a}_ptr": "*fp64" for a in ("C0", "C1", "C2", "TW", "CG0", "CG1", "SH")}
VARIANT = KernelVariant(
    name="mmd_loss", dims={torch.float32: range(1, MAX_D + 1), torch.float64: range(1, MAX_D + 1)},
    kernels={"fwd": _loss_finish_kernel if HAS_TRITON else None, "bwd": _loss_bwd_kernel if HAS_TRITON else None},
    config=config, representative=(("fwd", 3, torch.float32), ("bwd", 3, torch.float32)),
    forward_launch=finish_launch, backward_launch=backward_launch, pointer_types={**_INDEX, **_F64})
VARIANTS = (VARIANT,)
