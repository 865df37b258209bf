"""Time-course snapshot data as per-timepoint marginals, with the transform that produced them."""
from __future__ import annotations

import contextlib
import csv
import io
import numbers
import os
import re
import warnings
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

DEFAULT_TIME_KEYS = ("day", "time", "timepoint", "sample_labels")
MISSING = ("", "na", "nan")  # CSV fields read as NaN (compared lower-cased, stripped)
_MISSING_FIELDS = ((re.compile(r",[ \t]*(?:nan?)?[ \t]*(?=[,\n])", re.I), ",nan"),  # 2nd.. field
                   (re.compile(r"^[ \t]*(?:nan?)?[ \t]*,", re.I | re.M), "nan,"))  # first field
TIME_RTOL = 1e-9  # times closer than this (relative) are one timepoint
CHUNK_ROWS = 65536  # backed .h5ad: rows per read ...
CHUNK_BYTES = 1 << 26  # ... and at most this many bytes per chunk as float64 (64 MiB), for wide X
COV_BYTES = 2 * 10**9  # backed PCA of X: the largest (genes x genes) float64 covariance accepted


def _duplicates(names) -> list:
    return [n for n, c in Counter(names).items() if c > 1]


@dataclass
class Transform:
    """Raw features -> model space:  z = ((x - pca_mean) @ pca_components.T - mean) / std.

    ``pca_components`` (D, n_features) and ``pca_mean`` are None when no PCA was applied; ``mean``
    and ``std`` are zeros and ones when the data were not standardised.  Checked on creation:
    finite values, ``std > 0``, consistent shapes, unique ``feature_names`` (one per raw feature).
    """
    mean: np.ndarray
    std: np.ndarray
    pca_components: np.ndarray | None = None
    pca_mean: np.ndarray | None = None
    feature_names: list | None = None

    def __post_init__(self):
        def arr(name, ndim):
            try:
                a = np.asarray(getattr(self, name), dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"transform {name} must be numeric") from None
            if a.ndim != ndim or a.size == 0:
                raise ValueError(f"transform {name} must be a non-empty {ndim}-D array; got shape {a.shape}")
            if name != "std" and not np.isfinite(a).all():  # std: checked below, with zeros
                raise ValueError(f"transform {name} has {int((~np.isfinite(a)).sum())} non-finite entries")
            return a

        self.mean, self.std = arr("mean", 1), arr("std", 1)
        D = len(self.mean)
        if self.std.shape != (D,):
            raise ValueError(f"transform std must have the length of mean ({D}); got {len(self.std)}")
        bad = int((~(np.isfinite(self.std) & (self.std > 0))).sum())
        if bad:
            raise ValueError(f"transform std has {bad} zero or non-finite entries; it must be positive")
        if (self.pca_components is None) != (self.pca_mean is None):
            raise ValueError("transform pca_components and pca_mean must both be given or both be None")
        if self.pca_components is not None:
            self.pca_components, self.pca_mean = arr("pca_components", 2), arr("pca_mean", 1)
            if self.pca_components.shape[0] != D or len(self.pca_mean) != self.pca_components.shape[1]:
                raise ValueError(f"transform pca_components must be (D, F) = ({D}, len(pca_mean) = "
                                 f"{len(self.pca_mean)}); got {self.pca_components.shape}")
        if self.feature_names is not None:
            names = self.feature_names
            if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
                raise ValueError("transform feature_names must be a list of strings")
            if len(names) != self.n_features:
                raise ValueError(f"transform feature_names has {len(names)} names for {self.n_features} features")
            if _duplicates(names):
                raise ValueError(f"transform feature_names has duplicates: {_duplicates(names)[:10]}")
            self.feature_names = list(names)

    @property
    def n_features(self) -> int:
        """F, the number of raw input features."""
        return len(self.mean) if self.pca_components is None else self.pca_components.shape[1]

    def align(self, x, names=None, what="the data") -> np.ndarray:
        """``x`` (n, k) raw features as an (n, F) float64 array in this transform's feature order:
        matched by name when both sides have names (extra columns unused), else by position."""
        x = _as_float(x, what)
        if x.ndim != 2:
            raise ValueError(f"{what} must be a 2-D (cells x features) table; got shape {x.shape}")
        F = self.n_features
        if self.feature_names and names is not None:
            names = [str(n) for n in names]
            if len(names) != x.shape[1]:
                raise ValueError(f"{what}: {len(names)} feature names for {x.shape[1]} columns")
            if _duplicates(names):
                raise ValueError(f"{what} has duplicate feature names: {_duplicates(names)[:10]}")
            index = {n: i for i, n in enumerate(names)}
            missing = [n for n in self.feature_names if n not in index]
            if missing:
                raise ValueError(f"{len(missing)} of the model's {F} features are missing from {what}: "
                                 f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
            return x[:, [index[n] for n in self.feature_names]]
        if x.shape[1] != F:
            raise ValueError(f"{what} has {x.shape[1]} features; the model was fitted on {F}, and there are "
                             "no feature names to match them by")
        return x

    def same_as(self, other: "Transform") -> bool:
        """Whether ``other`` maps raw features to the same model space (names, PCA, z-score)."""
        pairs = ((self.pca_components, other.pca_components), (self.pca_mean, other.pca_mean),
                 (self.mean, other.mean), (self.std, other.std))
        return (self.feature_names or None) == (other.feature_names or None) and all(
            (a is None and b is None) or (a is not None and b is not None and np.shape(a) == np.shape(b)
                                          and np.allclose(a, b, rtol=1e-6, atol=1e-9)) for a, b in pairs)

    def to_model(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self.pca_components is not None:
            x = (x - self.pca_mean) @ self.pca_components.T
        return (x - self.mean) / self.std

    def to_features(self, z: np.ndarray) -> np.ndarray:
        """Back to feature space (the PCA part is the projection onto the kept components)."""
        x = np.asarray(z, dtype=np.float64) * self.std + self.mean
        if self.pca_components is not None:
            x = x @ self.pca_components + self.pca_mean
        return x

    def to_dict(self) -> dict:
        arr = lambda a: None if a is None else np.asarray(a).tolist()  # noqa: E731
        return {"mean": arr(self.mean), "std": arr(self.std), "pca_components": arr(self.pca_components),
                "pca_mean": arr(self.pca_mean), "feature_names": self.feature_names}

    @classmethod
    def from_dict(cls, d: dict) -> "Transform":
        """The inverse of ``to_dict``; a ValueError naming the field when it is malformed."""
        if not isinstance(d, dict):
            raise ValueError(f"transform must be a dict; got {type(d).__name__}")
        missing = [k for k in ("mean", "std") if d.get(k) is None]
        if missing:
            raise ValueError(f"transform has no {' or '.join(missing)}")
        return cls(d["mean"], d["std"], d.get("pca_components"), d.get("pca_mean"), d.get("feature_names"))


@dataclass
class Marginals:
    """One (n_i, D) array per timepoint, in model space, with ascending ``times``."""
    data: list
    times: np.ndarray
    transform: Transform
    source: str = ""
    dropped: dict = field(default_factory=dict)  # timepoint -> rows dropped for NaN/Inf

    @property
    def dim(self) -> int:
        return self.data[0].shape[1]

    @property
    def sizes(self) -> list:
        return [len(d) for d in self.data]

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        times = ", ".join(f"{t:g}" for t in self.times)
        return (f"Marginals({len(self)} timepoints at t = [{times}], sizes {self.sizes}, D = {self.dim}"
                f"{', from ' + self.source if self.source else ''})")


def load_marginals(source=None, time_key=None, embedding=None, n_components=5, standardize=True,
                   times=None, drop_nonfinite=False, backed=False) -> Marginals:
    """Read a time course into per-timepoint marginals.

    ``source`` is one of: an AnnData object or ``.h5ad`` path (times from ``obs[time_key]``;
    features from ``obsm[embedding]``, e.g. "X_pca", or else a PCA of ``X`` with
    ``n_components`` components); a TrajectoryNet-style ``.npz`` (``pcs``, ``sample_labels``);
    a CSV with a time column and feature columns; a list of (n_i, F) arrays with ``times``; or
    None for the embedded A549 EMT time course.  Feature tables (CSV, arrays) with more than
    ``n_components`` columns are reduced by PCA; precomputed embeddings (obsm, npz ``pcs``) keep
    their first ``n_components`` columns.  ``n_components=None`` keeps every column.  With
    ``standardize`` the model space is z-scored with mean and std pooled over all timepoints.
    Rows with NaN/Inf are an error, reported with counts, unless ``drop_nonfinite``.  Times equal
    up to float rounding (relative difference <= 1e-9) are one timepoint, with a warning.
    ``backed=True`` (``.h5ad`` paths only) reads ``obsm[embedding]``, or ``X`` (dense or CSR) for an
    exact PCA from a covariance accumulated over row chunks, from the file a chunk at a time, so only
    the model-space data are held in memory; the result is that of ``backed=False`` (whose sklearn PCA
    is randomized, so approximate, with more than 1000 genes or fewer than 10 cells per gene).
    """
    if n_components is not None:
        if isinstance(n_components, (bool, np.bool_)) or not isinstance(n_components, numbers.Integral) \
                or n_components < 1:
            raise ValueError(f"n_components must be a positive integer or None, got {n_components!r}")
        n_components = int(n_components)
    for name, value in (("time_key", time_key), ("embedding", embedding)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a string or None, got {type(value).__name__} {value!r}")
    for name, value in (("standardize", standardize), ("drop_nonfinite", drop_nonfinite), ("backed", backed)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    if backed and not (isinstance(source, (str, os.PathLike))
                       and os.path.splitext(os.fspath(source))[1].lower() == ".h5ad"):
        what = repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else \
            "the embedded example data" if source is None else f"a {type(source).__name__}"
        raise ValueError(f"backed=True applies to .h5ad paths only (read in row chunks from the file); "
                         f"got {what}. Pass backed=False")
    if source is None:
        source = resources.files("cellmnn") / "datasets" / "emt_a549_3d.csv"
        with resources.as_file(source) as path:
            return load_marginals(str(path), time_key, embedding, n_components, standardize, times, drop_nonfinite)
    if isinstance(source, (list, tuple)):
        if times is None:
            raise ValueError("times is required when source is a list of arrays (one time per array)")
        if len(source) == 0:
            raise ValueError("source is an empty list; pass one (cells x features) array per timepoint")
        return _from_arrays(source, times, n_components, standardize, drop_nonfinite)
    if times is not None:
        raise ValueError("times is only used with a list of arrays; other sources carry their own times")
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"source file not found: {path}")
        if os.path.isdir(path):
            raise ValueError(f"{path} is a directory; expected a .h5ad, .npz or .csv file")
        ext = os.path.splitext(path)[1].lower()
        if ext not in (".h5ad", ".npz", ".csv"):
            raise ValueError(f"cannot read {path!r}: expected a .h5ad, .npz or .csv file")
        try:
            with open(path, "rb"):
                pass
        except PermissionError:
            raise PermissionError(f"cannot read {path}: permission denied") from None
        if ext == ".h5ad" and backed:
            with _open_h5ad(path) as f:
                m = _from_h5ad_backed(f, path, time_key, embedding, n_components, standardize, drop_nonfinite)
            m.source += " (backed)"
            return m
        if ext == ".h5ad":
            import anndata

            try:
                adata = anndata.read_h5ad(path)
            except Exception as exc:  # h5py and anndata raise many types for damaged files
                raise ValueError(f"cannot read {path} as .h5ad: {exc}") from None
            return _from_anndata(adata, time_key, embedding, n_components, standardize, drop_nonfinite, path)
        if ext == ".npz":
            return _from_npz(path, time_key, n_components, standardize, drop_nonfinite)
        return _from_csv(path, time_key, n_components, standardize, drop_nonfinite)
    try:
        import anndata

        if isinstance(source, anndata.AnnData):
            return _from_anndata(source, time_key, embedding, n_components, standardize, drop_nonfinite, "AnnData")
    except ImportError:  # pragma: no cover - anndata is a dependency
        pass
    raise TypeError(f"source must be an AnnData, a .h5ad/.npz/.csv path, a list of arrays or None; "
                    f"got {type(source).__name__}")


# ----------------------------------------------------------------------------- readers

def _as_float(a, what):
    """Numbers (not strings, not other Python objects) as a float64 array, or a ValueError naming ``what``."""
    try:
        arr = np.asarray(a)
    except (TypeError, ValueError) as exc:  # ragged nested lists
        raise ValueError(f"{what} must be a numeric (cells x features) array: {exc}") from None
    if arr.dtype.kind == "O" and all(isinstance(v, numbers.Real) for v in arr.flat):
        arr = arr.astype(np.float64)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{what} must be numeric; got dtype {arr.dtype} with values such as "
                         f"{arr.ravel()[:3].tolist()}")
    return arr.astype(np.float64)


def _numeric_times(values, what):
    """Times as float64: numbers and numeric strings are fine, anything else is a ValueError naming ``what``."""
    arr = np.asarray(values)
    if arr.dtype.kind in "biuf":
        return arr.astype(np.float64)
    try:
        return arr.astype(object).astype(np.float64)
    except (TypeError, ValueError):
        def bad(v):
            try:
                float(v)
                return False
            except (TypeError, ValueError):
                return True
        examples = [v for v in arr.ravel().tolist() if bad(v)][:3]
        raise ValueError(f"{what} must be numeric (times as numbers); got values such as {examples}") from None


def _time_key(time_key, columns) -> str:
    """The obs column holding the times: ``time_key``, else the first of DEFAULT_TIME_KEYS present."""
    keys = [time_key] if time_key is not None else [k for k in DEFAULT_TIME_KEYS if k in columns]
    if not keys or keys[0] not in columns:
        raise ValueError(f"time key {time_key!r} not found in obs; available columns: {list(columns)}"
                         if time_key is not None else
                         f"no time column found in obs (tried {list(DEFAULT_TIME_KEYS)}); pass time_key= "
                         f"one of {list(columns)}")
    return keys[0]


def _obs_times(col, name, key):
    """An obs column (a pandas Series) as float64 times; categoricals and pandas strings as plain objects,
    missing as NaN."""
    return _numeric_times(col.to_numpy(dtype=object, na_value=np.nan), f"{name}: obs[{key!r}]")


def _no_embedding(embedding, available):
    return ValueError(f"embedding {embedding!r} not found in obsm; available: {list(available)}")


def _duplicate_var_names(name, names):
    return ValueError(f"{name}: duplicate var_names {_duplicates(names)[:10]}; call adata.var_names_make_unique() "
                      "or pass embedding=")


def _from_anndata(adata, time_key, embedding, n_components, standardize, drop_nonfinite, name):
    key = _time_key(time_key, adata.obs.columns)
    t = _obs_times(adata.obs[key], name, key)
    if embedding is not None:
        if embedding not in adata.obsm:
            raise _no_embedding(embedding, adata.obsm.keys())
        x = _as_float(adata.obsm[embedding], f"{name}: obsm[{embedding!r}]")
        if x.ndim == 2 and n_components is not None:
            x = x[:, :n_components]
        return _build(x, t, None, standardize, drop_nonfinite, f"{name} obsm[{embedding!r}]", None)
    if adata.X is None:
        raise ValueError(f"{name} has no X; pass embedding= one of {list(adata.obsm.keys())}")
    names = [str(v) for v in adata.var_names]
    if _duplicates(names):
        raise _duplicate_var_names(name, names)
    X = adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X
    return _build(_as_float(X, f"{name}: X"), t, n_components, standardize, drop_nonfinite,
                  f"{name} X (PCA)", names, force_pca=True)


# ----------------------------------------------------------------------------- backed .h5ad

def _chunks(n, width):
    """(start, stop) row ranges covering n rows: CHUNK_ROWS at a time, fewer when a float64 chunk of
    ``width`` columns would pass CHUNK_BYTES."""
    step = max(1, min(int(CHUNK_ROWS), CHUNK_BYTES // (8 * max(int(width), 1))))
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def _read_rows(elem, start, stop, ncols=None):
    """Rows ``start:stop`` (the first ``ncols`` columns, or all) of a 2-D h5py dataset or an anndata
    backed CSR matrix, as a dense float64 array.  Every backed read of X or obsm goes through here."""
    import h5py

    if isinstance(elem, h5py.Dataset):
        block = elem[start:stop] if ncols is None else elem[start:stop, :ncols]
    else:
        block = elem[start:stop]
        block = (block if ncols is None else block[:, :ncols]).toarray()
    return np.asarray(block, dtype=np.float64)


@contextlib.contextmanager
def _open_h5ad(path):
    """An .h5ad file open read-only with h5py for a backed read, closed afterwards (also on an error);
    HDF5 errors, on opening or part way, as a ValueError naming the file."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except Exception as exc:  # h5py raises OSError and others for damaged files
        raise ValueError(f"cannot read {path} as .h5ad: {exc}") from None
    try:
        with f:
            yield f
    except OSError as exc:
        raise ValueError(f"cannot read {path} as .h5ad: {exc}") from None


def _from_h5ad_backed(f, path, time_key, embedding, n_components, standardize, drop_nonfinite):
    """load_marginals(path, ..., backed=True) from the open file ``f``: X or obsm[embedding] read in row chunks."""
    import h5py
    import pandas as pd
    from anndata.io import read_elem

    obs = f.get("obs")
    if not isinstance(obs, h5py.Group) or obs.attrs.get("encoding-type") != "dataframe" or "_index" not in obs.attrs:
        raise ValueError(f"cannot read {path} with backed=True: its obs is not in the anndata >= 0.8 layout; "
                         "pass backed=False, or re-save it with a current anndata")
    columns = [str(c) for c in np.atleast_1d(obs.attrs.get("column-order", []))]
    key = _time_key(time_key, columns)
    t = _obs_times(pd.Series(read_elem(obs[key])), path, key)
    obsm = f.get("obsm")
    obsm_keys = list(obsm.keys()) if isinstance(obsm, h5py.Group) else []
    if embedding is not None:
        if embedding not in obsm_keys:
            raise _no_embedding(embedding, obsm_keys)
        elem, what = obsm[embedding], f"{path}: obsm[{embedding!r}]"
        if isinstance(elem, h5py.Dataset) and elem.ndim == 2 and elem.dtype.kind in "biuf":
            n, k = elem.shape[0], elem.shape[1] if n_components is None else min(n_components, elem.shape[1])
            x = np.empty((n, k))
            for a, b in _chunks(n, k) if k else []:
                x[a:b] = _read_rows(elem, a, b, k)
        else:  # a data frame, a non-numeric or 1-D array, sparse: as the in-memory reader does (and refuses)
            x = _as_float(read_elem(elem), what)
            if x.ndim == 2 and n_components is not None:
                x = x[:, :n_components]
        return _build(x, t, None, standardize, drop_nonfinite, f"{path} obsm[{embedding!r}]", None)
    X = f.get("X")
    if X is None:
        raise ValueError(f"{path} has no X; pass embedding= one of {obsm_keys}")
    var = f.get("var")
    if not isinstance(var, h5py.Group) or "_index" not in var.attrs:
        raise ValueError(f"cannot read {path} with backed=True: its var is not in the anndata >= 0.8 layout; "
                         "pass backed=False, or re-save it with a current anndata")
    names = [str(v) for v in read_elem(var[var.attrs["_index"]])]
    if _duplicates(names):
        raise _duplicate_var_names(path, names)
    if isinstance(X, h5py.Group):
        kind = X.attrs.get("encoding-type")
        if kind != "csr_matrix":
            raise ValueError(f"{path}: X is stored as {kind or 'an unknown group'}; backed=True reads X by rows, "
                             "which needs a dense or CSR X; pass embedding=, or backed=False")
        from anndata.io import sparse_dataset

        X = sparse_dataset(X)
    if X.dtype.kind not in "biuf" or len(X.shape) != 2:
        raise ValueError(f"{path}: X must be a numeric 2-D (cells x genes) matrix; got dtype {X.dtype}, "
                         f"shape {X.shape}")
    source = f"{path} X (PCA)"
    if n_components is None:  # no PCA: X itself is the model space, so it is read whole (in chunks)
        x = np.empty(X.shape)
        for a, b in _chunks(X.shape[0], X.shape[1]):
            x[a:b] = _read_rows(X, a, b)
        return _build(x, t, None, standardize, drop_nonfinite, source, names, force_pca=True)
    return _backed_pca(X, t, n_components, standardize, drop_nonfinite, source, names)


def _backed_pca(X, t, n_components, standardize, drop_nonfinite, source, names):
    """The in-memory loader's PCA of X (sklearn's components, signs and mean) from two passes over row
    chunks: mean and scatter matrix (merged chunk by chunk, Chan et al.), then the projection."""
    n, G = X.shape
    _check_table((n, G), t, source)
    t = _merge_close_times(t, source)
    if 8 * G * G > COV_BYTES:
        raise ValueError(f"{source}: backed=True computes the PCA of X from a {G} x {G} covariance "
                         f"({8 * G * G / 1e9:.1f} GB for {G} genes), too large; pass embedding= (a precomputed "
                         "obsm embedding such as 'X_pca') or select fewer genes")
    bad, failed = np.zeros(n, dtype=bool), False
    count, mean, scatter = 0, np.zeros(G), np.zeros((G, G))
    for a, b in _chunks(n, G):
        x = _read_rows(X, a, b)
        ok = np.isfinite(x).all(axis=1)
        if not ok.all():
            bad[a:b] = ~ok
            failed = not drop_nonfinite
            x = x[ok]
        if failed or len(x) == 0:
            continue  # after a bad row without drop_nonfinite only the counts (for the error) are needed
        m = x.mean(axis=0)
        x -= m
        s = x.T @ x
        if count == 0:
            count, mean, scatter = len(x), m, s
        else:
            total = count + len(x)
            delta = m - mean
            mean = mean + delta * (len(x) / total)
            scatter += s + np.outer(delta, delta * (count * len(x) / total))
            count = total
    keep, dropped = _drop_rows(t, bad, drop_nonfinite, source)
    if keep is not None:
        t = t[keep]
    k = min(n_components, G, count)
    _, vectors = np.linalg.eigh(scatter)
    components = np.ascontiguousarray(vectors[:, ::-1][:, :k].T)
    # sklearn's sign convention (svd_flip with u_based_decision=False): each component's largest
    # |loading| is positive
    components *= np.sign(components[np.arange(k), np.abs(components).argmax(axis=1)])[:, None]
    z, at = np.empty((count, k)), 0
    for a, b in _chunks(n, G):
        x = _read_rows(X, a, b)
        if keep is not None:
            x = x[keep[a:b]]
        z[at:at + len(x)] = (x - mean) @ components.T
        at += len(x)
    return _finish(z, t, standardize, source, names, dropped, components, mean)


def _from_npz(path, time_key, n_components, standardize, drop_nonfinite):
    key = time_key or "sample_labels"
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an archive of named arrays")
        with f:
            keys = list(f.keys())
            pcs, labels = (f["pcs"], f[key]) if "pcs" in keys and key in keys else (None, None)
    except ValueError as exc:
        if "Object arrays" in str(exc):
            raise ValueError(f"{path}: its arrays must be numeric, not Python objects (object arrays)") from None
        raise ValueError(f"{path} is not a valid .npz file ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ValueError(f"{path} is not a valid .npz file ({exc})") from None
    if pcs is None:
        raise ValueError(f"{path}: a TrajectoryNet-style .npz needs arrays 'pcs' and {key!r}; it has {keys}")
    x = _as_float(pcs, f"{path}['pcs']")
    t = _numeric_times(labels, f"{path}[{key!r}]")
    if x.ndim != 2 or t.ndim != 1 or len(t) != len(x):
        raise ValueError(f"{path}: 'pcs' must be (n, k) with one label per row; got {x.shape} and {t.shape}")
    if n_components is not None:
        x = x[:, :n_components]
    return _build(x, t, None, standardize, drop_nonfinite, path, None)


def _from_csv(path, time_key, n_components, standardize, drop_nonfinite):
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            header = [h.strip() for h in next(csv.reader(fh), [])]
        if not header:
            raise ValueError(f"{path}: empty CSV (no header)")
        if "" in header:
            raise ValueError(f"{path}: header column {header.index('') + 1} has no name; every column needs one")
        key = time_key or "time"
        if key not in header:
            raise ValueError(f"time key {key!r} not found in the CSV header of {path}; columns: {header}")
        if header.count(key) > 1:
            raise ValueError(f"{path}: the time column {key!r} appears {header.count(key)} times in the header")
        if _duplicates(header):
            raise ValueError(f"{path}: duplicate column names {_duplicates(header)}")
        if len(header) < 2:
            raise ValueError(f"{path}: no feature columns besides {key!r}")
        table = _loadtxt(path, len(header))  # C parser: clean numeric files
        if table is None:  # missing values (empty, NA, nan) as "nan", still at C speed
            with open(path, encoding="utf-8-sig") as fh:
                text = fh.read() + "\n"
            for pattern, nan in _MISSING_FIELDS:
                text = pattern.sub(nan, text)
            table = _loadtxt(io.StringIO(text), len(header))
        if table is None:  # anything else: field by field, to name the problem
            table = _parse_csv_slowly(path, header)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; re-save it as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet)") from None
    except csv.Error as exc:  # e.g. a NUL byte
        raise ValueError(f"{path}: not a readable CSV ({exc})") from None
    ti = header.index(key)
    names = [h for i, h in enumerate(header) if i != ti]
    return _build(np.delete(table, ti, axis=1), table[:, ti], n_components, standardize, drop_nonfinite, path, names)


def _loadtxt(source, n_columns):
    """The CSV body as an (n, n_columns) float64 array, or None if np.loadtxt cannot read it that way."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data"
            table = np.loadtxt(source, delimiter=",", skiprows=1, ndmin=2, encoding="utf-8-sig", quotechar='"',
                               comments=None)
    except UnicodeDecodeError:
        raise
    except ValueError:
        return None
    return table if table.shape[1] == n_columns and len(table) else None


def _parse_csv_slowly(path, header):
    """The CSV body field by field: empty, NA and nan fields are NaN; anything else that is not a number
    or a row with the wrong number of fields is a ValueError naming the line (the header is line 1)."""
    rows, lines = [], []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        for row in reader:
            if not row:
                continue  # blank line
            if len(row) != len(header):
                raise ValueError(f"{path}, line {reader.line_num}: {len(row)} fields but the header has "
                                 f"{len(header)} columns")
            rows.append(row)
            lines.append(reader.line_num)
    if not rows:
        raise ValueError(f"{path}: the CSV has a header but no data rows")
    cells = np.char.strip(np.array(rows, dtype=str))
    cells = np.where(np.isin(np.char.lower(cells), MISSING), "nan", cells)
    try:
        return cells.astype(np.float64)
    except ValueError:
        for r, row in enumerate(cells):
            for c, value in enumerate(row):
                try:
                    float(value)
                except ValueError:
                    raise ValueError(f"{path}, line {lines[r]}, column {header[c]!r}: {str(value)!r} is not a number; "
                                     "every column must be numeric (empty, NA and nan are missing values)") from None
        raise


def _from_arrays(arrays, times, n_components, standardize, drop_nonfinite):
    times = list(times) if hasattr(times, "__iter__") and not isinstance(times, (str, bytes)) else [times]
    if not all(isinstance(v, numbers.Real) for v in times):
        raise ValueError(f"times must be a list of numbers, one per array; got {times[:5]!r}")
    times = np.array(times, dtype=np.float64)
    if not np.isfinite(times).all():
        raise ValueError(f"times must be finite; got {times.tolist()}")
    if len(times) != len(arrays):
        raise ValueError(f"times must have one entry per array: {len(arrays)} arrays, {len(times)} times")
    mats = []
    for i, a in enumerate(arrays):
        a = _as_float(a, f"array {i}")
        if a.ndim != 2:
            raise ValueError(f"array {i} must be 2-D (cells x features); got shape {a.shape}")
        if len(a) == 0:
            raise ValueError(f"timepoint {times[i]:g} (array {i}) has no cells")
        mats.append(a)
    if len({a.shape[1] for a in mats}) != 1:
        raise ValueError(f"all arrays must have the same number of features; got {[a.shape[1] for a in mats]}")
    x = np.concatenate(mats)
    t = np.concatenate([np.full(len(a), ti) for a, ti in zip(mats, times)])
    return _build(x, t, n_components, standardize, drop_nonfinite, "arrays", None)


# ----------------------------------------------------------------------------- common tail

def _merge_close_times(t, source):
    """Times equal up to float rounding (sorted neighbours within TIME_RTOL, chained) as one timepoint:
    the group's most frequent value (ties: the smallest), with a warning."""
    values, counts = np.unique(t, return_counts=True)
    close = np.diff(values) <= TIME_RTOL * np.maximum(np.abs(values[:-1]), np.abs(values[1:]))
    if not close.any():
        return t
    group = np.concatenate([[0], np.cumsum(~close)])
    kept, merged = np.empty(group[-1] + 1), []
    for g in range(len(kept)):
        v, c = values[group == g], counts[group == g]
        kept[g] = v[np.argmax(c)]
        if len(v) > 1:
            merged.append(f"{[float(u) for u in v]} -> {float(kept[g])!r}")
    warnings.warn(f"{source}: times equal up to float rounding are one timepoint: {'; '.join(merged)}", stacklevel=5)
    return kept[group[np.searchsorted(values, t)]]


def _check_table(shape, t, source):
    """The checks before any data are used: a non-empty (cells x features) shape, one finite time per cell."""
    if len(shape) != 2 or shape[1] == 0 or shape[0] == 0:
        raise ValueError(f"{source}: need a non-empty cells x features table; got shape {shape}")
    if t.ndim != 1 or len(t) != shape[0]:
        raise ValueError(f"{source}: need one time per cell; got {t.shape} times for {shape[0]} cells")
    if not np.isfinite(t).all():
        raise ValueError(f"{source}: {int((~np.isfinite(t)).sum())} cells have a non-finite time")


def _drop_rows(t, bad, drop_nonfinite, source):
    """Rows with NaN/Inf (``bad``): an error with counts per timepoint, or with ``drop_nonfinite`` dropped
    with a warning.  Returns (the rows kept as a boolean mask or None for all, {time: rows dropped})."""
    if not bad.any():
        return None, {}
    per_t = {float(v): int(c) for v, c in zip(*np.unique(t[bad], return_counts=True))}
    desc = ", ".join(f"t={k:g}: {v}" for k, v in per_t.items())
    if not drop_nonfinite:
        raise ValueError(f"{source}: {int(bad.sum())} rows contain NaN or Inf ({desc}); "
                         "pass drop_nonfinite=True to drop them")
    emptied = sorted(set(np.unique(t)) - set(np.unique(t[~bad])))
    if emptied:
        raise ValueError(f"{source}: timepoint(s) {[float(v) for v in emptied]} have no cells left "
                         "after dropping rows with NaN or Inf")
    warnings.warn(f"{source}: dropped {int(bad.sum())} rows with NaN or Inf ({desc})", stacklevel=5)
    return ~bad, per_t


def _finish(x, t, standardize, source, names, dropped, pca_components=None, pca_mean=None) -> Marginals:
    """Model-space rows ``x`` (after any PCA) z-scored with pooled mean and std and split by time."""
    if standardize:
        with np.errstate(over="ignore", invalid="ignore"):
            mean, std = x.mean(axis=0), x.std(axis=0)
        std = np.where(std > 0, std, 1.0)
    else:
        mean, std = np.zeros(x.shape[1]), np.ones(x.shape[1])
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise ValueError(f"{source}: feature values too large to standardize (overflow); rescale them")
    transform = Transform(mean, std, pca_components, pca_mean, names)
    z = (x - mean) / std
    times = np.unique(t)
    data = [z[t == ti] for ti in times]
    return Marginals(data, times, transform, source, dropped)


def _build(x, t, n_components, standardize, drop_nonfinite, source, names, force_pca=False) -> Marginals:
    _check_table(x.shape, t, source)
    t = _merge_close_times(t, source)
    keep, dropped = _drop_rows(t, ~np.isfinite(x).all(axis=1), drop_nonfinite, source)
    if keep is not None:
        x, t = x[keep], t[keep]
    pca_components = pca_mean = None
    if n_components is not None and (force_pca or x.shape[1] > n_components):
        from sklearn.decomposition import PCA

        k = min(n_components, x.shape[1], len(x))
        pca = PCA(n_components=k, random_state=0).fit(x)
        pca_components, pca_mean = pca.components_, pca.mean_
        x = (x - pca_mean) @ pca_components.T
    return _finish(x, t, standardize, source, names, dropped, pca_components, pca_mean)
