"""Where the pieces of a re-linearised decode end: per direction of time, the requested offsets of
each cell sorted into knots, and each gap between knots cut into equal pieces no longer than h (to ``SLACK``).

Every cell takes the same number of pieces per gap (the most any cell needs), each of its own gap's
length divided by that number, so all cells step together and every requested time is a piece end.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

#: A gap up to (1 + SLACK) h long is one piece: the rounding of offsets (0.3 in float32 is 0.30000001)
#: never adds a piece, so float32 and float64 inputs get the same pieces.
SLACK = 1e-5


@dataclass(frozen=True)
class Schedule:
    """One direction of time (sign +1 forward, -1 backward).

    lengths: (R, B) signed piece lengths, round after round (0 for a cell whose gap is empty).
    ends: the rounds after which a knot is reached (ascending); knot j is reached after ends[j].
    knot: (B, T) the knot of each requested offset in this direction, -1 elsewhere.
    """
    sign: int
    lengths: torch.Tensor
    ends: tuple
    knot: torch.Tensor


def piece_schedule(dt: torch.Tensor, h: float, sign: int) -> Schedule:
    """The schedule of the offsets of ``dt`` (B, T) with sign ``sign``, pieces of length <= h."""
    if not (isinstance(h, (int, float)) and 0 < h < math.inf):
        raise ValueError(f"piece_length must be a positive finite number; got {h!r}")
    d = (sign * dt.detach()).to("cpu", torch.float64).numpy()
    B, T = d.shape
    pos = np.where(d > 0, d, np.nan)
    knots = np.sort(pos, axis=1)  # NaN last
    k_of = np.full((B, T), -1, dtype=np.int64)
    n_knots = 0
    U = np.zeros((B, 1))
    if T and np.isfinite(knots).any():
        uniq = [np.unique(r[np.isfinite(r)]) for r in knots]
        n_knots = max(len(u) for u in uniq)
        U = np.zeros((B, n_knots + 1))
        for b, u in enumerate(uniq):
            if len(u):
                U[b, 1:len(u) + 1] = u
                U[b, len(u) + 1:] = u[-1]
                for t in range(T):
                    if d[b, t] > 0:
                        k_of[b, t] = int(np.searchsorted(u, d[b, t]))
    lengths, ends, r = [], [], 0
    for j in range(n_knots):
        gap = U[:, j + 1] - U[:, j]
        n = max(1, int(math.ceil(gap.max() / h * (1 - SLACK))))
        lengths += [sign * gap / n] * n
        r += n
        ends.append(r - 1)
    L = torch.as_tensor(np.array(lengths).reshape(-1, B), dtype=dt.dtype, device=dt.device)
    return Schedule(sign, L, tuple(ends), torch.as_tensor(k_of, device=dt.device))
