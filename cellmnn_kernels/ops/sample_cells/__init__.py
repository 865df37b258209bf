"""``sample_cells``: a training batch drawn and gathered on the device, with no host state.

    cells[i] = data[pool[starts[i] + draw(u[i], step, lens[i])]]

Slot i draws uniformly from its own segment pool[starts[i] : starts[i] + lens[i]] of cell rows,
by a counter-based hash of its key u[i] and the step (``naive.draw``): the same cells on any
device and in a captured CUDA graph (the step is a device tensor).  On CUDA the Triton backend is
one launch; the torch backend is the hash in int64 operations and two gathers.
"""
from __future__ import annotations

import torch

from ..utils import BACKENDS, resolve_backend
from .naive import M32, WEYL, draw, mix32, sample_cells_torch

__all__ = ["sample_cells", "sample_cells_torch", "draw", "mix32", "M32", "WEYL", "BACKENDS"]

MAX_TRITON_D = 128  # triton_impl.MAX_D


def _triton_impl():
    """The Triton backend, imported on first use (after TRITON_INTERPRET is set, where triton is installed)."""
    from .triton_impl import sample_cells_triton

    return sample_cells_triton


def check_inputs(data, pool, starts, lens, u, step) -> None:
    """Types, ranks, dtypes and devices; errors name the argument."""
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or not data.is_floating_point():
        raise TypeError(f"data must be a floating-point torch.Tensor of shape (N, D); got "
                        f"{type(data).__name__} {tuple(getattr(data, 'shape', ()))}")
    for name, t, ndim in (("pool", pool, 1), ("starts", starts, 1), ("lens", lens, 1), ("u", u, 1), ("step", step, 0)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != ndim:
            raise TypeError(f"{name} must be a {ndim}-d torch.int64 tensor; got {type(t).__name__} "
                            f"{getattr(t, 'dtype', '')} of shape {tuple(getattr(t, 'shape', ()))}")
        if t.device != data.device:
            raise ValueError(f"{name} must be on data's device ({data.device}); got {t.device}")
    if not (starts.shape == lens.shape == u.shape):
        raise ValueError(f"starts, lens and u must have one shape (S,); got {tuple(starts.shape)}, "
                         f"{tuple(lens.shape)} and {tuple(u.shape)}")


def check_values(data, pool, starts, lens, u) -> None:
    """Every slot's segment inside ``pool``, every pool entry a row of ``data``, keys 32-bit (host
    reads: a caller whose layout guarantees these skips them)."""
    if not u.numel():
        return
    if int(lens.min()) < 1 or int(lens.max()) >= 2 ** 31:
        raise ValueError("lens must lie in [1, 2^31): every slot draws from a non-empty segment")
    if int(starts.min()) < 0 or int((starts + lens).max()) > pool.shape[0]:
        raise ValueError(f"starts + lens must stay within pool ({pool.shape[0]} entries)")
    if int(u.min()) < 0 or int(u.max()) > M32:
        raise ValueError("u must lie in [0, 2^32)")
    if pool.numel() and (int(pool.min()) < 0 or int(pool.max()) >= data.shape[0]):
        raise ValueError(f"pool must hold row indices of data, in [0, {data.shape[0]})")


def sample_cells(data: torch.Tensor, pool: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor,
                 u: torch.Tensor, step: torch.Tensor, backend: str = "auto",
                 check: bool | None = None) -> torch.Tensor:
    """cells (S, D) of ``data``'s dtype: slot i's cell for this step (module docstring).

    data (N, D); pool (P,) int64 rows of data; starts, lens, u (S,) int64 (u: the slots' keys in
    [0, 2^32)); step: 0-d int64.  Not differentiable (the cells are data).  backend: "auto"
    (triton on CUDA for D <= 128, torch otherwise), "triton" (data whose columns are not contiguous
    take the torch path: the same cells), "torch" or "reference" (= torch).
    ``check`` validates the index values (host reads; default: off CUDA)."""
    check_inputs(data, pool, starts, lens, u, step)
    if check if check is not None else data.device.type != "cuda":
        check_values(data, pool, starts, lens, u)
    backend = resolve_backend(backend, data.device, data.shape[1], MAX_TRITON_D, "data")
    if backend == "triton" and data.stride(1) == 1:
        return _triton_impl()(data, pool.contiguous(), starts.contiguous(), lens.contiguous(), u.contiguous(), step)
    return sample_cells_torch(data, pool, starts, lens, u, step)
