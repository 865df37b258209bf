"""``load_marginals``: a time course read from AnnData/.h5ad, TrajectoryNet .npz, CSV or arrays."""
from __future__ import annotations

import csv
import io
import numbers
import os
import re
import warnings
import zipfile
import zlib
from importlib import resources

import numpy as np

from .backed import open_h5ad, read_backed
from .marginals import Marginals, build
from .tables import as_float, duplicate_var_names, duplicates, find_time_key, no_embedding, numeric_times, obs_times

MISSING = ("", "na", "nan")  # CSV fields read as NaN (compared lower-cased, stripped)
_MISSING_FIELDS = ((re.compile(r",[ \t]*(?:nan?)?[ \t]*(?=[,\n])", re.I), ",nan"),  # 2nd.. field
                   (re.compile(r"^[ \t]*(?:nan?)?[ \t]*,", re.I | re.M), "nan,"))  # first field


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
    n_components = _check_load_args(source, time_key, embedding, n_components, standardize, drop_nonfinite,
                                    backed)
    if source is None:
        source = resources.files("cellmnn.data") / "datasets" / "emt_a549_3d.csv"
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
        return _from_path(os.fspath(source), time_key, embedding, n_components, standardize, drop_nonfinite, backed)
    try:
        import anndata

        if isinstance(source, anndata.AnnData):
            return _from_anndata(source, time_key, embedding, n_components, standardize, drop_nonfinite, "AnnData")
    except ImportError:  # pragma: no cover - anndata is a dependency
        pass
    raise TypeError(f"source must be an AnnData, a .h5ad/.npz/.csv path, a list of arrays or None; "
                    f"got {type(source).__name__}")


def _check_load_args(source, time_key, embedding, n_components, standardize, drop_nonfinite, backed):
    """The checks of ``load_marginals`` that need no data; returns ``n_components`` as an int or None."""
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
    return n_components


def _from_path(path, time_key, embedding, n_components, standardize, drop_nonfinite, backed) -> Marginals:
    """A .h5ad (in memory or backed), .npz or .csv file, by its extension."""
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
        with open_h5ad(path) as f:
            m = read_backed(f, path, time_key, embedding, n_components, standardize, drop_nonfinite)
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


# ----------------------------------------------------------------------------- readers

def _from_anndata(adata, time_key, embedding, n_components, standardize, drop_nonfinite, name):
    key = find_time_key(time_key, adata.obs.columns)
    t = obs_times(adata.obs[key], name, key)
    if embedding is not None:
        if embedding not in adata.obsm:
            raise no_embedding(embedding, adata.obsm.keys())
        x = as_float(adata.obsm[embedding], f"{name}: obsm[{embedding!r}]")
        if x.ndim == 2 and n_components is not None:
            x = x[:, :n_components]
        return build(x, t, None, standardize, drop_nonfinite, f"{name} obsm[{embedding!r}]", None)
    if adata.X is None:
        raise ValueError(f"{name} has no X; pass embedding= one of {list(adata.obsm.keys())}")
    names = [str(v) for v in adata.var_names]
    if duplicates(names):
        raise duplicate_var_names(name, names)
    X = adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X
    return build(as_float(X, f"{name}: X"), t, n_components, standardize, drop_nonfinite,
                  f"{name} X (PCA)", names, force_pca=True)


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
    x = as_float(pcs, f"{path}['pcs']")
    t = numeric_times(labels, f"{path}[{key!r}]")
    if x.ndim != 2 or t.ndim != 1 or len(t) != len(x):
        raise ValueError(f"{path}: 'pcs' must be (n, k) with one label per row; got {x.shape} and {t.shape}")
    if n_components is not None:
        x = x[:, :n_components]
    return build(x, t, None, standardize, drop_nonfinite, path, None)


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
        if duplicates(header):
            raise ValueError(f"{path}: duplicate column names {duplicates(header)}")
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
    return build(np.delete(table, ti, axis=1), table[:, ti], n_components, standardize, drop_nonfinite, path, names)


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
        a = as_float(a, f"array {i}")
        if a.ndim != 2:
            raise ValueError(f"array {i} must be 2-D (cells x features); got shape {a.shape}")
        if len(a) == 0:
            raise ValueError(f"timepoint {times[i]:g} (array {i}) has no cells")
        mats.append(a)
    if len({a.shape[1] for a in mats}) != 1:
        raise ValueError(f"all arrays must have the same number of features; got {[a.shape[1] for a in mats]}")
    x = np.concatenate(mats)
    t = np.concatenate([np.full(len(a), ti) for a, ti in zip(mats, times)])
    return build(x, t, n_components, standardize, drop_nonfinite, "arrays", None)
