"""The batch sampler of training: counter-based, on the device, with no host state.

A slot's cell at a step is a pure function of (member seed, step, slot), so batches are the same
in any ensemble, on any device, after a resume, and in a captured CUDA graph (the step is a
device tensor).
"""
from __future__ import annotations

import torch

_M16, _M32 = 0xFFFF, 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2^32 for x in [0, 2^32), exact in int64 (partial products stay below 2^49)."""
    return ((x & _M16) * c + ((((x >> 16) * c) & _M16) << 16)) & _M32


def mix32(x):
    """A bijective 32-bit integer hash ("lowbias32": shifts 16, 15, 16 and multipliers 0x7feb352d,
    0x846ca68b, from C. Wellons' hash-prospector).  Works on Python ints and int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def member_key(seed: int) -> int:
    """A 32-bit stream key from a 63-bit seed."""
    return mix32((seed & _M32) ^ mix32(((seed >> 32) & _M32) ^ 0x9E3779B9))


def slot_hash(keys: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The per-slot part of the sampler, computed once per layout: mix32(key ^ mix32(slot))."""
    return mix32(keys ^ mix32(slots ^ 0x85EBCA6B))


def draw(u: torch.Tensor, step: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Uniform integers in [0, n) per slot for this step, with no host state: mix32 of the slot's
    hash ``u`` (``slot_hash``) plus the step times the golden-ratio constant (a Weyl sequence), so
    one mix per step; within a step distinct slots of a member give distinct hashes.

    u, n: (S,) int64; step: 0-d int64 tensor (on the device: capturable)."""
    h = mix32((u + step * 0x9E3779B9) & _M32)
    return (h * n) >> 32  # h < 2^32, n < 2^31: exact


def normals(u: torch.Tensor, step: torch.Tensor, i: int, k: int, dtype=torch.float32) -> torch.Tensor:
    """Standard-normal draws (S, k) per slot for this step and draw index ``i``, with no host state:
    two hashes per entry (a stream apart from ``draw``'s) and the Box-Muller transform.

    u: (S,) int64 slot hashes (``slot_hash``); step: 0-d int64 tensor."""
    j = torch.arange(k, device=u.device) + i * k
    base = (u[:, None] ^ 0x2545F491) + step * 0x9E3779B9 + mix32((j + 1) & _M32)
    h1 = mix32(base & _M32)
    h2 = mix32(h1 ^ 0x68E31DA4)
    u1 = (h1.double() + 0.5) / 2.0 ** 32
    u2 = (h2.double() + 0.5) / 2.0 ** 32
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)).to(dtype)
