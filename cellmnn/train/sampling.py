"""The batch sampler of training: counter-based, on the device, with no host state.  The draw itself
(hash, segment, gather) is the kernel op ``cellmnn_kernels.ops.sample_cells``; here are the
per-member keys and the normal draws of the noise decoders.

A slot's cell at a step is a pure function of (member seed, step, slot), so batches are the same
in any ensemble, on any device, after a resume, and in a captured CUDA graph (the step is a
device tensor).
"""
from __future__ import annotations

import torch

from cellmnn_kernels.ops.sample_cells import M32, WEYL, mix32


def member_key(seed: int) -> int:
    """A 32-bit stream key from a 63-bit seed."""
    return mix32((seed & M32) ^ mix32(((seed >> 32) & M32) ^ 0x9E3779B9))


def slot_hash(keys: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The per-slot part of the sampler, computed once per layout: mix32(key ^ mix32(slot))."""
    return mix32(keys ^ mix32(slots ^ 0x85EBCA6B))


def normals(u: torch.Tensor, step: torch.Tensor, i: int, k: int, dtype=torch.float32) -> torch.Tensor:
    """Standard-normal draws (S, k) per slot for this step and draw index ``i``, with no host state:
    two hashes per entry (a stream apart from ``sample_cells``') and the Box-Muller transform.

    u: (S,) int64 slot hashes (``slot_hash``); step: 0-d int64 tensor."""
    j = torch.arange(k, device=u.device) + i * k
    base = (u[:, None] ^ 0x2545F491) + step * WEYL + mix32((j + 1) & M32)
    h1 = mix32(base & M32)
    h2 = mix32(h1 ^ 0x68E31DA4)
    u1 = (h1.double() + 0.5) / 2.0 ** 32
    u2 = (h2.double() + 0.5) / 2.0 ** 32
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)).to(dtype)
