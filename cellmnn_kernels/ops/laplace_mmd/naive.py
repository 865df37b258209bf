"""Reference Laplace-MMD: dense N x M kernel matrices from ``torch.cdist(p=1)`` (the oracle).

k(u, v) = exp(-max(||u - v||_1 / D, 1e-8) / sigma);  biased MMD^2 (V-statistic, diagonal
included) with weighted means.  Memory O(N M); autograd gives sign(0) = 0 (cdist) and no
gradient where the clamp is active.
"""
from __future__ import annotations

import torch

CLAMP = 1e-8


def laplace_kernel_dense(a: torch.Tensor, b: torch.Tensor, sigma: float) -> torch.Tensor:
    """The (N, M) kernel matrix k(a_i, b_j) of points a (N, D) and b (M, D)."""
    dist = torch.cdist(a, b, p=1) / a.shape[1]
    return torch.exp(-dist.clamp_min(CLAMP) / sigma)


def laplace_mmd_reference(x, y, sigma=1.0, x_weights=None, y_weights=None, y_self=None):
    """MMD^2 between x (N, D) and y (M, D) with optional non-negative point weights; ``y_self``
    (a scalar tensor): the y-y kernel mean, used instead of computing it."""
    p = torch.ones(x.shape[0], dtype=x.dtype, device=x.device) if x_weights is None else x_weights
    q = torch.ones(y.shape[0], dtype=y.dtype, device=y.device) if y_weights is None else y_weights
    p, q = p / p.sum(), q / q.sum()
    yy = q @ laplace_kernel_dense(y, y, sigma) @ q if y_self is None else y_self
    return p @ laplace_kernel_dense(x, x, sigma) @ p + yy - 2 * p @ laplace_kernel_dense(x, y, sigma) @ q


def laplace_mmd_grouped_reference(x, x_offsets, y, y_offsets, terms_x, terms_y, term_weights=None,
                                  sigma=1.0, x_weights=None, y_weights=None, y_self=None):
    """Per-term MMD^2 by a loop of dense single calls; returns (weighted sum, per-term values).
    ``y_self`` (Py,): the y-y kernel mean of each y segment, used instead of computing it."""
    values = []
    for sx, sy in zip(terms_x, terms_y):
        xa, xb, ya, yb = x_offsets[sx], x_offsets[sx + 1], y_offsets[sy], y_offsets[sy + 1]
        values.append(laplace_mmd_reference(
            x[xa:xb], y[ya:yb], sigma,
            None if x_weights is None else x_weights[xa:xb],
            None if y_weights is None else y_weights[ya:yb], None if y_self is None else y_self[sy]))
    values = torch.stack(values)
    w = torch.ones_like(values) if term_weights is None else torch.as_tensor(
        term_weights, dtype=values.dtype, device=values.device)
    return (w * values).sum(), values
