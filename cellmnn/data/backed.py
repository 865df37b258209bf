"""Backed .h5ad reading: X or an obsm embedding read from the file in row chunks (h5py, read-only).

``X`` and wide embeddings are never whole in memory; without an embedding, the PCA of ``X`` is exact,
from a chunked mean and gene x gene covariance and a second chunked projection pass, and equals
the in-memory loader's (scikit-learn's sign convention).
"""
from __future__ import annotations

import contextlib

import numpy as np

from .marginals import build, finish
from .tables import (
    as_float,
    check_table,
    drop_rows,
    duplicate_var_names,
    duplicates,
    find_time_key,
    merge_close_times,
    no_embedding,
    obs_times,
)

CHUNK_ROWS = 65536  # rows per read ...
CHUNK_BYTES = 1 << 26  # ... and at most this many bytes per chunk as float64 (64 MiB), for wide X
COV_BYTES = 2 * 10**9  # PCA of X: the largest (genes x genes) float64 covariance accepted


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
def open_h5ad(path):
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


def read_backed(f, path, time_key, embedding, n_components, standardize, drop_nonfinite):
    """load_marginals(path, ..., backed=True) from the open file ``f``: X or obsm[embedding] read in row chunks."""
    import h5py
    import pandas as pd
    from anndata.io import read_elem

    obs = f.get("obs")
    if not isinstance(obs, h5py.Group) or obs.attrs.get("encoding-type") != "dataframe" or "_index" not in obs.attrs:
        raise ValueError(f"cannot read {path} with backed=True: its obs is not in the anndata >= 0.8 layout; "
                         "pass backed=False, or re-save it with a current anndata")
    columns = [str(c) for c in np.atleast_1d(obs.attrs.get("column-order", []))]
    key = find_time_key(time_key, columns)
    t = obs_times(pd.Series(read_elem(obs[key])), path, key)
    obsm = f.get("obsm")
    obsm_keys = list(obsm.keys()) if isinstance(obsm, h5py.Group) else []
    if embedding is not None:
        if embedding not in obsm_keys:
            raise no_embedding(embedding, obsm_keys)
        elem, what = obsm[embedding], f"{path}: obsm[{embedding!r}]"
        if isinstance(elem, h5py.Dataset) and elem.ndim == 2 and elem.dtype.kind in "biuf":
            n, k = elem.shape[0], elem.shape[1] if n_components is None else min(n_components, elem.shape[1])
            x = np.empty((n, k))
            for a, b in _chunks(n, k) if k else []:
                x[a:b] = _read_rows(elem, a, b, k)
        else:  # a data frame, a non-numeric or 1-D array, sparse: as the in-memory reader does (and refuses)
            x = as_float(read_elem(elem), what)
            if x.ndim == 2 and n_components is not None:
                x = x[:, :n_components]
        return build(x, t, None, standardize, drop_nonfinite, f"{path} obsm[{embedding!r}]", None)
    X = f.get("X")
    if X is None:
        raise ValueError(f"{path} has no X; pass embedding= one of {obsm_keys}")
    var = f.get("var")
    if not isinstance(var, h5py.Group) or "_index" not in var.attrs:
        raise ValueError(f"cannot read {path} with backed=True: its var is not in the anndata >= 0.8 layout; "
                         "pass backed=False, or re-save it with a current anndata")
    names = [str(v) for v in read_elem(var[var.attrs["_index"]])]
    if duplicates(names):
        raise duplicate_var_names(path, names)
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
        return build(x, t, None, standardize, drop_nonfinite, source, names, force_pca=True)
    return _backed_pca(X, t, n_components, standardize, drop_nonfinite, source, names)


def _backed_pca(X, t, n_components, standardize, drop_nonfinite, source, names):
    """The in-memory loader's PCA of X (sklearn's components, signs and mean) from two passes over row
    chunks: mean and scatter matrix (merged chunk by chunk, Chan et al.), then the projection."""
    n, G = X.shape
    check_table((n, G), t, source)
    t = merge_close_times(t, source)
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
    keep, dropped = drop_rows(t, bad, drop_nonfinite, source)
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
    return finish(z, t, standardize, source, names, dropped, components, mean)
