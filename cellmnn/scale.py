"""Scaling: a time course inflated to many cells (the paper's protocol) and W1 beyond exact OT.

* ``inflate`` — the paper's scaling experiment (datasets inflated to 250k cells with noisy copies
  of their cells): every original cell kept, plus copies with N(0, noise_std^2) noise added in the
  embedding's own (un-standardised) units, timepoints in proportion to their sizes.
* ``wasserstein1_batched`` — the authors' evaluation at that scale: the mean exact W1 over random
  batches of 200 x 200 cells.  An estimate, biased upward relative to exact W1.
* ``sliced_wasserstein1`` — the mean over random directions of the exact 1-D W1 of the
  projections: a lower bound on exact W1, in O((n + m) log(n + m)) per direction.
* ``subsample`` — a uniform subset of rows, for a timepoint too large for exact OT (POT's
  ``emd2`` holds the n x m cost matrix: 800 MB at 10k x 10k).

``evaluate.wasserstein1`` (exact, POT ``emd2``) is unchanged; each batch of
``wasserstein1_batched`` is scored by it.
"""
from __future__ import annotations

import math
import numbers
import zipfile

import numpy as np

from .data import Marginals
from .io import OutputKind

NPZ_FORMAT = "cellmnn-inflated"  # the ``format`` array of an inflated .npz: how cellmnn knows its own files
MAX_DEFAULT_BATCHES = 1000  # default n_batches of wasserstein1_batched: at most this many (about 6 s on 1 core)


def _is_inflated_npz(path: str) -> bool:
    """Whether ``path`` is an .npz written by ``write_inflated`` (its ``format`` array)."""
    try:
        f = np.load(path, allow_pickle=False)
    except Exception:  # noqa: BLE001 - not ours whatever the reason (not a zip, pickled, unreadable)
        return False
    if not isinstance(f, np.lib.npyio.NpzFile):
        return False
    try:
        with f:
            if "format" not in f.files:
                return False
            fmt = f["format"]
            return fmt.dtype.kind == "U" and fmt.shape == () and str(fmt) == NPZ_FORMAT
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False


INFLATED = OutputKind("scaled-up time course (.npz)", _is_inflated_npz)


# ----------------------------------------------------------------------------- argument checks

def _count(name, v, low=1):
    """An integer >= ``low`` (ints, numpy ints, integral floats), or a ValueError naming ``name``."""
    if isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    if isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
        v = int(v)
    if not isinstance(v, numbers.Integral) or v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    return int(v)


def _seed(v, name="seed"):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral) or not 0 <= v < 2 ** 63:
        raise ValueError(f"{name} must be an integer in [0, 2**63), got {v!r}")
    return int(v)


def _nonnegative(name, v):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return v


def _points(name, x) -> np.ndarray:
    """A non-empty, finite (n, D) point cloud as float64, or an error naming ``name``."""
    try:
        a = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric (points x dimensions) array: {exc}") from None
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric; got dtype {a.dtype}")
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (points x dimensions) array; got shape {a.shape}")
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has {int((~np.isfinite(a).all(axis=1)).sum())} rows with NaN or Inf")
    return a


def _pair(x, y):
    x, y = _points("x", x), _points("y", y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension; got {x.shape[1]} and {y.shape[1]}")
    return x, y


def check_inflate_args(n_cells, noise_std, seed, dtype=np.float32):
    """The checks of ``inflate`` that need no data (the command line runs them before loading);
    returns the normalised (n_cells, noise_std, seed, dtype)."""
    n_cells = _count("n_cells", n_cells)
    noise_std = _nonnegative("noise_std", noise_std)
    seed = _seed(seed)
    try:
        dt = None if dtype is None else np.dtype(dtype)  # np.dtype(None) would be float64
    except TypeError:
        dt = None
    if dt is None or dt.name not in ("float32", "float64"):  # (dtype == None is True for float64)
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return n_cells, noise_std, seed, dt


# ----------------------------------------------------------------------------- inflate

def proportional_sizes(sizes, n_cells) -> list:
    """``n_cells`` split over timepoints in proportion to ``sizes`` by largest remainders: the
    floors of n_cells * n_i / N, then one more cell for the timepoints with the largest remainders
    (ties: the earlier timepoint).  Exact integer arithmetic; the result sums to ``n_cells``, each
    entry is within 1 of its quota and, when n_cells >= N, at least its size."""
    N = sum(sizes)
    quota = [n_cells * n for n in sizes]
    out = [q // N for q in quota]
    order = sorted(range(len(sizes)), key=lambda i: (-(quota[i] % N), i))
    for i in order[:n_cells - sum(out)]:
        out[i] += 1
    return out


def inflate(marginals: Marginals, n_cells, noise_std=0.1, seed=0, *, dtype=np.float32, return_parents=False):
    """The time course inflated to ``n_cells`` cells with noisy copies of its cells (the paper's
    scaling protocol, Cell-MNN arXiv 2510.02903).

    Timepoint i gets m_i cells, in proportion to its size n_i (``proportional_sizes``: largest
    remainders, so the m_i sum to exactly ``n_cells``).  Its first n_i rows are its original cells,
    unchanged (bit for bit in ``dtype=np.float64``; rounded once to float32 by default); the other
    m_i - n_i rows are copies, each original copied floor or ceil((m_i - n_i) / n_i) times (the
    extra copies go to originals drawn without replacement), in random order.  A copy is its
    original plus N(0, noise_std^2) noise in the embedding's own units, before the z-score of
    ``marginals.transform``: undoing z = (e - mean) / std, adding the noise to e and redoing it is
    z + noise / std, which is what is computed (in float64, then cast to ``dtype``).  The noise is
    therefore ``noise_std`` in PCA-score (or raw-feature) units whatever the standardisation.

    Returns ``Marginals`` with the same times and the same transform (float32 arrays by default:
    1M cells x D = 5 is 20 MB); with ``return_parents``, also one int64 array per timepoint giving
    the row of the original cell each row was copied from (originals: their own row).  Seeded
    (``numpy.random.default_rng(seed)``), so the same arguments give the same cells.  Every
    original is kept, so ``n_cells`` must be at least the current total (``subsample`` reduces a
    timepoint instead).

    The authors' ``data/inflate_data.py`` draws the copied cells with replacement from all cells
    (so timepoint sizes are proportional only on average) and seeds NumPy's global generator.
    """
    if not isinstance(marginals, Marginals):
        raise TypeError(f"marginals must be a Marginals from cellmnn.load_marginals(...), got "
                        f"{type(marginals).__name__}")
    n_cells, noise_std, seed, dtype = check_inflate_args(n_cells, noise_std, seed, dtype)
    if len(marginals.data) == 0 or len(marginals.data) != len(marginals.times):
        raise ValueError(f"marginals must have one array per time; got {len(marginals.data)} arrays and "
                         f"{len(marginals.times)} times")
    arrays = []
    for i, x in enumerate(marginals.data):
        x = np.asarray(x)
        if x.dtype.kind != "f" or x.ndim != 2 or len(x) == 0 or x.shape[1] != len(marginals.transform.std):
            raise ValueError(f"marginals.data[{i}] must be a non-empty (cells x {len(marginals.transform.std)}) "
                             f"float array; got {x.dtype} {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"marginals.data[{i}] has NaN or Inf")
        arrays.append(x)
    sizes = [len(x) for x in arrays]
    total = sum(sizes)
    if n_cells < total:
        raise ValueError(f"n_cells={n_cells} is fewer than the {total} cells the data already have; inflate "
                         "keeps every original cell and only adds copies (use cellmnn.subsample to reduce)")
    std = np.asarray(marginals.transform.std, dtype=np.float64)
    rng = np.random.default_rng(seed)
    data, parents = [], []
    for x, m in zip(arrays, proportional_sizes(sizes, n_cells)):
        n, extra = len(x), m - len(x)
        reps, rest = divmod(extra, n)
        parent = np.concatenate([np.tile(np.arange(n), reps), rng.choice(n, rest, replace=False)])
        parent = rng.permutation(parent)
        noise = rng.standard_normal((extra, x.shape[1])) * noise_std
        out = np.empty((m, x.shape[1]), dtype=dtype)
        out[:n] = x
        out[n:] = x[parent].astype(np.float64) + noise / std
        data.append(out)
        parents.append(np.concatenate([np.arange(n), parent]).astype(np.int64))
    source = f"{marginals.source or 'marginals'} inflated to {n_cells} cells (noise_std {noise_std:g}, seed {seed})"
    result = Marginals(data, np.array(marginals.times, dtype=np.float64), marginals.transform, source,
                       dict(marginals.dropped))
    return (result, parents) if return_parents else result


def write_inflated(path, marginals: Marginals, parents=None, noise_std=None, seed=None) -> str:
    """``marginals`` as a TrajectoryNet-style .npz that ``load_marginals`` reads: ``pcs`` (the
    cells in the embedding's own units, i.e. with the z-score undone; float32) and
    ``sample_labels`` (each cell's time), beside ``format`` ("cellmnn-inflated", how a later
    write recognises its own file), the transform (``zscore_mean``, ``zscore_std``, and
    ``pca_components``, ``pca_mean``, ``feature_names`` when there is a PCA) and, when given,
    ``parent`` (the row within its timepoint each cell was copied from), ``noise_std`` and ``seed``.
    Written atomically; replaces only an earlier file of this kind (``cellmnn.io``)."""
    import os

    from .io import _write_atomic

    if not isinstance(marginals, Marginals):
        raise TypeError(f"marginals must be a Marginals, got {type(marginals).__name__}")
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).lower().endswith(".npz"):
        raise ValueError(f"path must name a .npz file (load_marginals reads it by its extension); got {path!r}")
    tr = marginals.transform
    std, mean = np.asarray(tr.std, dtype=np.float64), np.asarray(tr.mean, dtype=np.float64)
    arrays = {
        "format": np.array(NPZ_FORMAT),
        "pcs": np.concatenate([(np.asarray(z, dtype=np.float64) * std + mean).astype(np.float32)
                               for z in marginals.data]),
        "sample_labels": np.repeat(np.asarray(marginals.times, dtype=np.float64), marginals.sizes),
        "zscore_mean": mean, "zscore_std": std,
    }
    if tr.pca_components is not None:
        arrays["pca_components"], arrays["pca_mean"] = tr.pca_components, tr.pca_mean
    if tr.feature_names:
        arrays["feature_names"] = np.array(tr.feature_names, dtype=str)
    if parents is not None:
        arrays["parent"] = np.concatenate(parents).astype(np.int64)
    if noise_std is not None:
        arrays["noise_std"] = np.array(float(noise_std))
    if seed is not None:
        arrays["seed"] = np.array(int(seed))

    def write(tmp):
        with open(tmp, "wb") as fh:  # a file object: np.savez appends no suffix
            np.savez(fh, **arrays)
    return _write_atomic(path, INFLATED, write, ".npz")


# ----------------------------------------------------------------------------- W1 estimators

def subsample(x, n, seed=0) -> np.ndarray:
    """``n`` rows of ``x`` drawn uniformly without replacement (seeded), in their original order;
    ``x`` itself when it has at most ``n`` rows.  For a timepoint too large for exact W1."""
    a = np.asarray(x)
    if a.ndim < 1 or a.ndim > 2 or len(a) == 0:
        raise ValueError(f"x must be a non-empty 1-D or 2-D array; got shape {a.shape}")
    n, seed = _count("n", n), _seed(seed)
    if n >= len(a):
        return x
    return a[np.sort(np.random.default_rng(seed).choice(len(a), n, replace=False))]


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
    """The authors' W1 at scale: the mean exact W1 (``evaluate.wasserstein1``: POT ``emd2``,
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
    from .evaluate import wasserstein1

    x, y = _pair(x, y)
    batch, seed = _count("batch", batch), _seed(seed)
    if n_batches is not None:
        n_batches = _count("n_batches", n_batches)
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
    x, y = _pair(x, y)
    P, seed = _count("n_projections", n_projections), _seed(seed)
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
