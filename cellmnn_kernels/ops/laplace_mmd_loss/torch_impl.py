"""The torch backend of ``laplace_mmd_loss``: laplace_mmd's torch row reductions, then the
finish and the backward in a few tensor operations (common.py)."""
from __future__ import annotations

import torch

from ..laplace_mmd.torch_impl import reduce_rows_torch


def rows_torch(Q, K, b, i):
    """(r (1, R), G (1, R, D) or None) of launch i: one key split (the triton layout)."""
    r, G = reduce_rows_torch(Q, K, None, b.inner, i)
    return r[None], None if G is None else G[None]


def _added(T):
    """The sum over the leading (key split) axis: a view where there is one split."""
    return T[0] if T.shape[0] == 1 else T.sum(0)


def finish_torch(b, parts, y_self, V, penalty, G: int, dtype):
    """(loss (G,), mmd (G,)) from the launches' rows ``parts`` [(R (splits, n), G or None)]."""
    acc = torch.zeros(G, dtype=torch.float64, device=b.rows.device)
    for (R, _), c, grp in zip(parts, b.c, b.grp):
        acc.index_add_(0, grp, _added(R).double() * c)
    share = None if b.share_f == 1.0 else b.share  # data parallel: this process's share of the rest
    if y_self is not None:
        yy = b.term_w * y_self.double()[b.term_y]
        acc.index_add_(0, b.term_group, yy if share is None else yy * share)
    mmd = acc.to(dtype)
    rest = torch.zeros_like(mmd)
    if V is not None:
        rest.index_add_(0, b.row_group, (V * V).sum(1) * b.energy)
    if penalty is not None:
        rest.index_add_(0, b.pen_group, penalty * b.pen_w)
    return mmd + (rest if share is None else rest * share.to(dtype)), mmd


def backward_torch(b, parts, gl, gm, V, N: int, need_v: bool, need_pen: bool):
    """Gradients (X (N, D), V or None, penalty or None) for the upstream gl of loss and gm of mmd
    (None: zero)."""
    g_mmd = gl.double() if gm is None else gl.double() + gm.double()
    D, dtype = parts[0][1].shape[-1], gl.dtype
    gX = torch.zeros((N, D), dtype=dtype, device=gl.device)
    for (_, Gr), cg, grp, xrow in zip(parts, b.cg, b.grp, b.xrow):
        if Gr is not None:
            gX.index_add_(0, xrow, (g_mmd[grp] * cg).to(dtype)[:, None] * _added(Gr))
    gV = (2 * gl[b.row_group] * b.energy)[:, None] * V if need_v else None
    gp = gl[b.pen_group] * b.pen_w if need_pen else None
    return gX, gV, gp
