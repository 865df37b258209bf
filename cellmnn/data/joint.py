"""Joint training across datasets: several time courses in one feature space, one model.

``load_joint`` reads several sources into one shared model space (a PCA and z-score fitted on
the pooled cells, or a shared precomputed embedding); ``fit([m_a, m_b, ...])`` trains one model
on all of them (the loss is the sum of each time course's loss; each keeps its own timepoints
and held-out timepoint), optionally with a learned dataset embedding (``dataset_embedding=True``:
the MLP reads the dataset's one-hot code); ``leave_one_out([m_a, m_b, ...])`` scores each
dataset's held-out timepoints with models trained jointly on the others' full time courses.
"""
from __future__ import annotations

import numpy as np

from .load import load_marginals
from .marginals import Marginals, Transform, check_holdout


def check_joint(datasets) -> list:
    """A list of at least two ``Marginals`` in one model space (same transform), or an error
    naming the first dataset that differs."""
    datasets = list(datasets)
    if len(datasets) < 2:
        raise ValueError(f"joint training needs at least two datasets; got {len(datasets)}")
    for i, m in enumerate(datasets):
        if not isinstance(m, Marginals):
            raise TypeError(f"datasets[{i}] must be a Marginals (cellmnn.load_marginals or load_joint), got "
                            f"{type(m).__name__}")
    for i, m in enumerate(datasets[1:], start=1):
        if m.dim != datasets[0].dim:
            raise ValueError(f"datasets[{i}] has {m.dim} model dimensions, datasets[0] {datasets[0].dim}; joint "
                             "training needs one feature space (load them with cellmnn.load_joint)")
        if not m.transform.same_as(datasets[0].transform):
            raise ValueError(f"datasets[{i}] was loaded into a different model space (PCA/z-score) than "
                             "datasets[0]; load them together with cellmnn.load_joint so they share one")
    return datasets


def check_joint_holdout(datasets: list, holdout) -> list:
    """``holdout`` for joint training: None, or one entry (None or an interior index) per dataset."""
    if holdout is None:
        return [None] * len(datasets)
    if not isinstance(holdout, (list, tuple)) or len(holdout) != len(datasets):
        raise ValueError(f"with {len(datasets)} datasets, holdout must be None or a list of {len(datasets)} "
                         f"entries (None or an interior timepoint index per dataset); got {holdout!r}")
    out = []
    for i, (m, k) in enumerate(zip(datasets, holdout)):
        try:
            out.append(check_holdout(m, k))
        except ValueError as exc:
            raise ValueError(f"holdout[{i}]: {exc}") from None
    return out


def _in_order_of(names, m: Marginals, i: int, dim: int) -> Marginals:
    """Source ``i``'s raw marginals with its features in the order ``names`` of source 0 (matched by
    name when both have names, else by position), or an error saying what differs."""
    own = m.transform.feature_names
    if not names or not own:
        if m.dim != dim or bool(names) != bool(own):
            raise ValueError(f"sources[{i}] has {m.dim} features{' without names' if not own else ''}, sources[0] "
                             f"{dim}{' without names' if not names else ''}; joint training needs one feature space")
        return m
    if own == names:
        return m
    missing, extra = [g for g in names if g not in set(own)], [g for g in own if g not in set(names)]
    if missing or extra:
        raise ValueError(f"sources[{i}] has other features than sources[0]: {len(missing)} of sources[0]'s are "
                         f"missing (e.g. {missing[:5]}) and {len(extra)} are extra (e.g. {extra[:5]}); joint training "
                         "needs the same genes")
    order = [own.index(g) for g in names]  # the same genes in another order: matched by name
    return Marginals([d[:, order] for d in m.data], m.times, Transform(m.transform.mean[order], m.transform.std[order],
                     None, None, list(names)), m.source, m.dropped)


def load_joint(sources, time_key=None, embedding=None, n_components=5, standardize=True,
               drop_nonfinite=False) -> list:
    """Several time courses read into one model space: one ``Marginals`` per source, sharing one
    ``Transform``.

    Each source is read as by ``load_marginals`` in its raw features (genes, or the first
    ``n_components`` columns of a precomputed ``embedding``); the features must agree (the same
    names, matched by name in any order, where the sources have names; else the same number).  A
    PCA to ``n_components`` (when there are more raw features) and the z-score are then fitted on
    the pooled cells of all sources, so that a cell means the same thing in every dataset.
    """
    sources = list(sources) if isinstance(sources, (list, tuple)) else None
    if not sources or len(sources) < 2:
        raise ValueError("sources must be a list of at least two datasets (paths or AnnData objects)")
    raw = []
    for i, src in enumerate(sources):
        keep = n_components if embedding is not None else None
        try:
            raw.append(load_marginals(src, time_key=time_key, embedding=embedding, n_components=keep,
                                      standardize=False, drop_nonfinite=drop_nonfinite))
        except (ValueError, TypeError, OSError) as exc:
            raise type(exc)(f"sources[{i}]: {exc}") from None
    names = raw[0].transform.feature_names
    raw = [raw[0]] + [_in_order_of(names, m, i, raw[0].dim) for i, m in enumerate(raw[1:], start=1)]
    x = np.concatenate([d for m in raw for d in m.data])
    pca_components = pca_mean = None
    if n_components is not None and x.shape[1] > n_components:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=min(n_components, len(x)), random_state=0).fit(x)
        pca_components, pca_mean = pca.components_, pca.mean_
        x = (x - pca_mean) @ pca_components.T
    if standardize:
        mean, std = x.mean(axis=0), x.std(axis=0)
        std = np.where(std > 0, std, 1.0)
    else:
        mean, std = np.zeros(x.shape[1]), np.ones(x.shape[1])
    tr = Transform(mean, std, pca_components, pca_mean, names)
    return [Marginals([tr.to_model(d) for d in m.data], m.times, tr, m.source + " (joint space)", m.dropped)
            for m in raw]
