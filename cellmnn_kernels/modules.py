"""Thin ``nn.Module`` layer over the ops, for models that compose modules."""
from __future__ import annotations

import torch
from torch import nn

from .ops.local_linear_step import local_linear_step


class LocalLinearStep(nn.Module):
    """Closed-form local-linear ODE step: (A, x0, dt) -> (X, V); see ``local_linear_step``."""

    def __init__(self, backend: str = "auto", check_finite: bool | None = None):
        super().__init__()
        self.backend = backend
        self.check_finite = check_finite

    def forward(self, A: torch.Tensor, x0: torch.Tensor, dt: torch.Tensor):
        """X, V (B, T, D): ``local_linear_step(A, x0, dt)`` with this module's backend and checks."""
        return local_linear_step(A, x0, dt, backend=self.backend, check_finite=self.check_finite)

    def extra_repr(self) -> str:
        """The backend, in the module's repr."""
        return f"backend={self.backend!r}"
