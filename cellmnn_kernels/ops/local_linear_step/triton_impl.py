"""Triton backend of ``local_linear_step``: which kernel family runs an input, the launches, the
chunked backward and the autograd Function.

The kernels come in three families (``ops.variant.KernelVariant``), each in its own module,
chosen by D and dtype:

* ``triton_reg``: float32, D <= 5, one cell per lane, everything in registers;
* ``triton_group``: float32, 6 <= D <= 16, a few lanes per cell;
* ``triton_tiled``: float32 with 16 < D <= 64, and float64.

A forward or backward call is one launch of the family's kernel, except that a backward whose
scratch (register and lane-group families) would pass ``SCRATCH_BYTES`` runs in chunks of cells.
Those two families size their scratch from the launch's highest anchor level (``anchor_slots``),
which costs one host synchronisation; the tiled backward needs none.  While a CUDA graph is being
captured (where a host read is not allowed) they take instead as many levels as the scratch budget
holds (``static_slots``, read from nothing on the device): the same gradients bit for bit, and NaN,
never a wrong value, for a pair beyond those levels.
"""
from __future__ import annotations

import torch

from ..utils import first_order_only
from . import triton_group, triton_reg, triton_tiled
from .common import NU_MAX, SECOND_ORDER, empty_result, operator_norm1, taylor_params

VARIANTS = (triton_reg.VARIANT, triton_group.VARIANT, triton_tiled.VARIANT)
SCRATCH_BYTES = 1 << 28  # the backward's scratch per launch; larger batches go in chunks of cells


def variant_for(D: int, dtype: torch.dtype):
    """The kernel family that serves inputs of dimension D and this dtype."""
    for v in VARIANTS:
        if v.serves(D, dtype):
            return v
    raise ValueError(f"no Triton kernel serves D = {D} in {dtype}")


def anchor_slots(A: torch.Tensor, dt: torch.Tensor) -> int:
    """LS for the backward: one more than the highest anchor level of any pair, plus one level of
    margin for rounding (the kernel computes ||A||_1 in its own order).  A pair whose level the
    kernel finds at LS or above (which this margin rules out) would get NaN, not a wrong value."""
    theta, _ = taylor_params(A.dtype)
    nu = dt.detach().abs() * operator_norm1(A)[:, None]
    nu = torch.where(nu <= NU_MAX, nu, torch.zeros_like(nu))  # NaN and out-of-range pairs: level 0
    top = int(torch.floor(nu.amax() / theta + 0.5).item()) if nu.numel() else 0
    return min(top, int(NU_MAX / theta + 0.5)) + 2


MIN_STATIC_SLOTS = 64  # levels of a static-slot backward at the least (|dt| ||A||_1 up to ~62 theta)


def static_slots(variant, B: int, D: int, dtype: torch.dtype) -> int:
    """LS for a backward that may not read the device: the levels a scratch of ``SCRATCH_BYTES``
    holds for all B cells in one launch, within [MIN_STATIC_SLOTS, the level of NU_MAX + 2] (at the
    floor, larger batches run in chunks).  The same gradients as ``anchor_slots`` wherever every
    pair's level fits (the level only addresses the scratch); NaN for a pair beyond it."""
    theta, _ = taylor_params(dtype)
    top = int(NU_MAX / theta + 0.5) + 2
    cells, base = variant.scratch(D, 0)
    per_level = variant.scratch(D, 1)[1] - base  # elements per program and level
    programs = -(-max(B, 1) // cells)
    fits = (SCRATCH_BYTES // dtype.itemsize // programs - base) // per_level
    return max(MIN_STATIC_SLOTS, min(top, fits))


def capturing(device: torch.device) -> bool:
    """Whether work on ``device`` is being captured into a CUDA graph (no host reads allowed)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def llstep_forward(A: torch.Tensor, x0: torch.Tensor, dt: torch.Tensor):
    """Launch the forward kernel; inputs validated, any strides; returns contiguous X, V (B,T,D)."""
    B, D = x0.shape
    X = torch.empty((B, dt.shape[1], D), dtype=A.dtype, device=A.device)
    V = torch.empty_like(X)
    kernel, grid, kw = variant_for(D, A.dtype).forward_launch(A, x0, dt, X, V)
    kernel[grid](**kw)
    return X, V


def backward_chunk(variant, B: int, D: int, LS: int, itemsize: int) -> int:
    """Cells per backward launch: all B, or whole programs whose scratch stays within
    ``SCRATCH_BYTES`` (at least one program)."""
    if variant.scratch is None:
        return max(B, 1)
    cells, per_program = variant.scratch(D, LS)
    chunk = SCRATCH_BYTES // (per_program // cells * itemsize) // cells * cells
    return max(cells, chunk)


def llstep_backward(A, x0, dt, gX, gV):
    """Launch the backward kernel (in chunks of cells where its scratch is large); returns
    dA (B,D,D), dx0 (B,D), ddt (B,T).  gX, gV: the upstream (B,T,D), or None for zeros."""
    (B, D), T = x0.shape, dt.shape[1]
    v = variant_for(D, A.dtype)
    gX = torch.zeros((B, T, D), dtype=A.dtype, device=A.device) if gX is None else gX.contiguous()
    gV = torch.zeros((B, T, D), dtype=A.dtype, device=A.device) if gV is None else gV.contiguous()
    P = v.parts(D, T, A.dtype)  # partial sums of dA and dx0 the kernel writes
    dA = torch.empty((P, B, D, D), dtype=A.dtype, device=A.device)
    dx0 = torch.empty((P, B, D), dtype=A.dtype, device=A.device)
    ddt = torch.empty((B, T), dtype=A.dtype, device=A.device)
    if v.scratch is None:
        LS = 0
    else:
        LS = static_slots(v, B, D, A.dtype) if capturing(A.device) else anchor_slots(A, dt)
    chunk = backward_chunk(v, B, D, LS, A.element_size())
    if P > 1 and chunk < B:
        raise AssertionError("a backward with partial sums runs in one launch")
    S = torch.empty(v.scratch_size(min(B, chunk), D, LS), dtype=A.dtype, device=A.device)
    for b0 in range(0, B, chunk):
        c = slice(b0, min(B, b0 + chunk))
        kernel, grid, kw = v.backward_launch(A[c], x0[c], dt[c], gX[c], gV[c], dA[:, c], dx0[:, c], ddt[c], S, LS)
        kernel[grid](**kw)
    if P == 1:
        return dA[0], dx0[0], ddt
    return dA.sum(0), dx0.sum(0), ddt


class LocalLinearStepFunction(torch.autograd.Function):
    """Autograd wrapper: forward and backward are one kernel launch each (``llstep_forward``,
    ``llstep_backward``); first derivatives only."""

    @staticmethod
    def forward(ctx, A, x0, dt):
        """X, V (B, T, D) by one forward launch; A, x0, dt saved for the backward."""
        X, V = llstep_forward(A, x0, dt)
        ctx.save_for_backward(A, x0, dt)
        return X, V

    @staticmethod
    def backward(ctx, gX, gV):
        """dA, dx0, ddt by the backward launch(es); refuses to be differentiated again."""
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
