"""The paper's scaling protocol: a time course inflated to many cells; and a seeded subsample.

* ``inflate`` — the paper's scaling experiment (datasets inflated to 250k cells with noisy copies
  of their cells): every original cell kept, plus copies with N(0, noise_std^2) noise added in the
  embedding's own (un-standardised) units, timepoints in proportion to their sizes;
  ``write_inflated`` saves the result as an .npz that ``load_marginals`` reads.
* ``subsample`` — a uniform subset of rows, for a timepoint too large for exact OT (POT's
  ``emd2`` holds the n x m cost matrix: 800 MB at 10k x 10k).

The W1 estimators for such sizes are in ``cellmnn.metrics``.
"""
from __future__ import annotations

import os
import zipfile

import numpy as np

from .. import checks
from ..files import OutputKind, write_atomic
from .marginals import Marginals

NPZ_FORMAT = "cellmnn-inflated"  # the ``format`` array of an inflated .npz: how cellmnn knows its own files


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

def check_inflate_args(n_cells, noise_std, seed, dtype=np.float32):
    """The checks of ``inflate`` that need no data (the command line runs them before loading);
    returns the normalised (n_cells, noise_std, seed, dtype)."""
    n_cells = checks.count("n_cells", n_cells)
    noise_std = checks.nonnegative("noise_std", noise_std)
    seed = checks.seed(seed)
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
    _check_memory(n_cells, max(m - n for m, n in zip(proportional_sizes(sizes, n_cells), sizes)), arrays[0].shape[1],
                  np.dtype(dtype).itemsize)
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


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation here (Linux: MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(n_cells: int, largest_extra: int, D: int, itemsize: int) -> None:
    """Refuse, before allocating, an inflation that cannot fit in memory: the cells (``itemsize``
    per value) and their parent rows (int64), plus the largest timepoint's float64 noise and copies."""
    need = n_cells * (D * itemsize + 8) + 3 * largest_extra * D * 8
    have = available_memory()
    if have is not None and need > have:
        raise ValueError(f"n_cells={n_cells:,} needs about {need / 2**30:,.1f} GiB of memory for {D} values per cell "
                         f"(and its parent row); {have / 2**30:,.1f} GiB are available here. Use fewer cells")


def write_inflated(path, marginals: Marginals, parents=None, noise_std=None, seed=None) -> str:
    """``marginals`` as a TrajectoryNet-style .npz that ``load_marginals`` reads: ``pcs`` (the
    cells in the embedding's own units, i.e. with the z-score undone; float32) and
    ``sample_labels`` (each cell's time), beside ``format`` ("cellmnn-inflated", how a later
    write recognises its own file), the transform (``zscore_mean``, ``zscore_std``, and
    ``pca_components``, ``pca_mean``, ``feature_names`` when there is a PCA) and, when given,
    ``parent`` (the row within its timepoint each cell was copied from), ``noise_std`` and ``seed``.
    Written atomically; replaces only an earlier file of this kind (``cellmnn.files``)."""
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
    return write_atomic(path, INFLATED, write, ".npz")


# ----------------------------------------------------------------------------- subsample

def subsample(x, n, seed=0) -> np.ndarray:
    """``n`` rows of ``x`` drawn uniformly without replacement (seeded), in their original order;
    ``x`` itself when it has at most ``n`` rows.  For a timepoint too large for exact W1."""
    a = np.asarray(x)
    if a.ndim < 1 or a.ndim > 2 or len(a) == 0:
        raise ValueError(f"x must be a non-empty 1-D or 2-D array; got shape {a.shape}")
    n, seed = checks.count("n", n), checks.seed(seed)
    if n >= len(a):
        return x
    return a[np.sort(np.random.default_rng(seed).choice(len(a), n, replace=False))]
