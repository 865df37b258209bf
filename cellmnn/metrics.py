"""Every distance between point clouds that cellmnn reports, in one place.

* ``wasserstein1`` — exact W1 (POT ``emd2``, Euclidean cost, uniform or given weights): the
  score of leave-one-out and of inner selection.
* ``mmd`` — the Laplace MMD^2 of training (``cellmnn_kernels.laplace_mmd``, float64).
* ``wasserstein1_batched`` — the authors' evaluation at scale: the mean exact W1 over random
  batches of 200 x 200 cells.  An estimate, biased upward relative to exact W1.
* ``sliced_wasserstein1`` — the mean over random directions of the exact 1-D W1 of the
  projections: a lower bound on exact W1, in O((n + m) log(n + m)) per direction.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from cellmnn_kernels import laplace_mmd

from . import checks

OT_MAX_ITER = 1_000_000  # network-simplex iterations of POT's exact solver
MAX_DEFAULT_BATCHES = 1000  # default n_batches of wasserstein1_batched: at most this many (about 6 s on 1 core)


def wasserstein1(x, y, x_weights=None) -> float:
    """Exact W1 between point clouds (Euclidean cost); uniform weights unless x_weights is given."""
    import ot

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    a = np.full(len(x), 1.0 / len(x)) if x_weights is None else np.asarray(x_weights, dtype=np.float64)
    b = np.full(len(y), 1.0 / len(y))
    return float(ot.emd2(a / a.sum(), b, ot.dist(x, y, metric="euclidean"), numItermax=OT_MAX_ITER))


def mmd(x, y, x_weights=None, sigma=1.0) -> float:
    """The Laplace MMD^2 (bandwidth ``sigma``) between point clouds, in float64; uniform weights on
    y, on x unless ``x_weights`` is given."""
    t = lambda v: torch.as_tensor(np.asarray(v), dtype=torch.float64)  # noqa: E731
    return float(laplace_mmd(t(x), t(y), sigma, None if x_weights is None else t(x_weights), backend="torch"))


class _Batches:
    """Index batches of size b from range(n): consecutive slices of random permutations, so that
    every point is used once per pass; a batch that straddles two passes takes the rest of the
    old pass and points of the new one that are not among them (no point twice in a batch)."""

    def __init__(self, n, b, rng):
        self.n, self.b, self.rng = n, b, rng
        self.perm, self.pos = rng.permutation(n), 0

    def next(self):
        n, b = self.n, self.b
        if b >= n:
            return np.arange(n)
        if self.pos + b <= n:
            self.pos += b
            return self.perm[self.pos - b:self.pos]
        head = self.perm[self.pos:]
        new = self.rng.permutation(n)
        rest = new[~np.isin(new, head)]
        need = b - len(head)
        self.perm = np.concatenate([rest[:need], self.rng.permutation(np.concatenate([rest[need:], head]))])
        self.pos = need
        return np.concatenate([head, rest[:need]])


def wasserstein1_batched(x, y, batch=200, n_batches=None, seed=0) -> float:
    """The authors' W1 at scale: the mean exact W1 (``wasserstein1``: POT ``emd2``,
    Euclidean cost, uniform weights) over ``n_batches`` random batches of ``batch`` points of x
    against ``batch`` points of y (all of a set that has fewer), each batch drawn without
    replacement.  Batches are consecutive slices of random permutations, so every point is used
    once before any is used again.  Default ``n_batches``: enough to use every point of the larger
    set once, ceil(max(n, m) / batch), at most ``MAX_DEFAULT_BATCHES`` (1000).  When ``batch`` is
    at least both sizes every batch is the whole sets and the result is exact W1.

    **An estimate, biased upward relative to exact W1** (minibatch OT): the batches' optimal plans,
    averaged, form a coupling of the two sets whenever each point is used equally often (e.g.
    equal sizes that ``batch`` divides, default ``n_batches``), so then the estimate is >= exact W1
    for every seed; otherwise it is >= exact W1 in expectation.  The bias is the sampling error of
    W1 between 200-point sets and does not vanish as the sets grow: compare estimates with
    estimates of the same ``batch``, never with exact W1.
    """
    x, y = checks.point_pair(x, y)
    batch, seed = checks.count("batch", batch), checks.seed(seed)
    if n_batches is not None:
        n_batches = checks.count("n_batches", n_batches)
    n, m = len(x), len(y)
    if batch >= n and batch >= m:
        return wasserstein1(x, y)
    if n_batches is None:
        n_batches = min(math.ceil(max(n, m) / batch), MAX_DEFAULT_BATCHES)
    rng = np.random.default_rng(seed)
    bx, by = _Batches(n, batch, rng), _Batches(m, batch, rng)
    total = 0.0
    for _ in range(n_batches):
        i, j = bx.next(), by.next()
        total += wasserstein1(x[i], y[j])
    return total / n_batches


def _w1_1d(px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Exact 1-D W1 per column of px (n, P) and py (m, P): the integral of |F_x - F_y| over the
    merged sorted values, with F_x - F_y = (c_x m - c_y n) / (n m) in integer counts."""
    n, m = len(px), len(py)
    v = np.concatenate([px, py])
    order = np.argsort(v, axis=0, kind="stable")
    vs = np.take_along_axis(v, order, axis=0)
    cx = np.cumsum(order < n, axis=0, dtype=np.int64)[:-1]
    cy = np.arange(1, n + m, dtype=np.int64)[:, None] - cx
    return (np.abs(cx * m - cy * n) * np.diff(vs, axis=0)).sum(axis=0) / (n * m)


def sliced_wasserstein1(x, y, n_projections=256, seed=0) -> float:
    """Sliced W1: the mean over ``n_projections`` random unit directions (seeded, uniform on the
    sphere) of the exact 1-D W1 between the projections of x and y (uniform weights, any sizes:
    the integral of the difference of the two empirical CDFs).  Every projection is 1-Lipschitz,
    so sliced W1 <= exact W1; for D = 1 it is exact W1.  It is a different quantity (for a
    translation by s in D dimensions it is |s| times the mean |cos| of a random direction, about
    0.36 |s| for D = 5), so compare it only with itself.  Cost O(P (n + m) log(n + m)) time and
    O(n + m) memory per direction (directions are taken in chunks of about 4M values)."""
    x, y = checks.point_pair(x, y)
    P, seed = checks.count("n_projections", n_projections), checks.seed(seed)
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((P, x.shape[1]))
    norms = np.linalg.norm(theta, axis=1)
    while (norms == 0).any():  # probability zero, but a zero direction has no projection
        theta[norms == 0] = rng.standard_normal(((norms == 0).sum(), x.shape[1]))
        norms = np.linalg.norm(theta, axis=1)
    theta /= norms[:, None]
    chunk = max(1, (1 << 22) // (len(x) + len(y)))
    values = [_w1_1d(x @ theta[k:k + chunk].T, y @ theta[k:k + chunk].T) for k in range(0, P, chunk)]
    return float(np.concatenate(values).mean())
