"""Reference ``laplace_mmd_loss``: the loss composed from the dense grouped MMD reference, with
autograd (the oracle the fast paths are tested against; float64 in the tests)."""
from __future__ import annotations

import torch

from ..laplace_mmd.naive import laplace_mmd_grouped_reference


def laplace_mmd_loss_reference(plan, X, y, y_self=None, V=None, penalty=None):
    """(loss (G,), mmd (G,)) of ``plan`` (common.LossPlan) by dense kernel matrices, in X's dtype."""
    dev, dt = X.device, X.dtype
    xs = X.index_select(0, torch.as_tensor(plan.rows, device=dev))
    xscale, yscale = plan.point_scales()
    if xscale is not None:  # a sigma per group: the points scaled, bandwidth 1
        xs = xs * torch.as_tensor(xscale, dtype=dt, device=dev)[:, None]
        y = y * torch.as_tensor(yscale, dtype=dt, device=dev)[:, None]
    _, values = laplace_mmd_grouped_reference(xs, plan.x_off, y, plan.y_off, plan.tx, plan.ty, None,
                                              plan.sigma or 1.0, y_self=y_self)
    group = lambda a: torch.as_tensor(a, device=dev)  # noqa: E731
    mmd = X.new_zeros(plan.G).index_add(0, group(plan.term_group), values * torch.as_tensor(plan.w, dtype=dt,
                                                                                           device=dev))
    loss = mmd
    if V is not None:
        e = torch.as_tensor(plan.energy, dtype=dt, device=dev)
        loss = loss + X.new_zeros(plan.G).index_add(0, group(plan.row_group), e * (V * V).sum(1))
    if penalty is not None:
        p = torch.as_tensor(plan.pen_w, dtype=dt, device=dev)
        loss = loss + X.new_zeros(plan.G).index_add(0, group(plan.pen_group), p * penalty)
    return loss, mmd
