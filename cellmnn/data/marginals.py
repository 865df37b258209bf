"""Per-timepoint marginals in model space, and the transform from raw features that made them."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..checks import warn
from .tables import as_float, check_table, drop_rows, duplicates, merge_close_times


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
            if duplicates(names):
                raise ValueError(f"transform feature_names has duplicates: {duplicates(names)[:10]}")
            self.feature_names = list(names)

    @property
    def n_features(self) -> int:
        """F, the number of raw input features."""
        return len(self.mean) if self.pca_components is None else self.pca_components.shape[1]

    def align(self, x, names=None, what="the data") -> np.ndarray:
        """``x`` (n, k) raw features as an (n, F) float64 array in this transform's feature order:
        matched by name when both sides have names (extra columns unused), else by position."""
        x = as_float(x, what)
        if x.ndim != 2:
            raise ValueError(f"{what} must be a 2-D (cells x features) table; got shape {x.shape}")
        F = self.n_features
        if self.feature_names and names is not None:
            names = [str(n) for n in names]
            if len(names) != x.shape[1]:
                raise ValueError(f"{what}: {len(names)} feature names for {x.shape[1]} columns")
            if duplicates(names):
                raise ValueError(f"{what} has duplicate feature names: {duplicates(names)[:10]}")
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
        """Raw features (n, F) -> model space (n, D), float64."""
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
        """The transform as plain lists (JSON-ready); ``from_dict`` reads it back."""
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
        """D, the model-space dimension."""
        return self.data[0].shape[1]

    @property
    def sizes(self) -> list:
        """Cells per timepoint."""
        return [len(d) for d in self.data]

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        times = ", ".join(f"{t:g}" for t in self.times)
        return (f"Marginals({len(self)} timepoints at t = [{times}], sizes {self.sizes}, D = {self.dim}"
                f"{', from ' + self.source if self.source else ''})")


def check_marginals(m, what: str = "marginals") -> Marginals:
    """``m`` is a usable ``Marginals``: one non-empty, finite (cells x D) array per time, one D for
    all, ascending finite times; otherwise an error naming ``what`` and the timepoint."""
    if not isinstance(m, Marginals):
        hint = " (for arrays, pass load_marginals(arrays, times=...))" if isinstance(m, (list, tuple, np.ndarray)) \
            else ""
        raise TypeError(f"{what} must be a Marginals from cellmnn.load_marginals(...) or load_joint, got "
                        f"{type(m).__name__}{hint}")
    times = np.asarray(m.times, dtype=np.float64)
    if len(m.data) == 0 or times.ndim != 1 or len(times) != len(m.data):
        raise ValueError(f"{what}: need one array of cells per time; got {len(m.data)} arrays and {times.size} times")
    if not np.isfinite(times).all() or (np.diff(times) <= 0).any():
        raise ValueError(f"{what}: times must be finite and strictly ascending; got {times.tolist()}")
    D = None
    for i, d in enumerate(m.data):
        shape = np.shape(d)
        if len(shape) != 2 or shape[0] == 0:
            raise ValueError(f"{what}: timepoint {i} (t = {times[i]:g}) has no cells" if len(shape) == 2 else
                             f"{what}: timepoint {i} (t = {times[i]:g}) must be a (cells x D) array; got shape {shape}")
        D = shape[1] if D is None else D
        if shape[1] != D:
            raise ValueError(f"{what}: timepoint {i} (t = {times[i]:g}) has {shape[1]} dimensions, timepoint 0 {D}")
        if not np.isfinite(d).all():
            raise ValueError(f"{what}: timepoint {i} (t = {times[i]:g}) has NaN or Inf")
    return m


def check_holdout(marginals: Marginals, holdout) -> int | None:
    """``holdout`` as the index of an interior timepoint of ``marginals`` (or None)."""
    if holdout is None:
        return None
    K = len(marginals)
    if K < 3:
        raise ValueError(f"leaving a timepoint out needs at least 3 timepoints; the data have {K}")
    if isinstance(holdout, bool) or not isinstance(holdout, (int, np.integer)) or not 0 < holdout < K - 1:
        raise ValueError(f"holdout must be the index of an interior timepoint, 1..{K - 2}; got {holdout!r}")
    return int(holdout)


# ----------------------------------------------------------------------------- from a table

#: A PCA component whose std is at most PCA_FLAT of the first component's is rounding noise (float64
#: noise would put its variance near 1e-16 of the total); a raw feature is constant when its std is at
#: most RAW_FLAT times the magnitude of its mean (or 0).
PCA_FLAT, RAW_FLAT = 1e-6, 1e-10


def _flat_columns(x, pca_components, source, names):
    """Model-space columns with no real variance across the cells, which z-scoring would blow up into
    unit-variance noise: PCA components at rounding level (fewer cells than components, or features
    spanning fewer dimensions) are dropped; raw features that are constant are kept unscaled (so they
    stay constant); either with a warning saying how many and why.  Returns (x, pca_components, the
    mask of raw columns not to scale)."""
    with np.errstate(over="ignore", invalid="ignore"):
        std, mean = x.std(axis=0), np.abs(x.mean(axis=0))
    if pca_components is None:
        flat = (std == 0) | (std <= RAW_FLAT * mean)
        if flat.any() and not flat.all():
            cols = [names[j] if names else f"column {j + 1}" for j in np.flatnonzero(flat)]
            warn(f"{source}: {len(cols)} of {len(flat)} features are constant across the {len(x)} cells "
                 f"({cols[:5]}{' ...' if len(cols) > 5 else ''}); they are not z-scored (so they stay constant "
                 "and carry no signal)")
        return x, None, flat
    flat = std <= PCA_FLAT * (std.max() if std.size else 0.0)
    if flat.all():
        raise ValueError(f"{source}: the {len(x)} cells are all the same; there is nothing to learn from")
    if flat.any():
        warn(f"{source}: {int(flat.sum())} of {len(flat)} PCA components have no variance across the {len(x)} cells "
             f"(std at rounding level: fewer cells than components, or features spanning fewer dimensions); "
             f"dropped, so the model space has {int((~flat).sum())} dimensions")
    return x[:, ~flat], pca_components[~flat], np.zeros((~flat).sum(), dtype=bool)


def finish(x, t, standardize, source, names, dropped, pca_components=None, pca_mean=None) -> Marginals:
    """Model-space rows ``x`` (after any PCA) without columns of no variance, z-scored with pooled
    mean and std and split by time."""
    x, pca_components, flat = _flat_columns(x, pca_components, source, names)
    if standardize:
        with np.errstate(over="ignore", invalid="ignore"):
            mean, std = x.mean(axis=0), x.std(axis=0)
        std = np.where((std > 0) & ~flat, std, 1.0)
    else:
        mean, std = np.zeros(x.shape[1]), np.ones(x.shape[1])
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise ValueError(f"{source}: feature values too large to standardize (overflow); rescale them")
    transform = Transform(mean, std, pca_components, pca_mean, names)
    z = (x - mean) / std
    times = np.unique(t)
    data = [z[t == ti] for ti in times]
    return Marginals(data, times, transform, source, dropped)


def build(x, t, n_components, standardize, drop_nonfinite, source, names, force_pca=False) -> Marginals:
    """Marginals from a (cells x features) table ``x`` and per-cell times ``t``: checked, close times
    merged, NaN/Inf rows refused (or dropped), reduced by PCA when there are more than ``n_components``
    features (or always with ``force_pca``), then z-scored (``finish``)."""
    check_table(x.shape, t, source)
    t = merge_close_times(t, source)
    keep, dropped = drop_rows(t, ~np.isfinite(x).all(axis=1), drop_nonfinite, source)
    if keep is not None:
        x, t = x[keep], t[keep]
    pca_components = pca_mean = None
    if n_components is not None and (force_pca or x.shape[1] > n_components):
        from sklearn.decomposition import PCA

        k = min(n_components, x.shape[1], len(x))
        pca = PCA(n_components=k, random_state=0).fit(x)
        pca_components, pca_mean = pca.components_, pca.mean_
        x = (x - pca_mean) @ pca_components.T
    return finish(x, t, standardize, source, names, dropped, pca_components, pca_mean)
