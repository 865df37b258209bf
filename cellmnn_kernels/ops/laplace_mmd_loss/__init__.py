"""``laplace_mmd_loss``: per-group training loss of grouped Laplace MMD^2, a velocity energy and
a penalty, with a hand-written backward (common.py for the formula and the plan).

The MMD part runs laplace_mmd's row reductions (one launch per kind of pair sum: S(X, X), S(X, Y)
and, without given y-y means, S(Y, Y)); the triton backend then adds one launch for the loss and
one for the whole backward, and reads nothing on the host: a training step's loss in four or five
launches whatever the number of groups and terms.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..laplace_mmd import resolve_backend
from ..utils import first_order_only
from .common import LossPlan, check_call, nonfinite
from .naive import laplace_mmd_loss_reference
from .torch_impl import backward_torch, finish_torch, rows_torch

__all__ = ["LossPlan", "laplace_mmd_loss", "laplace_mmd_loss_reference"]

SECOND_ORDER = "laplace_mmd_loss: the torch and triton backends have first derivatives only"


def _impl(backend: str):
    """(rows, finish, backward) of a backend."""
    if backend == "torch":
        return rows_torch, finish_torch, backward_torch
    from .triton_impl import backward_triton, finish_triton, rows_triton

    return rows_triton, finish_triton, backward_triton


class _MmdLoss(torch.autograd.Function):
    """(loss, mmd) from X, V, penalty; y and y_self constant."""

    @staticmethod
    def forward(ctx, X, V, penalty, y, y_self, plan, built, impl, group):
        rows, finish, _ = impl
        xs = X.index_select(0, built.rows)
        if built.xscale is not None:  # a sigma per group: each group's points scaled by 1 / sigma
            xs, y = xs * built.xscale, y * built.yscale
        pts = (xs, y)
        parts = [rows(pts[lc.q_side], pts[lc.k_side], built, i) for i, lc in enumerate(built.inner.launches)]
        loss, mmd = finish(built, parts, y_self, V, penalty, plan.G, X.dtype)
        if group is not None:  # every process's share added up; the upstream is the same on each
            both = torch.stack([loss, mmd])
            dist.all_reduce(both, group=group)
            loss, mmd = both[0], both[1]
        ctx.built, ctx.impl, ctx.N = built, impl, X.shape[0]
        ctx.set_materialize_grads(False)  # an unused output's upstream stays None (no zeros made)
        ctx.save_for_backward(X, V, penalty, *[t for part in parts for t in part])
        return loss, mmd

    @staticmethod
    def backward(ctx, gl, gm):
        X, V, penalty, *flat = ctx.saved_tensors
        parts = list(zip(flat[0::2], flat[1::2]))
        need = ctx.needs_input_grad
        if gl is None:  # only mmd is used
            gl, gm = torch.zeros_like(gm), gm
        with torch.no_grad():
            gX, gV, gp = ctx.impl[2](ctx.built, parts, gl, gm, V, ctx.N, need[1], need[2])
        grads = first_order_only(SECOND_ORDER, (gX, gV, gp), (X, V, penalty))
        return (*grads, None, None, None, None, None, None)


def laplace_mmd_loss(plan: LossPlan, X, y, y_self=None, V=None, penalty=None, backend="auto",
                     check_finite=None, group=None):
    """(loss (G,), mmd (G,)) of ``plan`` (``LossPlan``), differentiable in X, V and penalty.

    X (N, D) rows (the plan's n_points), y (M, D) observed points (constant), y_self optional
    (Py,) given y-y kernel means per y segment (constant), V (N, D) exactly when the plan has
    energy weights, penalty (Np,) optional (weighted by the plan's penalty weights; no penalty
    term without it); all of one dtype (float32, float64) and device.  backend: "auto" (triton
    on CUDA for D <= 128, torch otherwise), "triton", "torch", "reference" (dense, autograd).
    ``check_finite`` rejects NaN/Inf (a host synchronisation; default off CUDA).  ``group`` (a
    ``torch.distributed`` process group, with a plan of x_rows and share): the processes' shares
    added up, so that each gets the whole loss."""
    D = check_call(plan, X, y, y_self, V, penalty)
    backend = resolve_backend(backend, X.device, D)
    if check_finite if check_finite is not None else X.device.type != "cuda":
        nonfinite(X=X, y=y, y_self=y_self, V=V, penalty=penalty)
    if group is not None and plan.x_rows is None:
        raise ValueError("group adds up the shares of plans with x_rows; this plan has none")
    if backend == "reference":
        if plan.x_rows is not None:
            raise ValueError("a plan with x_rows needs the torch or triton backend (the reference computes the "
                             "whole loss)")
        return laplace_mmd_loss_reference(plan, X, y, y_self, V, penalty)
    built = plan.built(y_self is None, D, X.dtype, X.device)
    # the kernels read rows with unit column stride (a no-op for the trainer's tensors)
    V, penalty, y_self = (None if t is None else t.contiguous() for t in (V, penalty, y_self))
    return _MmdLoss.apply(X, V, penalty, y, y_self, plan, built, _impl(backend), group)
