"""Cells of an AnnData in a fitted model's space: the one reading of ``obs[time_key]`` and of ``X``
or an ``obsm`` embedding (as ``load_marginals`` reads them) that ``annotate`` and the fate read-outs
share.  ``plan_cells`` checks everything that needs no reading of the cells; ``read_cells`` reads
them and maps them with the model's transform.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..data.marginals import Marginals, Transform
from ..data.tables import DEFAULT_TIME_KEYS, as_float, numeric_times
from ..model.network import CellMNN
from .interactions import model_transform

CHUNK = 65536  # cells per model call, for every read-out that runs a model over an AnnData
_EMBEDDING_SOURCE = re.compile(r"obsm\[(['\"])(.+)\1\]$")


@dataclass(frozen=True)
class CellPlan:
    """Where a model's cells are in an AnnData: the model's ``transform`` and data ``record``, the
    obs ``time_key``, the obsm ``embedding`` (None: ``X``) and the ``columns`` of the model's
    features there, in the model's order."""
    transform: Transform
    record: dict
    time_key: str
    embedding: str | None
    columns: np.ndarray


def plan_cells(adata, model, marginals=None, time_key=None, embedding=None) -> CellPlan:
    """Check ``adata``, ``model`` (a fitted ``CellMNN``), ``marginals`` (optional, the ones the
    model was fitted on), ``time_key`` and ``embedding`` (as in ``load_marginals``; the embedding
    defaults to the one the model was fitted on when ``adata`` has it) and find the model's
    features; an error naming the argument otherwise.  Reads no cells."""
    import anndata

    if not isinstance(adata, anndata.AnnData):
        raise TypeError(f"adata must be an AnnData, got {type(adata).__name__}")
    if not isinstance(model, CellMNN):
        raise TypeError(f"model must be a fitted CellMNN, got {type(model).__name__}")
    if marginals is not None and not isinstance(marginals, Marginals):
        raise TypeError(f"marginals must be cellmnn.Marginals or None, got {type(marginals).__name__}")
    for name, value in (("time_key", time_key), ("embedding", embedding)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a string or None, got {type(value).__name__} {value!r}")
    if adata.n_obs == 0:
        raise ValueError("adata has no cells")
    tr, record = model_space(model, marginals)
    key = time_column(adata, time_key)
    embedding = default_embedding(adata, embedding, tr, record)
    return CellPlan(tr, record, key, embedding, feature_columns(adata, embedding, tr))


def read_cells(adata, plan: CellPlan):
    """(t, z): every cell's time (n,) float64 and its position in model space (n, D) float64;
    an error naming cells with a non-finite time or feature."""
    t, x = read_raw(adata, plan.time_key, plan.embedding, plan.columns)
    return t, plan.transform.to_model(x)


def members(model) -> list:
    """A model or an ensemble (a non-empty list of models with one transform) as a list."""
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models:
        raise ValueError("model: an empty list; give a fitted CellMNN or a list of them (an ensemble)")
    for k, m in enumerate(models):
        if not isinstance(m, CellMNN):
            where = f"model[{k}]" if isinstance(model, (list, tuple)) else "model"
            raise TypeError(f"{where} must be a fitted CellMNN, got {type(m).__name__}")
    first = model_space(models[0], None)[0] if len(models) > 1 else None
    for k, m in enumerate(models[1:], start=1):
        if getattr(m, "dim", None) != models[0].dim or not model_space(m, None)[0].same_as(first):
            raise ValueError(f"model[{k}]: its data transform differs from model[0]'s; an ensemble needs models "
                             "fitted on one transform (one dataset, one PCA)")
    return models


def check_dataset(model, dataset) -> None:
    """``dataset`` is required (an index) for a model with a dataset embedding, and refused otherwise."""
    n_sets = getattr(model, "n_datasets", 0)
    if n_sets and (isinstance(dataset, bool) or not isinstance(dataset, (int, np.integer))
                   or not 0 <= dataset < n_sets):
        raise ValueError(f"dataset: the model was trained on {n_sets} datasets with a dataset embedding; pass "
                         f"dataset= the index (0..{n_sets - 1}) of the one these cells belong to; got {dataset!r}")
    if not n_sets and dataset is not None:
        raise ValueError("dataset= is only for models trained jointly with a dataset embedding")


def model_space(model, marginals):
    """The transform that maps raw features to the model's space, and the model's data record."""
    record = getattr(model, "marginals_info", None) or {}
    own = model_transform(model)
    if marginals is not None:
        if own is not None and not own.same_as(marginals.transform):
            raise ValueError("marginals: their transform (features, PCA or z-score) is not the one the model was "
                             "fitted with; pass the marginals the model was fitted on, or none")
        if marginals.dim != model.dim:
            raise ValueError(f"marginals have {marginals.dim} dimensions; the model has {model.dim}")
        own = marginals.transform
    if own is None:
        raise ValueError("model carries no data transform (it was not made by cellmnn.fit or load_model); pass "
                         "marginals= the Marginals it was fitted on")
    if len(own.mean) != model.dim:
        raise ValueError(f"model: its transform maps to {len(own.mean)} dimensions but the model has {model.dim}")
    if marginals is not None and not record:
        record = {"times": [float(v) for v in marginals.times], "source": marginals.source}
    return own, record


def time_column(adata, time_key) -> str:
    """``time_key`` checked against ``adata.obs``, or the first of ``DEFAULT_TIME_KEYS`` there."""
    if time_key is not None:
        if time_key not in adata.obs.columns:
            raise ValueError(f"time_key {time_key!r} not found in adata.obs; available columns: "
                             f"{list(adata.obs.columns)}")
        return time_key
    found = [k for k in DEFAULT_TIME_KEYS if k in adata.obs.columns]
    if not found:
        raise ValueError(f"no time column found in adata.obs (tried {list(DEFAULT_TIME_KEYS)}); pass time_key= "
                         f"one of {list(adata.obs.columns)}")
    return found[0]


def default_embedding(adata, embedding, tr, record):
    """``embedding`` checked, or the obsm key the model was fitted on (from its record) when ``adata``
    has it; None for a model fitted on named features (read from ``X``)."""
    if embedding is None and not tr.feature_names:
        m = _EMBEDDING_SOURCE.search(str(record.get("source", "")))
        if m and m.group(2) in adata.obsm:
            embedding = m.group(2)
    if embedding is not None:
        if tr.feature_names:
            raise ValueError(f"embedding {embedding!r}: the model was fitted on named features "
                             f"({some_names(tr.feature_names)}), which are read from adata.X; leave embedding=None")
        if embedding not in adata.obsm:
            raise ValueError(f"embedding {embedding!r} not found in adata.obsm; available: {list(adata.obsm.keys())}")
    return embedding


def feature_columns(adata, embedding, tr):
    """The columns of X or of obsm[embedding] that hold the model's features, in its order (checked by
    ``Transform.align`` on a row of column indices: by name when both sides have names, else by position)."""
    F = tr.n_features
    if embedding is not None:
        shape = np.shape(adata.obsm[embedding])
        if len(shape) != 2:
            raise ValueError(f"adata.obsm[{embedding!r}] must be 2-D (cells x features); got shape {shape}")
        if tr.pca_components is None and shape[1] >= F:  # as the loader: the first n_components columns
            return np.arange(F)
        return tr.align(np.arange(shape[1])[None, :], None, f"adata.obsm[{embedding!r}]")[0].astype(np.int64)
    if adata.X is None:
        raise ValueError(f"adata has no X; pass embedding= one of {list(adata.obsm.keys())}")
    names = [str(v) for v in adata.var_names]
    try:
        cols = tr.align(np.arange(len(names))[None, :], names, "adata.X")
    except ValueError as exc:
        hint = f"; or pass embedding= one of {list(adata.obsm.keys())}" if adata.obsm and not tr.feature_names else ""
        raise ValueError(f"{exc}{hint}") from None
    return cols[0].astype(np.int64)


def read_features(adata, embedding, cols) -> np.ndarray:
    """Columns ``cols`` of ``obsm[embedding]`` (or of ``X``, dense or sparse) as float64 (n, len(cols))."""
    if embedding is not None:
        return as_float(np.asarray(adata.obsm[embedding])[:, cols], f"adata.obsm[{embedding!r}]")
    X = adata.X
    X = X[:, cols].toarray() if hasattr(X, "toarray") else np.asarray(X)[:, cols]
    return as_float(X, "adata.X")


def read_raw(adata, key, embedding, cols):
    """Every cell's time and model features (raw), finite, or an error naming cells."""
    t = numeric_times(adata.obs[key].to_numpy(dtype=object, na_value=np.nan), f"adata.obs[{key!r}]")
    bad = np.flatnonzero(~np.isfinite(t))
    if len(bad):
        raise ValueError(f"adata.obs[{key!r}]: {len(bad)} cells have a non-finite time (NaN or Inf), e.g. "
                         f"{some_names(adata.obs_names[bad])}")
    x = read_features(adata, embedding, cols)
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if len(bad):
        where = "X" if embedding is None else f"obsm[{embedding!r}]"
        raise ValueError(f"adata.{where}: {len(bad)} cells have NaN or Inf in the model's features, e.g. "
                         f"{some_names(adata.obs_names[bad])}")
    return t, x


def some_names(values, k=5) -> str:
    """The first ``k`` of ``values`` for an error message, with " ..." when there are more."""
    values = [str(v) for v in values]
    return f"{values[:k]}{' ...' if len(values) > k else ''}"
