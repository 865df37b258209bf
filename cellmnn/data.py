"""Time-course snapshot data as per-timepoint marginals, with the transform that produced them."""
from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

DEFAULT_TIME_KEYS = ("day", "time", "timepoint", "sample_labels")


@dataclass
class Transform:
    """Raw features -> model space:  z = ((x - pca_mean) @ pca_components.T - mean) / std.

    ``pca_components`` (D, n_features) and ``pca_mean`` are None when no PCA was applied; ``mean``
    and ``std`` are zeros and ones when the data were not standardised.
    """
    mean: np.ndarray
    std: np.ndarray
    pca_components: np.ndarray | None = None
    pca_mean: np.ndarray | None = None
    feature_names: list | None = None

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
        arr = lambda a: None if a is None else np.asarray(a, dtype=np.float64)  # noqa: E731
        return cls(arr(d["mean"]), arr(d["std"]), arr(d.get("pca_components")), arr(d.get("pca_mean")),
                   d.get("feature_names"))


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
                   times=None, drop_nonfinite=False) -> Marginals:
    """Read a time course into per-timepoint marginals.

    ``source`` is one of: an AnnData object or ``.h5ad`` path (times from ``obs[time_key]``;
    features from ``obsm[embedding]``, e.g. "X_pca", or else a PCA of ``X`` with
    ``n_components`` components); a TrajectoryNet-style ``.npz`` (``pcs``, ``sample_labels``);
    a CSV with a time column and feature columns; a list of (n_i, F) arrays with ``times``; or
    None for the embedded A549 EMT time course.  Feature tables (CSV, arrays) with more than
    ``n_components`` columns are reduced by PCA; precomputed embeddings (obsm, npz ``pcs``) keep
    their first ``n_components`` columns.  ``n_components=None`` keeps every column.  With
    ``standardize`` the model space is z-scored with mean and std pooled over all timepoints.
    Rows with NaN/Inf are an error, reported with counts, unless ``drop_nonfinite``.
    """
    if n_components is not None and (isinstance(n_components, bool) or int(n_components) != n_components
                                     or n_components < 1):
        raise ValueError(f"n_components must be a positive integer or None, got {n_components!r}")
    if source is None:
        source = resources.files("cellmnn") / "datasets" / "emt_a549_3d.csv"
        with resources.as_file(source) as path:
            return load_marginals(str(path), time_key, embedding, n_components, standardize, times, drop_nonfinite)
    if isinstance(source, (list, tuple)):
        if times is None:
            raise ValueError("times is required when source is a list of arrays (one time per array)")
        return _from_arrays(source, times, n_components, standardize, drop_nonfinite)
    if times is not None:
        raise ValueError("times is only used with a list of arrays; other sources carry their own times")
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"source file not found: {path}")
        ext = os.path.splitext(path)[1].lower()
        if ext == ".h5ad":
            import anndata

            return _from_anndata(anndata.read_h5ad(path), time_key, embedding, n_components, standardize,
                                 drop_nonfinite, path)
        if ext == ".npz":
            return _from_npz(path, time_key, n_components, standardize, drop_nonfinite)
        if ext == ".csv":
            return _from_csv(path, time_key, n_components, standardize, drop_nonfinite)
        raise ValueError(f"cannot read {path!r}: expected a .h5ad, .npz or .csv file")
    try:
        import anndata

        if isinstance(source, anndata.AnnData):
            return _from_anndata(source, time_key, embedding, n_components, standardize, drop_nonfinite, "AnnData")
    except ImportError:  # pragma: no cover - anndata is a dependency
        pass
    raise TypeError(f"source must be an AnnData, a .h5ad/.npz/.csv path, a list of arrays or None; "
                    f"got {type(source).__name__}")


# ----------------------------------------------------------------------------- readers

def _numeric_times(values, what):
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be numeric (times as numbers); got values such as "
                         f"{list(values[:3])}") from None


def _from_anndata(adata, time_key, embedding, n_components, standardize, drop_nonfinite, name):
    keys = [time_key] if time_key is not None else [k for k in DEFAULT_TIME_KEYS if k in adata.obs]
    if not keys or keys[0] not in adata.obs:
        raise ValueError(f"time key {time_key!r} not found in obs; available columns: {list(adata.obs.columns)}"
                         if time_key is not None else
                         f"no time column found in obs (tried {list(DEFAULT_TIME_KEYS)}); pass time_key= "
                         f"one of {list(adata.obs.columns)}")
    t = _numeric_times(np.asarray(adata.obs[keys[0]]), f"obs[{keys[0]!r}]")
    if embedding is not None:
        if embedding not in adata.obsm:
            raise ValueError(f"embedding {embedding!r} not found in obsm; available: {list(adata.obsm.keys())}")
        x = np.asarray(adata.obsm[embedding], dtype=np.float64)
        if n_components is not None:
            x = x[:, :n_components]
        return _build(x, t, None, standardize, drop_nonfinite, f"{name} obsm[{embedding!r}]", None)
    X = adata.X
    if hasattr(X, "toarray"):
        X = X.toarray()
    names = [str(v) for v in adata.var_names]
    return _build(np.asarray(X, dtype=np.float64), t, n_components, standardize, drop_nonfinite,
                  f"{name} X (PCA)", names, force_pca=True)


def _from_npz(path, time_key, n_components, standardize, drop_nonfinite):
    with np.load(path, allow_pickle=False) as f:
        if "pcs" not in f or (time_key or "sample_labels") not in f:
            raise ValueError(f"{path}: a TrajectoryNet-style .npz needs arrays 'pcs' and "
                             f"{time_key or 'sample_labels'!r}; it has {list(f.keys())}")
        x = np.asarray(f["pcs"], dtype=np.float64)
        t = _numeric_times(f[time_key or "sample_labels"], f"{path}[{time_key or 'sample_labels'!r}]")
    if x.ndim != 2 or len(t) != len(x):
        raise ValueError(f"{path}: 'pcs' must be (n, k) with one label per row; got {x.shape} and {t.shape}")
    if n_components is not None:
        x = x[:, :n_components]
    return _build(x, t, None, standardize, drop_nonfinite, path, None)


def _from_csv(path, time_key, n_components, standardize, drop_nonfinite):
    with open(path, newline="") as fh:
        header = next(csv.reader(fh), None)
    if not header:
        raise ValueError(f"{path}: empty CSV")
    header = [h.strip() for h in header]
    key = time_key or "time"
    if key not in header:
        raise ValueError(f"time key {key!r} not found in the CSV header of {path}; columns: {header}")
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    except ValueError as exc:
        raise ValueError(f"{path}: every column must be numeric ({exc})") from None
    if table.shape[1] != len(header):
        raise ValueError(f"{path}: {table.shape[1]} columns of data but {len(header)} names in the header")
    ti = header.index(key)
    names = [h for i, h in enumerate(header) if i != ti]
    if not names:
        raise ValueError(f"{path}: no feature columns besides {key!r}")
    x = np.delete(table, ti, axis=1)
    return _build(x, table[:, ti], n_components, standardize, drop_nonfinite, path, names)


def _from_arrays(arrays, times, n_components, standardize, drop_nonfinite):
    times = _numeric_times(list(times), "times")
    if len(times) != len(arrays):
        raise ValueError(f"times must have one entry per array: {len(arrays)} arrays, {len(times)} times")
    mats = []
    for i, a in enumerate(arrays):
        a = np.asarray(a, dtype=np.float64)
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

def _build(x, t, n_components, standardize, drop_nonfinite, source, names, force_pca=False) -> Marginals:
    if x.ndim != 2 or x.shape[1] == 0 or len(x) == 0:
        raise ValueError(f"{source}: need a non-empty cells x features table; got shape {x.shape}")
    if not np.isfinite(t).all():
        raise ValueError(f"{source}: {int((~np.isfinite(t)).sum())} cells have a non-finite time")
    bad = ~np.isfinite(x).all(axis=1)
    dropped = {}
    if bad.any():
        per_t = {float(v): int(c) for v, c in zip(*np.unique(t[bad], return_counts=True))}
        desc = ", ".join(f"t={k:g}: {v}" for k, v in per_t.items())
        if not drop_nonfinite:
            raise ValueError(f"{source}: {int(bad.sum())} rows contain NaN or Inf ({desc}); "
                             "pass drop_nonfinite=True to drop them")
        emptied = sorted(set(np.unique(t)) - set(np.unique(t[~bad])))
        if emptied:
            raise ValueError(f"{source}: timepoint(s) {[float(v) for v in emptied]} have no cells left "
                             "after dropping rows with NaN or Inf")
        warnings.warn(f"{source}: dropped {int(bad.sum())} rows with NaN or Inf ({desc})", stacklevel=3)
        x, t, dropped = x[~bad], t[~bad], per_t
    pca_components = pca_mean = None
    if n_components is not None and (force_pca or x.shape[1] > n_components):
        from sklearn.decomposition import PCA

        k = min(n_components, x.shape[1], len(x))
        pca = PCA(n_components=k, random_state=0).fit(x)
        pca_components, pca_mean = pca.components_, pca.mean_
        x = (x - pca_mean) @ pca_components.T
    if standardize:
        mean, std = x.mean(axis=0), x.std(axis=0)
        std = np.where(std > 0, std, 1.0)
    else:
        mean, std = np.zeros(x.shape[1]), np.ones(x.shape[1])
    transform = Transform(mean, std, pca_components, pca_mean, names)
    z = (x - mean) / std
    times = np.unique(t)
    data = [z[t == ti] for ti in times]
    return Marginals(data, times, transform, source, dropped)
