"""Argument checks that every layer shares; each error names the argument and the problem.

Every function returns the normalised value (a Python int, float, bool or float64 array) or raises
ValueError/TypeError before any work starts.
"""
from __future__ import annotations

import math
import numbers
import os
import sys
import warnings

import numpy as np
import torch

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def number(name: str, v, low=None, high=None, low_open: bool = False, high_open: bool = True) -> float:
    """A finite real ``v`` within the stated bounds (None: unbounded), as a float."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number, got {v!r}")
    v = float(v)
    bounds = ("(" if low_open or low is None else "[") + f"{'-inf' if low is None else low}, " + \
        f"{'inf' if high is None else high}" + (")" if high_open or high is None else "]")
    if not math.isfinite(v) or (low is not None and (v < low or low_open and v == low)) or \
            (high is not None and (v > high or high_open and v == high)):
        where = "" if low is None and high is None else f" in {bounds}"
        raise ValueError(f"{name} must be a finite number{where}, got {v!r}")
    return v


def nonnegative(name: str, v) -> float:
    """A finite real >= 0, as a float."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return v


def positive_int(name: str, v) -> int:
    """An integer >= 1 (ints, numpy ints and integral floats), as an int."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and v >= 1:
        return int(v)
    if isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer() and v >= 1:
        return int(v)
    raise ValueError(f"{name} must be a positive integer, got {v!r}")


def count(name: str, v, low: int = 1) -> int:
    """An integer >= ``low`` (ints, numpy ints, integral floats), as an int."""
    if isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    if isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
        v = int(v)
    if not isinstance(v, numbers.Integral) or v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    return int(v)


def seed(v, name: str = "seed") -> int:
    """A seed: an integer in [0, 2**63)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral) or not 0 <= v < 2 ** 63:
        raise ValueError(f"{name} must be an integer in [0, 2**63), got {v!r}")
    return int(v)


def flag(name: str, v) -> bool:
    """True or False (numpy bools too), as a bool."""
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(v).__name__} {v!r}")
    return bool(v)


def points(name: str, x) -> np.ndarray:
    """A non-empty, finite (n, D) point cloud, as float64."""
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


def point_pair(x, y) -> tuple:
    """Two point clouds ``x`` and ``y`` (``points``) of one dimension."""
    x, y = points("x", x), points("y", y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension; got {x.shape[1]} and {y.shape[1]}")
    return x, y


def warn(message: str) -> None:
    """A UserWarning reported at the caller's own line: the first frame outside cellmnn (however
    deep inside the package the warning arises)."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, stacklevel=level)


def device(value, name: str = "device") -> torch.device:
    """"auto" (CUDA when available), or a torch device string/object that exists here: an unknown
    device, or CUDA where there is none, is a ValueError naming ``name`` (before torch would fail)."""
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name} must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {value!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {value!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}={value!r}, but CUDA is not available here; use 'cpu' or 'auto'")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{name}={value!r}, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev
