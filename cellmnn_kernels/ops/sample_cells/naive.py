"""The plain PyTorch form of ``sample_cells`` (the reference the Triton kernel is held to, and the
CPU path): a counter-based hash per slot, then two gathers.

The hash is "lowbias32" (shifts 16, 15, 16 and multipliers 0x7feb352d, 0x846ca68b, from C.
Wellons' hash-prospector), a bijection of 32-bit integers; here in int64 arithmetic, which every
torch device has (32-bit unsigned shifts are missing on some)."""
from __future__ import annotations

import torch

M16, M32 = 0xFFFF, 0xFFFFFFFF
WEYL = 0x9E3779B9  # 2^32 / golden ratio: the step's stride in the hash's input


def _mul32(x, c: int):
    """(x * c) mod 2^32 for x in [0, 2^32), exact in int64 (partial products stay below 2^49)."""
    return ((x & M16) * c + ((((x >> 16) * c) & M16) << 16)) & M32


def mix32(x):
    """The bijective 32-bit hash lowbias32 of x in [0, 2^32); Python ints and int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def draw(u: torch.Tensor, step: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Uniform integers in [0, n) per slot: mix32 of the slot's key ``u`` plus ``step`` times WEYL
    (a Weyl sequence: one hash per step), mapped to [0, n) by the high half of h * n.

    u, n: (S,) int64, u in [0, 2^32), 1 <= n < 2^31; step: 0-d int64 tensor (on the device)."""
    h = mix32((u + step * WEYL) & M32)
    return (h * n) >> 32  # h < 2^32, n < 2^31: exact


def sample_cells_torch(data, pool, starts, lens, u, step) -> torch.Tensor:
    """cells (S, D) = data[pool[starts + draw(u, step, lens)]]: ``sample_cells`` in torch operations."""
    rows = pool.index_select(0, starts + draw(u, step, lens))
    return data.index_select(0, rows)
