"""Fates between two timepoints, read from a fitted model: where the cells of a group go
(``cell_transition``, ``push``) and where the cells of a group came from (``pull``).

The coupling.  Every cell observed at time ``source`` is pushed by the model to time ``target``
(by every member of an ensemble in turn) and its unit of mass is handed to the cells observed at
``target`` by one of two rules:

* ``rule="knn"`` (default): each pushed cell gives its mass in equal parts to its ``k`` nearest
  observed cells (Euclidean, in model space): the model's own prediction of where the cell goes,
  fractions included.
* ``rule="ot"``: an exact optimal-transport match between the pushed and the observed population
  (POT's ``emd``; squared Euclidean cost in model space; every pushed cell mass 1/n_source, every
  observed cell 1/n_target).  The match is balanced: the groups at ``target`` receive exactly their
  observed fractions and the model decides only which source cells go to which of them (moscot's
  ``cell_transition`` reads an OT coupling the same way).  Where two snapshots' fractions differ
  by sampling, the balance moves cells across groups to make them up.

The default was chosen on the simulated courses of ``bench/fate_transitions.py`` (bifurcation,
uneven-gaps, bifurcation-5d and -10d; every pair of times; an ensemble of three models): from
sources after t = 0, "knn" came within a total variation of 0.026 of the true fates on average
(worst 0.063), "ot" within 0.064 (worst 0.110), off where two snapshots' fractions differ by
sampling (``bench/results/fate_transitions.json``).

A model with a learned diffusion (``noise="state"``) pushes every source cell ``n_samples`` times
(default ``FATE_SAMPLES``; draws from ``seed``, reproducible) and each draw is matched as a cell of
its own: a cell's fate is then a distribution even before the match, which is where a population
splits (from t = 0 on the simulated bifurcation the noise decides about one fate in eight).  A
deterministic model pushes each cell once whatever ``n_samples`` says.

P (n_source x n_target), each row summing to 1, is the fate distribution of one source cell
(the mean over its draws, and with an ensemble over the members).  From it:

    cell_transition  T[g, h] = mean over source cells i in g of sum over target cells j in h of P[i, j]
    push(g)          w_j = mean over source cells i in g of P[i, j]            (sums to 1 over target cells)
    pull(h)          w_i = sum over target cells j in h of P[i, j], normalised  (sums to 1 over source cells)

A cell belongs to a group by ``obs[annotation]`` (compared as text); cells at the two times with no
label are an error for ``cell_transition`` and belong to no group for ``push``/``pull``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .. import checks
from .cells import CHUNK, check_dataset, members, plan_cells, read_cells

RULES = ("knn", "ot")
MAX_OT_ENTRIES = 25_000_000  # n_source x n_target of one exact OT match (200 MB of float64 cost matrix)
KNN_BLOCK = 2 ** 24  # pushed x observed distances computed at once by the knn match (128 MB of float64)
# draws per source cell from a stochastic model: one cell's fate probability to a binomial standard
# error of at most 0.5 / sqrt(20) = 0.11, a group's row (the mean over its cells) far closer
FATE_SAMPLES = 20
RECORD = "cellmnn_fate"  # uns entry that records the obs columns push and pull wrote


@dataclass
class TwoTimes:
    """The checked cells of ``adata`` at the source time (indices ``source_cells``, model-space
    positions ``z_source``) and at the target time (``target_cells``, ``z_target``), their labels
    (str, or None where a cell has none), the ``models`` (a list) and their ``transform``."""
    models: list
    transform: object
    source_cells: np.ndarray
    target_cells: np.ndarray
    z_source: np.ndarray
    z_target: np.ndarray
    source_labels: np.ndarray
    target_labels: np.ndarray
    source_time: float
    target_time: float
    rule: str
    k: int
    n_samples: int = 1
    seed: int = 0


@dataclass
class Coupling(TwoTimes):
    """``TwoTimes`` and P (n_source, n_target) float64, rows summing to 1: each source cell's fate
    distribution over the target cells (module docstring); a ``scipy.sparse`` CSR matrix for
    rule "knn" (k entries per row), a dense array for "ot"."""
    P: object = None

    def rows_mean(self, rows) -> np.ndarray:
        """The mean of P's rows selected by ``rows`` (a boolean mask over source cells), (n_target,)."""
        return np.asarray(self.P[np.asarray(rows)].mean(axis=0)).ravel()

    def cols_sum(self, cols) -> np.ndarray:
        """The sum of P's columns selected by ``cols`` (a boolean mask over target cells), (n_source,)."""
        return np.asarray(self.P[:, np.asarray(cols)].sum(axis=1)).ravel()


def _labels(adata, annotation) -> np.ndarray:
    """``obs[annotation]`` as text per cell, None where missing."""
    if not isinstance(annotation, str):
        raise TypeError(f"annotation must be the name of an adata.obs column (a string), got {annotation!r}")
    if annotation not in adata.obs.columns:
        raise ValueError(f"annotation {annotation!r} is not a column of adata.obs; columns are "
                         f"{list(adata.obs.columns)}")
    col = adata.obs[annotation].to_numpy(dtype=object, na_value=None)
    return np.array([None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in col],
                    dtype=object)


def _time_index(t, value, name) -> np.ndarray:
    """The cells whose time is ``value`` (a time of the data), or an error naming ``name``."""
    v = checks.number(name, value)
    uniq = np.unique(t)
    hit = uniq[np.isclose(uniq, v, rtol=1e-9, atol=0.0)]
    if not len(hit):
        raise ValueError(f"{name} {v:g} is not a time of the data; its times are {[float(u) for u in uniq]}")
    return np.flatnonzero(t == hit[0])


def check_group(labels, group, name, time) -> None:
    """``group`` names a group that has cells (``labels``) at ``time``, or an error naming ``name``."""
    if isinstance(group, bool) or not isinstance(group, (str, int, np.integer)):
        raise TypeError(f"{name} must be a group name (a string), got {group!r}")
    present = sorted({v for v in labels if v is not None})
    if str(group) not in present:
        raise ValueError(f"{name} {group!r} has no cells at time {time:g}; groups there are {present}")


def _samples(models, n_samples) -> int:
    """Draws per source cell: 1 for deterministic models, ``n_samples`` (default ``FATE_SAMPLES``) else."""
    n = FATE_SAMPLES if n_samples is None else checks.positive_int("n_samples", n_samples)
    return n if any(m.stochastic for m in models) else 1


def _rule(rule, k) -> int:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    return checks.count("k", k) if rule == "knn" else 0


def two_times(model, adata, annotation, source, target, rule="knn", k=15, time_key=None, embedding=None,
              marginals=None, dataset=None, target_annotation=None, n_samples=None, seed=0) -> TwoTimes:
    """Check every argument and read the cells at ``source`` and ``target`` (a later time), with
    their groups by ``annotation`` (None: no groups; at ``target`` by ``target_annotation`` when
    given).  Runs no model."""
    models = members(model)
    k = _rule(rule, k)
    n_samples = _samples(models, n_samples)
    seed = checks.seed(seed)
    check_dataset(models[0], dataset)
    plan = plan_cells(adata, models[0], marginals, time_key, embedding)
    labels = _labels(adata, annotation) if annotation is not None else np.full(adata.n_obs, None, dtype=object)
    target_labels = labels if target_annotation is None else _labels(adata, target_annotation)
    t, z = read_cells(adata, plan)
    src, tgt = _time_index(t, source, "source"), _time_index(t, target, "target")
    s_time, t_time = float(t[src[0]]), float(t[tgt[0]])
    if t_time <= s_time:
        raise ValueError(f"target ({t_time:g}) must be a later time than source ({s_time:g})")
    if rule == "ot" and len(src) * len(tgt) > MAX_OT_ENTRIES:
        raise ValueError(f"rule='ot': {len(src)} x {len(tgt)} cells is more than one exact OT match handles "
                         f"({MAX_OT_ENTRIES:,} pairs); use rule='knn', or subsample the cells of the two times")
    return TwoTimes(models, plan.transform, src, tgt, z[src], z[tgt], labels[src], target_labels[tgt], s_time,
                    t_time, rule, k, n_samples, seed)


def coupling(model, adata, annotation, source, target, rule="knn", k=15, time_key=None, embedding=None,
             marginals=None, dataset=None, target_annotation=None, n_samples=None, seed=0) -> Coupling:
    """The coupling between the cells at ``source`` and at ``target`` (module docstring); every
    argument checked (``two_times``) before any model call."""
    c = two_times(model, adata, annotation, source, target, rule, k, time_key, embedding, marginals, dataset,
                  target_annotation, n_samples, seed)
    return couple(c, dataset)


def couple(c: TwoTimes, dataset=None) -> Coupling:
    """The coupling of checked cells ``c``: every model pushes the source cells (``c.n_samples`` draws
    each from a stochastic model), each draw matched by ``c.rule``; P is the mean over draws and models."""
    P = None
    for m in c.models:
        draws = c.n_samples if m.stochastic else 1
        for r in range(draws):
            pushed = push_cells(m, c.z_source, c.source_time, c.target_time, dataset, seed=c.seed + r)
            Pm = match(pushed, c.z_target, c.rule, c.k) / draws
            P = Pm if P is None else P + Pm
    return Coupling(**vars(c), P=P / len(c.models))


def push_cells(model, z, t0, t1, dataset=None, seed=0) -> np.ndarray:
    """``model.predict`` of cells ``z`` (n, D) from ``t0`` to ``t1`` in chunks, (n, D) float64 (one draw
    from ``seed`` for a stochastic model; chunk c uses seed + c * 1,000,003, so the draws of fewer than
    a million samples never share a seed); an
    error if any result is not finite."""
    out = np.empty(np.shape(z), dtype=np.float64)
    for a in range(0, len(z), CHUNK):
        out[a:a + CHUNK] = model.predict(z[a:a + CHUNK], t0, t1, dataset=dataset,
                                         seed=seed + (a // CHUNK) * 1_000_003)
    if not np.isfinite(out).all():
        raise FloatingPointError(f"the model pushed {int((~np.isfinite(out).all(axis=1)).sum())} cells from time "
                                 f"{t0:g} to {t1:g} to NaN or Inf")
    return out


def match(pushed, observed, rule, k):
    """(n_pushed, n_observed) float64, rows summing to 1: each pushed cell's unit of mass handed to
    the observed cells by ``rule`` (module docstring): for "knn" (``k`` neighbours) a
    ``scipy.sparse`` CSR matrix, for "ot" a dense array (at most ``MAX_OT_ENTRIES``)."""
    if rule == "ot":
        import ot

        cost = ((pushed[:, None, :] - observed[None, :, :]) ** 2).sum(-1)
        a = np.full(len(pushed), 1.0 / len(pushed))
        b = np.full(len(observed), 1.0 / len(observed))
        return ot.emd(a, b, cost / cost.max() if cost.max() > 0 else cost, numItermax=10_000_000) * len(pushed)
    from scipy import sparse

    kk = min(k, len(observed))
    idx = np.empty((len(pushed), kk), dtype=np.int64)
    obs = torch.as_tensor(observed)
    rows = max(1, min(4096, KNN_BLOCK // max(1, len(observed))))  # distances held at once: rows x n_observed
    for a in range(0, len(pushed), rows):
        d = torch.cdist(torch.as_tensor(pushed[a:a + rows]), obs)
        idx[a:a + rows] = d.topk(kk, dim=1, largest=False).indices.numpy()
    indptr = np.arange(0, len(pushed) * kk + 1, kk)
    return sparse.csr_matrix((np.full(idx.size, 1.0 / kk), idx.ravel(), indptr), shape=(len(pushed), len(observed)))


def _groups(adata, key, labels) -> list:
    """The distinct labels (None left out): in the order of the column's categories when it is
    categorical, else sorted as text."""
    present = {v for v in labels if v is not None}
    col = adata.obs[key]
    if hasattr(col, "cat"):
        return [str(c) for c in col.cat.categories if str(c) in present]
    return sorted(present)


def cell_transition(model, adata, annotation, source, target, target_annotation=None, rule="knn", k=15,
                    time_key=None, embedding=None, marginals=None, dataset=None, n_samples=None, seed=0):
    """The probability that a cell of each group at time ``source`` reaches each group at time ``target``.

    Args:
        model: a fitted ``CellMNN``, or a list of them fitted on one transform (an ensemble: the
            mean of the members' couplings).
        adata: AnnData with the cells of both times (the model's features in ``X`` or
            ``obsm[embedding]``, times in ``obs[time_key]``, as ``annotate`` reads them).
        annotation: the ``obs`` column that names each cell's group (cell type, cluster).
        source, target: two times of the data, ``target`` later.
        target_annotation: another ``obs`` column for the groups at ``target`` (default: ``annotation``).
        rule, k: how pushed cells are matched to observed ones (module docstring).
        time_key, embedding, marginals, dataset: as in ``annotate``.
        n_samples, seed: draws per source cell from a stochastic model (default ``FATE_SAMPLES``) and
            the first draw's seed (module docstring); a deterministic model pushes each cell once.

    Returns a ``pandas.DataFrame``: one row per source group, one column per target group, each row
    summing to 1; ``attrs`` holds the rule, the times, and the number of cells per group
    ("source_counts", "target_counts").  Cells with no label at either time are an error.
    """
    tgt_key = annotation if target_annotation is None else target_annotation
    c = two_times(model, adata, annotation, source, target, rule, k, time_key, embedding, marginals, dataset,
                  target_annotation, n_samples, seed)
    check_labelled(c, annotation, tgt_key, target_annotation is not None)
    return transition_table(couple(c, dataset), adata, annotation, tgt_key)


def check_labelled(c: TwoTimes, annotation, target_key, own_target_key: bool) -> None:
    """Every cell of ``c`` at both times has a group, or an error naming the column and the time."""
    for name, key, labels, time in (("annotation", annotation, c.source_labels, c.source_time),
                                    ("target_annotation" if own_target_key else "annotation", target_key,
                                     c.target_labels, c.target_time)):
        missing = sum(v is None for v in labels)
        if missing:
            raise ValueError(f"{name} {key!r}: {missing} cells at time {time:g} have no label; give every cell "
                             "there a group (or leave them out of adata)")


def transition_table(c: Coupling, adata, annotation, target_key):
    """``cell_transition``'s table from a coupling ``c`` whose groups are by ``annotation`` at the
    source and ``target_key`` at the target (every cell labelled)."""
    import pandas as pd

    rows, cols = _groups(adata, annotation, c.source_labels), _groups(adata, target_key, c.target_labels)
    T = np.stack([c.rows_mean(c.source_labels == g) for g in rows])  # (groups, n_target)
    table = np.stack([T[:, c.target_labels == h].sum(axis=1) for h in cols], axis=1)
    df = pd.DataFrame(table, index=pd.Index(rows, name=f"{annotation} at {c.source_time:g}"),
                      columns=pd.Index(cols, name=f"{target_key} at {c.target_time:g}"))
    df.attrs.update(rule=c.rule, n_samples=c.n_samples, source_time=c.source_time, target_time=c.target_time,
                    source_counts={g: int((c.source_labels == g).sum()) for g in rows},
                    target_counts={h: int((c.target_labels == h).sum()) for h in cols})
    return df


def push(model, adata, annotation, group, source, target, key_added="cellmnn_push", rule="knn", k=15,
         time_key=None, embedding=None, marginals=None, dataset=None, n_samples=None, seed=0) -> np.ndarray:
    """Where the cells of ``group`` at time ``source`` go: a weight per cell of ``adata`` (n_obs,),
    summing to 1 over the cells at ``target`` and NaN at every other time; written to
    ``adata.obs[key_added]`` unless ``key_added`` is None (a column is replaced only if ``push`` or
    ``pull`` wrote it).  Other arguments as in ``cell_transition``."""
    c = two_times(model, adata, annotation, source, target, rule, k, time_key, embedding, marginals, dataset,
                  n_samples=n_samples, seed=seed)
    _check_key(adata, key_added)
    check_group(c.source_labels, group, "group", c.source_time)
    return push_weights(couple(c, dataset), adata, annotation, group, key_added)


def push_weights(c: Coupling, adata, annotation, group, key_added) -> np.ndarray:
    """``push``'s weights from a coupling ``c`` (source groups by ``annotation``), written as ``push`` does."""
    check_group(c.source_labels, group, "group", c.source_time)
    _check_key(adata, key_added)
    w = np.full(adata.n_obs, np.nan)
    w[c.target_cells] = c.rows_mean(c.source_labels == str(group))
    _write(adata, key_added, w, dict(kind="push", annotation=annotation, group=str(group), source=c.source_time,
                                     target=c.target_time, rule=c.rule))
    return w


def pull(model, adata, annotation, group, source, target, key_added="cellmnn_pull", rule="knn", k=15,
         time_key=None, embedding=None, marginals=None, dataset=None, n_samples=None, seed=0) -> np.ndarray:
    """Where the cells of ``group`` at time ``target`` came from: a weight per cell of ``adata``
    (n_obs,), summing to 1 over the cells at ``source`` and NaN at every other time; written to
    ``adata.obs[key_added]`` unless ``key_added`` is None.  Other arguments as in ``push``."""
    c = two_times(model, adata, annotation, source, target, rule, k, time_key, embedding, marginals, dataset,
                  n_samples=n_samples, seed=seed)
    _check_key(adata, key_added)
    check_group(c.target_labels, group, "group", c.target_time)
    return pull_weights(couple(c, dataset), adata, annotation, group, key_added)


def pull_weights(c: Coupling, adata, annotation, group, key_added) -> np.ndarray:
    """``pull``'s weights from a coupling ``c`` (target groups by ``annotation``), written as ``pull`` does."""
    check_group(c.target_labels, group, "group", c.target_time)
    _check_key(adata, key_added)
    mass = c.cols_sum(c.target_labels == str(group))
    if mass.sum() <= 0:
        raise ValueError(f"group {group!r} at time {c.target_time:g} receives no mass from time {c.source_time:g} "
                         f"under rule={c.rule!r} (no pushed cell lands near it); try rule='ot'")
    w = np.full(adata.n_obs, np.nan)
    w[c.source_cells] = mass / mass.sum()
    _write(adata, key_added, w, dict(kind="pull", annotation=annotation, group=str(group), source=c.source_time,
                                     target=c.target_time, rule=c.rule))
    return w


def _written(adata) -> list:
    entry = adata.uns.get(RECORD)
    keys = entry.get("keys") if isinstance(entry, Mapping) else None
    return [str(v) for v in np.asarray(keys, dtype=object).ravel()] if keys is not None else []


def _check_key(adata, key) -> None:
    if key is None:
        return
    if not isinstance(key, str) or not key:
        raise ValueError(f"key_added must be a non-empty string or None, got {key!r}")
    if getattr(adata, "is_view", False):
        raise ValueError("adata is a view of another AnnData: writing into it would not reach the original; "
                         "pass adata.copy(), or key_added=None")
    if key in adata.obs.columns and key not in _written(adata):
        raise ValueError(f"adata.obs[{key!r}] exists and was not written by cellmnn push or pull; refusing to "
                         "overwrite it (pass another key_added=)")


def _write(adata, key, w, info) -> None:
    if key is None:
        return
    adata.obs[key] = w
    keys = _written(adata)
    entry = dict(adata.uns.get(RECORD, {})) if isinstance(adata.uns.get(RECORD), Mapping) else {}
    entry["keys"] = np.asarray(sorted(set(keys) | {key}), dtype=object)
    entry[key] = {k: v for k, v in info.items()}
    adata.uns[RECORD] = entry

