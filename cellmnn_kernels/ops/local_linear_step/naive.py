"""Reference implementation: one dense matrix exponential per (cell, time) pair.

This is the formulation of the Cell-MNN authors and the oracle of the tests (run in float64).
It builds a (B, T, D, D) batch, so memory and time grow with B * T * D^3.
"""
from __future__ import annotations

import torch

from ..utils import expm_reference


def local_linear_step_reference(A: torch.Tensor, x0: torch.Tensor, dt: torch.Tensor):
    """X[b,k] = expm(dt[b,k] A[b]) x0[b],  V[b,k] = A[b] X[b,k].

    A (B, D, D), x0 (B, D), dt (B, T) -> X, V (B, T, D). Differentiable by autograd.
    """
    E = expm_reference(dt[:, :, None, None] * A[:, None, :, :])
    X = torch.einsum("btij,bj->bti", E, x0)
    V = torch.einsum("bij,btj->bti", A, X)
    return X, V
