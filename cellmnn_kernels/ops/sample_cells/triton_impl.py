"""Triton backend of ``sample_cells``: the hash, both gathers and the copy in one launch.

Layout: a program owns BS slots (128, or fewer for wide cells; 4 warps) and the cells' D coordinates (padded to
the power of two BD): the hash of ``naive.draw`` in 32-bit unsigned arithmetic (multiplication
wraps mod 2^32, as ``naive._mul32`` computes it in int64), the index into [0, n) from the 64-bit
product h * n, then the pool entry and the cell's row, read and written with the slot's
coordinates contiguous.

``VARIANT`` is this family as the compile tools see it.
"""
from __future__ import annotations

import torch

from ..utils import HAS_TRITON, next_power_of_2, tl, triton
from ..variant import KernelVariant, launch_kwargs

MAX_D = 128  # coordinates a launch serves (BD <= 128)
TILE_BYTES = 16384  # a program's tile of cell values: 128 bytes a thread at 4 warps (no spills, sm_80 and sm_90)


def config(kind: str, D: int, dtype: torch.dtype = torch.float32, T: int = 16) -> dict:
    """BS slots a program (128, fewer where the tile of BS x BD values would pass TILE_BYTES), the
    coordinates padded to BD, 4 warps."""
    BD = next_power_of_2(D)
    return dict(BS=min(128, TILE_BYTES // (BD * dtype.itemsize)), BD=BD, num_warps=4)


if HAS_TRITON:
    @triton.jit
    def _mix32(x):
        """lowbias32 of uint32 x (``naive.mix32``)."""
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _sample_cells_kernel(data_ptr, pool_ptr, starts_ptr, lens_ptr, u_ptr, step_ptr, out_ptr, S, D, s_data,
                             BS: tl.constexpr, BD: tl.constexpr):
        """out[i, :] = data[pool[starts[i] + draw(u[i], step, lens[i])], :] for the program's slots."""
        i = tl.program_id(0).to(tl.int64) * BS + tl.arange(0, BS)
        live = i < S
        u = tl.load(u_ptr + i, mask=live, other=0)
        n = tl.load(lens_ptr + i, mask=live, other=0)
        step = tl.load(step_ptr)
        x = ((u + step * 0x9E3779B9) & 0xFFFFFFFF).to(tl.uint32)
        h = _mix32(x)
        k = ((h.to(tl.uint64) * n.to(tl.uint64)) >> 32).to(tl.int64)
        row = tl.load(pool_ptr + tl.load(starts_ptr + i, mask=live, other=0) + k, mask=live, other=0)
        d = tl.arange(0, BD)
        m = live[:, None] & (d[None, :] < D)
        vals = tl.load(data_ptr + row[:, None] * s_data + d[None, :], mask=m)
        tl.store(out_ptr + i[:, None] * D + d[None, :], vals, mask=m)


def launch(data, pool, starts, lens, u, step, out):
    """(kernel, grid, keyword arguments) of one launch; data (N, D) with unit column stride, the
    index tensors contiguous int64, out (S, D) contiguous."""
    S, D = out.shape
    cfg = config("fwd", D, data.dtype)
    kw = dict(data_ptr=data, pool_ptr=pool, starts_ptr=starts, lens_ptr=lens, u_ptr=u, step_ptr=step, out_ptr=out,
              S=S, D=D, s_data=data.stride(0), **launch_kwargs(_sample_cells_kernel, cfg))
    return _sample_cells_kernel, (triton.cdiv(S, cfg["BS"]),), kw


def sample_cells_triton(data, pool, starts, lens, u, step) -> torch.Tensor:
    """``sample_cells`` by one launch (inputs checked by the caller)."""
    S, D = u.shape[0], data.shape[1]
    out = torch.empty((S, D), dtype=data.dtype, device=data.device)
    if S and D:
        kernel, grid, kw = launch(data, pool, starts, lens, u, step, out)
        kernel[grid](**kw)
    return out


_INDEX = {f"{a}_ptr": "*i64" for a in ("pool", "starts", "lens", "u", "step")}
VARIANT = KernelVariant(
    name="sample_cells", dims={torch.float32: range(1, MAX_D + 1), torch.float64: range(1, MAX_D + 1)},
    kernels={"fwd": _sample_cells_kernel if HAS_TRITON else None}, config=config,
    representative=(("fwd", 3, torch.float32),), forward_launch=launch, pointer_types=_INDEX)
VARIANTS = (VARIANT,)
