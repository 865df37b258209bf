"""Pure-PyTorch covariance of ``local_linear_sde_step``: Taylor series and doublings (``common.py``),
in batched GEMMs over pairs, differentiable by autograd.

Cost per pair O((m + s) D^3) with s = ceil(log2(||dt A||_1 / theta)) doublings (one s for the call,
the largest any pair needs: a smaller step than needed costs doublings, never accuracy).
"""
from __future__ import annotations

import math

import torch

from .common import TAYLOR


def sde_covariance_torch(A: torch.Tensor, dt: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """S (B, T, D, D): covariance of x(dt) given x(0) under dx = A x ds + diag(g) dW; 0 for dt <= 0.

    A (B, D, D), dt (B, T), g (B, D) or (D,)."""
    B, D, _ = A.shape
    T = dt.shape[1]
    theta, m = TAYLOR[A.dtype]
    tau = dt.clamp_min(0)
    with torch.no_grad():
        nu = float((tau.amax(1) * A.abs().sum(1).amax(1)).max()) if B and T else 0.0
    s = max(0, math.ceil(math.log2(nu / theta))) if nu > theta else 0
    h = (tau / 2.0 ** s).reshape(B * T, 1, 1)
    Ap = A[:, None].expand(B, T, D, D).reshape(B * T, D, D)
    Z = h * Ap
    q = (g.expand(B, D) ** 2)[:, None].expand(B, T, D).reshape(B * T, D)
    term = torch.diag_embed(q) * h  # T_0 = h Q
    S = term
    eye = torch.eye(D, dtype=A.dtype, device=A.device)
    E, P = eye + Z, Z
    for n in range(1, m + 1):
        M = Z @ term
        term = (M + M.transpose(1, 2)) / (n + 1)  # T_n = h^(n+1) / (n+1)! L^n(Q), symmetric
        S = S + term
        if n < m:
            P = (P @ Z) / (n + 1)  # Z^(n+1) / (n+1)!
            E = E + P
    for _ in range(s):
        S = S + E @ S @ E.transpose(1, 2)
        E = E @ E
    S = 0.5 * (S + S.transpose(1, 2))
    return S.reshape(B, T, D, D)
