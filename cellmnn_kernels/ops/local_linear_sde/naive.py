"""Reference of ``local_linear_sde_step``: Van Loan's block exponential per (cell, time) pair.

Van Loan (IEEE Trans. Automatic Control 23, 1978): with M = tau [[-A, Q], [0, A^T]], expm(M) =
[[., F12], [0, F22]], F22 = expm(tau A)^T and S(tau) = F22^T F12.  One dense 2D x 2D exponential
per pair (the oracle of the tests, run in float64); the sample's factor is the guarded Cholesky.
"""
from __future__ import annotations

import torch

from ..local_linear_step.naive import local_linear_step_reference
from ..utils import expm_reference
from .common import psd_cholesky


def sde_covariance_reference(A: torch.Tensor, dt: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """S (B, T, D, D): the covariance of x(dt) given x(0) under dx = A x ds + diag(g) dW; 0 for dt <= 0."""
    B, D, _ = A.shape
    T = dt.shape[1]
    Q = torch.diag_embed((g.expand(B, D)) ** 2)
    top = torch.cat([-A, Q], -1)
    bottom = torch.cat([torch.zeros_like(A), A.transpose(1, 2)], -1)
    M = torch.cat([top, bottom], -2)  # (B, 2D, 2D)
    tau = dt.clamp_min(0)
    F = expm_reference(tau[:, :, None, None] * M[:, None])
    S = F[..., D:, D:].transpose(-1, -2) @ F[..., :D, D:]
    S = 0.5 * (S + S.transpose(-1, -2))
    return S.reshape(B, T, D, D)


def local_linear_sde_step_reference(A, x0, dt, g, eps=None):
    """X, V (B, T, D) as ``local_linear_step_reference``; S (B, T, D, D); and Y = X + chol(S) eps (or
    None without eps).  Differentiable by autograd."""
    X, V = local_linear_step_reference(A, x0, dt)
    S = sde_covariance_reference(A, dt, g)
    Y = None if eps is None else X + (psd_cholesky(S) @ eps[..., None])[..., 0]
    return X, V, S, Y
