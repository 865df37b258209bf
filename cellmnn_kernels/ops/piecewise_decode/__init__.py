"""``piecewise_decode``: re-linearised decoding (an exponential integrator).

Along each direction of time from a cell's own time, the operator is re-evaluated at the current
state every piece, A_p = A(z_p, u_p), and the piece is stepped exactly with the frozen linear system:
z_{p+1} = expm(l_p A_p) z_p (``local_linear_step``), or with noise the exact Gaussian transition
z_{p+1} = expm(l_p A_p) z_p + L_p eps_p (``local_linear_sde_step``): the exponential Euler and
exponential Euler-Maruyama schemes (Hochbruck & Ostermann, Acta Numerica 19, 2010).  Pieces end on
every requested time (``schedule``).  With one piece (``piece_length=None``) it is the closed form.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..local_linear_sde import sde_noise
from ..local_linear_step import local_linear_step
from ..utils import expm_reference
from .schedule import Schedule, piece_schedule

__all__ = ["piecewise_decode", "piece_schedule", "Schedule", "piecewise_decode_reference"]


def _augment(A, b):
    """[[A, b], [0, 0]] (B, D+1, D+1): the affine drift A x + b as a linear one on [x; 1]."""
    B, D, _ = A.shape
    top = torch.cat([A, b[:, :, None]], 2)
    return torch.cat([top, A.new_zeros(B, 1, D + 1)], 1)


def _step(A, b, g, z, dt, eps, backend, check_finite=False):
    """One exact step of every cell: X, V (B, T, D) and the sample (B, T, D) (= X without noise)."""
    if b is not None:
        one = z.new_ones(z.shape[0], 1)
        Xa, Va = local_linear_step(_augment(A, b), torch.cat([z, one], 1), dt, backend=backend,
                                   check_finite=check_finite)
        X, V = Xa[..., :-1], Va[..., :-1]
    else:
        X, V = local_linear_step(A, z, dt, backend=backend, check_finite=check_finite)
    if g is None:
        return X, V, X
    # the noise does not depend on b: the covariance of the affine system is the linear one's
    noise = sde_noise(A, dt, g, eps, check_finite=False)  # the step above checked A and dt
    return X, V, X + noise


def piecewise_decode(operator: Callable, x0: torch.Tensor, dt: torch.Tensor, piece_length: float | None = None,
                     noise: Callable | None = None, backend: str = "auto", first: tuple | None = None,
                     check_finite: bool | None = None):
    """Decode cells x0 (B, D) to offsets dt (B, T) with the operator re-evaluated every piece.

    Args:
        operator: ``operator(z, u) -> (A, b, g)`` for states z (B, D) at offsets u (B,) from each
            cell's own time: A (B, D, D); b (B, D) or None (affine drift A z + b); g (B, D) or None
            (diagonal noise scale).  Called at u = 0 (unless ``first`` is given), then once per
            piece after the first.
        piece_length: longest piece, in dt's units; None: one piece per cell (the closed form).
        noise: with g, ``noise(i) -> eps`` standard-normal draws: (B, T, D) for the closed form
            (i = 0), (B, D) for piece i = 0, 1, ... otherwise.  Noise acts forward in time only.
        first: the operator's (A, b, g) at u = 0 when the caller already has them (not recomputed).

    Returns:
        X (B, T, D) the decoded states (with noise, the sample; for the closed form also its
        mean), V (B, T, D) the drift at the decoded state, the first call's (A, b, g), and M: the
        mean (closed form with noise) or None.  Differentiable end to end.
    """
    if first is None:
        first = operator(x0, x0.new_zeros(x0.shape[0]))
    A, b, g = first
    if piece_length is None:
        if g is None:
            X, V, _ = _step(A, b, None, x0, dt, None, backend, check_finite)
            return X, V, first, None
        M, V, Y = _step(A, b, g, x0, dt, noise(0), backend, check_finite)
        return Y, V, first, M
    B, T, D = x0.shape[0], dt.shape[1], x0.shape[1]
    X = x0[:, None, :].expand(B, T, D)
    V = (torch.einsum("bij,bj->bi", A, x0) + (0 if b is None else b))[:, None, :].expand(B, T, D)
    draws = 0
    for sign in (1, -1):
        sch = piece_schedule(dt, piece_length, sign)
        if not sch.ends:
            continue
        z, u, Ab = x0, x0.new_zeros(B), first
        states, drifts = [], []
        for r in range(sch.lengths.shape[0]):
            if r:
                Ab = operator(z, u)
            l = sch.lengths[r]
            eps = None
            if Ab[2] is not None and sign > 0:
                eps = noise(draws)[:, None, :]
                draws += 1
            Xr, Vr, Yr = _step(Ab[0], Ab[1], Ab[2] if sign > 0 else None, z, l[:, None], eps, backend, check_finite)
            z, u = Yr[:, 0], u + l
            if r in sch.ends:
                states.append(z)
                drifts.append(Vr[:, 0] if Ab[2] is None or sign < 0 else
                              torch.einsum("bij,bj->bi", Ab[0], z) + (0 if Ab[1] is None else Ab[1]))
        Sx, Sv = torch.stack(states, 1), torch.stack(drifts, 1)  # (B, knots, D)
        k = sch.knot
        idx = k.clamp_min(0)[:, :, None].expand(B, T, D)
        mask = (k >= 0)[:, :, None]
        X = torch.where(mask, Sx.gather(1, idx), X)
        V = torch.where(mask, Sv.gather(1, idx), V)
    return X, V, first, None


def piecewise_decode_reference(operator: Callable, x0: torch.Tensor, dt: torch.Tensor, piece_length: float):
    """The deterministic piecewise decode by dense matrix exponentials, one cell and one piece at a time
    (the tests' oracle, run in float64): X (B, T, D)."""
    B, T = dt.shape
    out = torch.empty(B, T, x0.shape[1], dtype=x0.dtype, device=x0.device)
    for sign in (1, -1):
        sch = piece_schedule(dt, piece_length, sign)
        for bi in range(B):
            z, u, hits = x0[bi:bi + 1], x0.new_zeros(1), {}
            for r in range(sch.lengths.shape[0]):
                A, b, _ = operator(z, u)
                l = sch.lengths[r, bi]
                if b is not None:
                    Aa = _augment(A, b)[0]
                    z = (expm_reference(l * Aa) @ torch.cat([z[0], z.new_ones(1)]))[None, :-1]
                else:
                    z = (expm_reference(l * A[0]) @ z[0])[None]
                u = u + l
                if r in sch.ends:
                    hits[sch.ends.index(r)] = z[0]
            for t in range(T):
                if sch.knot[bi, t] >= 0:
                    out[bi, t] = hits[int(sch.knot[bi, t])]
                elif dt[bi, t] == 0:
                    out[bi, t] = x0[bi]
    return out
