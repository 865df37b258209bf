"""``local_linear_step``: the closed-form local-linear ODE step of Cell-MNN, batched.

    X[b, k] = expm(dt[b, k] * A[b]) @ x0[b]        V[b, k] = A[b] @ X[b, k]
"""
from __future__ import annotations

import torch

from ..utils import BACKENDS, resolve_backend as _resolve
from .common import MAX_TRITON_D, check_overflow, check_values, empty_result, validate_inputs
from .naive import local_linear_step_reference
from .torch_impl import local_linear_step_torch

__all__ = ["local_linear_step", "local_linear_step_reference", "local_linear_step_torch", "BACKENDS"]


def _triton_impl():
    """The Triton backend, imported on first use: triton is optional, and the kernels must be
    defined after TRITON_INTERPRET is set (CPU runs)."""
    from .triton_impl import local_linear_step_triton

    return local_linear_step_triton


def resolve_backend(backend: str, device: torch.device, D: int) -> str:
    """The backend a call with D x D operators on ``device`` runs (``ops.utils.resolve_backend``)."""
    return _resolve(backend, device, D, MAX_TRITON_D, "A")


def local_linear_step(A: torch.Tensor, x0: torch.Tensor, dt: torch.Tensor, backend: str = "auto",
                      check_finite: bool | None = None):
    """Decode every (cell, time) pair in closed form.

    Args:
        A: (B, D, D) operators, one per cell.
        x0: (B, D) start states.
        dt: (B, T) time offsets (target time minus the cell's own time); any sign, zero allowed.
        backend: "auto" (triton for CUDA tensors, torch otherwise), "triton", "torch" or
            "reference" (dense matrix exponential per pair: the oracle, slow).
        check_finite: raise ValueError for NaN/Inf inputs, for ||dt * A||_1 > NU_MAX, and for
            results that overflow the dtype (true values beyond its range).  This costs a host
            synchronisation; the default (None) checks CPU tensors and skips CUDA tensors.
            Unchecked, a pair with bad inputs yields NaN in X and V (and in its cell's
            gradients), and an overflowing pair yields Inf or NaN: never a finite wrong value.

    Returns:
        X, V: (B, T, D), dtype and device of the inputs (float32 or float64; one dtype for all
        three inputs).  Differentiable with respect to A, x0 and dt through X and V; the triton
        backend supports first derivatives only.  Meta tensors (shape inference, e.g. under
        ``torch.device("meta")``) give meta X and V of the right shape, tied to the inputs.
    """
    B, T, D = validate_inputs(A, x0, dt)
    if A.device.type == "meta":  # no values to compute or check: shapes only
        return empty_result(A, x0, dt)
    backend = resolve_backend(backend, A.device, D)
    if check_finite is None:
        check_finite = A.device.type != "cuda"
    if check_finite:
        check_values(A, x0, dt)
    impl = {"reference": local_linear_step_reference, "torch": local_linear_step_torch}.get(backend)
    X, V = (impl or _triton_impl())(A, x0, dt)
    if check_finite:
        check_overflow(X, V)
    return X, V
