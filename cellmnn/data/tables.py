"""Raw tables of cells: numbers, times and rows with NaN/Inf, checked before any data are used.

What every reader of ``cellmnn.data`` (and ``annotate``) shares: numeric conversion with errors that
name the source, the time column and its reading, times equal up to float rounding, and rows
with non-finite values.
"""
from __future__ import annotations

import numbers
from collections import Counter

import numpy as np

from ..checks import warn

DEFAULT_TIME_KEYS = ("day", "time", "timepoint", "sample_labels")
TIME_RTOL = 1e-9  # times closer than this (relative) are one timepoint


def duplicates(names) -> list:
    """The names that occur more than once."""
    return [n for n, c in Counter(names).items() if c > 1]


def as_float(a, what):
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


def numeric_times(values, what):
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


def find_time_key(time_key, columns) -> str:
    """The obs column holding the times: ``time_key``, else the first of DEFAULT_TIME_KEYS present."""
    keys = [time_key] if time_key is not None else [k for k in DEFAULT_TIME_KEYS if k in columns]
    if not keys or keys[0] not in columns:
        raise ValueError(f"time key {time_key!r} not found in obs; available columns: {list(columns)}"
                         if time_key is not None else
                         f"no time column found in obs (tried {list(DEFAULT_TIME_KEYS)}); pass time_key= "
                         f"one of {list(columns)}")
    return keys[0]


def obs_times(col, name, key):
    """An obs column (a pandas Series) as float64 times; categoricals and pandas strings as plain objects,
    missing as NaN."""
    return numeric_times(col.to_numpy(dtype=object, na_value=np.nan), f"{name}: obs[{key!r}]")


def no_embedding(embedding, available):
    """The error for an obsm key that is not there."""
    return ValueError(f"embedding {embedding!r} not found in obsm; available: {list(available)}")


def duplicate_var_names(name, names):
    """The error for an AnnData whose var_names repeat."""
    return ValueError(f"{name}: duplicate var_names {duplicates(names)[:10]}; call adata.var_names_make_unique() "
                      "or pass embedding=")


def merge_close_times(t, source):
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
    warn(f"{source}: times equal up to float rounding are one timepoint: {'; '.join(merged)}")
    return kept[group[np.searchsorted(values, t)]]


def check_table(shape, t, source):
    """The checks before any data are used: a non-empty (cells x features) shape, one finite time per cell."""
    if len(shape) != 2 or shape[1] == 0 or shape[0] == 0:
        raise ValueError(f"{source}: need a non-empty cells x features table; got shape {shape}")
    if t.ndim != 1 or len(t) != shape[0]:
        raise ValueError(f"{source}: need one time per cell; got {t.shape} times for {shape[0]} cells")
    if not np.isfinite(t).all():
        raise ValueError(f"{source}: {int((~np.isfinite(t)).sum())} cells have a non-finite time")


def drop_rows(t, bad, drop_nonfinite, source):
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
    warn(f"{source}: dropped {int(bad.sum())} rows with NaN or Inf ({desc})")
    return ~bad, per_t
