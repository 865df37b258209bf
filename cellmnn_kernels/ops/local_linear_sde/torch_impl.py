"""Pure-PyTorch covariance of ``local_linear_sde_step``: Taylor series and doublings (``common.py``),
in batched GEMMs over pairs, differentiable by autograd.

Cost per pair O((m + s) D^3) with s = ceil(log2(||dt A||_1 / theta)) doublings (one s for the call,
the largest any pair needs: a smaller step than needed costs doublings, never accuracy).
"""
from __future__ import annotations

import math

import torch

from .common import TAYLOR

# Up to this D the pairs' matrix-matrix products are broadcast multiply-and-sums with the pairs
# last ((D, D, D, pairs) scratch), above it batched GEMMs.  Covariance forward+backward on one core
# of a 2-core x86-64 CPU (AMD EPYC), 200 cells x 5 times: 6.4 -> 2.9 ms at D = 3, 21.2 -> 9.2 ms
# at D = 5, 31.6 -> 17.1 ms at D = 6, but 49.8 -> 73.2 ms at D = 7 and 36 -> 65 ms at D = 10.
LANES_MATMUL_MAX_D = 6


def sde_covariance_torch(A: torch.Tensor, dt: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """S (B, T, D, D): covariance of x(dt) given x(0) under dx = A x ds + diag(g) dW; 0 for dt <= 0.

    A (B, D, D), dt (B, T), g (B, D) or (D,).  For D <= ``LANES_MATMUL_MAX_D`` the pairs' matrices are
    (D, D, B T) with the pairs last and every product a broadcast multiply-and-sum; above, batched
    GEMMs over (B T, D, D)."""
    B, D, _ = A.shape
    T = dt.shape[1]
    theta, m = TAYLOR[A.dtype]
    tau = dt.clamp_min(0)
    with torch.no_grad():
        nu = float((tau.amax(1) * A.abs().sum(1).amax(1)).max()) if B and T else 0.0
    s = max(0, math.ceil(math.log2(nu / theta))) if nu > theta else 0
    h = (tau / 2.0 ** s).reshape(B * T)
    q = (g.expand(B, D) ** 2)[:, None].expand(B, T, D).reshape(B * T, D)
    eye = torch.eye(D, dtype=A.dtype, device=A.device)
    lanes = D <= LANES_MATMUL_MAX_D
    if lanes:
        Z = h * A.permute(1, 2, 0)[..., None].expand(D, D, B, T).reshape(D, D, B * T)
        mm = lambda X, Y: (X[:, :, None, :] * Y[None]).sum(1)  # noqa: E731
        tr = lambda X: X.transpose(0, 1)  # noqa: E731
        eye = eye[:, :, None]
        term = eye * (q.t() * h)[None]  # T_0 = h Q
    else:
        Z = h[:, None, None] * A[:, None].expand(B, T, D, D).reshape(B * T, D, D)
        mm, tr = torch.matmul, (lambda X: X.transpose(1, 2))
        term = torch.diag_embed(q) * h[:, None, None]
    S = term
    E, P = eye + Z, Z
    for n in range(1, m + 1):
        M = mm(Z, term)
        term = (M + tr(M)) / (n + 1)  # T_n = h^(n+1) / (n+1)! L^n(Q), symmetric
        S = S + term
        if n < m:
            P = mm(P, Z) / (n + 1)  # Z^(n+1) / (n+1)!
            E = E + P
    for _ in range(s):
        S = S + mm(mm(E, S), tr(E))
        E = mm(E, E)
    S = 0.5 * (S + tr(S))
    return (S.permute(2, 0, 1) if lanes else S).reshape(B, T, D, D)
