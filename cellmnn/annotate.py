"""Write a fitted model's read-outs back into an AnnData, under documented keys.

``annotate(adata, model)`` maps every cell of ``adata`` to the model space with the transform the
model was fitted with (the same reading of ``obs[time_key]`` and of ``X`` or an ``obsm``
embedding as ``load_marginals``), pushes each cell from its own time to each requested time, reads
the operator A(x, t) of each cell (trace, spectral abscissa, eigenvalues) and, for requested
genes, the gene interaction weights.  With ``prefix="cellmnn"`` (P below):

    obsm[P_z]                  (n, D) float64   the cell in model space (z-scored PCA coordinates)
    obsm[P_pred]               (n, T, D) float32  predicted positions at uns[P]["pred_times"]
    obsm[P_pred_features]      (n, T, F) float32  the same mapped back to feature space (genes)
    obsm[P_pred_spread]        (n, T) float32   ensembles and stochastic models: the square root of the
                                                trace of P_pred_cov (for a deterministic ensemble, the
                                                root mean square over members of the distance of a
                                                member's prediction from P_pred)
    obsm[P_pred_cov]           (n, T, D, D) float32  stochastic models only: the predictive covariance,
                                                the members' mean decoder covariance (closed form for
                                                the single-piece decoder, else from ``ANNOTATE_SAMPLES``
                                                samples) plus the covariance between members' means
    obsm[P_eigvals_real/imag]  (n, D) float64   eigenvalues of A, by real part then imaginary
                                                part, both descending
    obs[P_trace]               float64          trace of A
    obs[P_spectral_abscissa]   float64          largest real part of an eigenvalue of A
    uns[P]                     provenance and gene interactions (``annotate`` docstring)

A is per unit of the data's time (``CellMNN.operator``).  For a stochastic model (a learned diffusion)
P_pred is the predictive mean, not a sample.  With an ensemble (a list of models fitted
on one transform) P_pred is the mean of the members' predictions, A the mean of their operators
and the interactions the mean of theirs; provenance is the first member's, ``uns[P]["members"]``
the number of members.  Everything written is plain arrays,
strings and numbers, so it survives ``write_h5ad`` / ``read_h5ad``.  A key is replaced only if an
earlier ``annotate`` wrote it (recorded in ``uns[P]``); anything else is refused with an error
naming the key.

``uns[P]`` holds: "format" ("cellmnn-annotate"), "format_version", "cellmnn_version", "model"
(``model.config()``), "transform" (``Transform.to_dict()``, fields that are None left out),
"time_key", "embedding" (only when used), "pred_times", "keys" ({"obs": [...], "obsm": [...]},
what was written), "pred_features" (whether ``obsm[P_pred_features]`` was written: it is
skipped, with a warning, above 10^8 values), "training_times" and "training_source" (when the
model records them), "fit" (when the model records its training: "seed", "epochs",
"best_epoch", "best_score", "hparams", "holdout" (absent when no timepoint was held out; for a
joint model one entry per dataset, -1 where none was), "history" (epochs x (epoch, train loss,
validation score)) and "selection" (a JSON string) when present) and, with ``genes``,
"interactions": {"genes", "weight" and "fraction_positive" (genes x genes, row = target i,
column = source j, mean over all cells), "times", "n_cells", "weight_per_time" and
"fraction_positive_per_time" (timepoints x genes x genes, per distinct cell time)};
``pandas.DataFrame(d["weight"], index=d["genes"], columns=d["genes"])`` gives the table.
"""
from __future__ import annotations

import json
import numbers
from collections.abc import Mapping

import numpy as np
import torch

from .analysis.cells import CHUNK, check_dataset, members, plan_cells, read_cells
from .analysis.interactions import gene_interactions, gene_names
from .checks import warn
from .data.marginals import Marginals, Transform
from .data.tables import duplicates
from .files import ANNOTATE_FORMAT
from .version import __version__

FORMAT = ANNOTATE_FORMAT
FORMAT_VERSION = 1
MAX_FEATURE_VALUES = 10 ** 8  # obsm[P_pred_features] is written only up to n * T * F values (400 MB)
_OBSM = ("z", "pred", "pred_features", "pred_spread", "pred_cov", "eigvals_real", "eigvals_imag")
ANNOTATE_SAMPLES = 64  # samples per cell for the predictive covariance of re-linearised stochastic decoders
_OBS = ("trace", "spectral_abscissa")


def annotate(adata, model, marginals=None, times=None, genes=None, time_key=None, embedding=None,
             prefix="cellmnn", copy=False, dataset=None):
    """Write predictions, operator summaries, gene interactions and provenance into ``adata``
    (the keys and ``uns[prefix]``: module docstring).

    Args:
        adata: AnnData with the cells to annotate: the training cells or new cells in the same
            feature space.  Times come from ``obs[time_key]`` (default: the first of "day",
            "time", "timepoint", "sample_labels" in ``obs``), features from ``X`` (genes matched
            by name to the model's; extra genes unused) or from ``obsm[embedding]``.
        model: a fitted ``CellMNN`` (from ``fit`` or ``load_model``), or a list of them fitted on
            one transform (an ensemble: means, and the members' spread in ``obsm[P_pred_spread]``).
        marginals: optional ``Marginals`` the model was fitted on: its transform is used when the
            model carries none (it must match the model's when both exist) and its times are the
            default ``times``.
        times: the times to predict every cell at (a number or a 1-D sequence of distinct finite
            numbers); default: the timepoints the model was fitted on.
        genes: gene names (the transform's feature names) whose pairwise interaction weights
            w_{j->i} (``gene_interactions``, kind "weight") go to ``uns[prefix]["interactions"]``.
        time_key, embedding: as in ``load_marginals``.  ``embedding`` defaults to the ``obsm``
            key the model was fitted on, when its record names one and ``adata`` has it; an
            embedding with more columns than the model's features gives its first ones, as the
            loader does.  A model fitted on named features (genes) reads ``X`` only.
        prefix: the start of every key written (a non-empty string without "/").
        copy: return an annotated copy and leave ``adata`` untouched; otherwise annotate
            ``adata`` in place and return None.
        dataset: for a model trained jointly with a dataset embedding, the dataset (index in
            ``fit``'s list) these cells belong to; required there, an error otherwise.

    Every argument is checked before any work, with an error naming it.
    """
    models = members(model)
    _check_args(adata, models[0], prefix, copy, dataset)
    plan = plan_cells(adata, models[0], marginals, time_key, embedding)
    tr, record, key, embedding = plan.transform, plan.record, plan.time_key, plan.embedding
    pred_times = _pred_times(times, models[0], marginals)
    genes = _check_genes(genes, tr)
    keys_obs, keys_obsm = [f"{prefix}_{k}" for k in _OBS], [f"{prefix}_{k}" for k in _OBSM]
    _check_overwrite(adata, prefix, keys_obs, keys_obsm)
    t, z = read_cells(adata, plan)

    pred, spread, cov, trace, eig = _readouts(models, z, t, pred_times, dataset)
    obsm = {f"{prefix}_z": z, f"{prefix}_pred": pred,
            f"{prefix}_eigvals_real": eig.real.copy(), f"{prefix}_eigvals_imag": eig.imag.copy()}
    if len(models) > 1 or cov is not None:
        obsm[f"{prefix}_pred_spread"] = spread
    if cov is not None:
        obsm[f"{prefix}_pred_cov"] = cov
    features = _pred_features(pred, tr, prefix)
    if features is not None:
        obsm[f"{prefix}_pred_features"] = features
    obs = {f"{prefix}_trace": trace, f"{prefix}_spectral_abscissa": eig.real.max(axis=1)}
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "cellmnn_version": __version__,
            "model": models[0].config(), "members": len(models), "transform": tr.to_dict(), "time_key": key,
            "embedding": embedding, "pred_times": pred_times, "pred_features": features is not None}
    if record:
        info["training_times"], info["training_source"] = record.get("times"), record.get("source")
    info["fit"] = _fit_record(models[0])
    info["keys"] = {"obs": list(obs), "obsm": list(obsm)}
    if genes is not None:
        info["interactions"] = _mean_of([_interactions(m, z, t, tr, genes, dataset) for m in models])

    out = adata.copy() if copy else adata
    _write(out, prefix, _plain(info), obs, obsm, keys_obs, keys_obsm)
    return out if copy else None


def _readouts(models, z, t, pred_times, dataset):
    """Every cell pushed to ``pred_times`` by each model: the predictive mean (n, T, D) float32, its
    spread (n, T) float32 (the square root of the covariance's trace) and, when a model is
    stochastic, the covariance (n, T, D, D) float32 (``_distribution`` per model; the members' mean
    covariance plus the covariance of their means), else None; and the trace and eigenvalues
    (sorted by real part, then imaginary part, descending) of the cell's operator, the mean of the
    models' A; in chunks of ``CHUNK`` cells."""
    n, D, T = len(z), models[0].dim, len(pred_times)
    stochastic = any(m.stochastic for m in models)
    pred = np.empty((n, T, D), dtype=np.float32)
    spread = np.empty((n, T), dtype=np.float32)
    cov = np.empty((n, T, D, D), dtype=np.float32) if stochastic else None
    trace = np.empty(n)
    eig = np.empty((n, D), dtype=np.complex128)
    for a in range(0, n, CHUNK):
        zc, tc = z[a:a + CHUNK], t[a:a + CHUNK]
        means, covs = zip(*[_distribution(m, zc, tc, pred_times, dataset) for m in models])
        each = np.stack(means)
        mean = each.mean(axis=0)
        dev = each - mean
        pred[a:a + CHUNK] = mean
        var = (dev ** 2).sum(axis=-1).mean(axis=0)  # between members: the trace of their covariance
        if stochastic:
            within = np.mean([0.0 if v is None else v for v in covs], axis=0)
            c = within + np.einsum("mnti,mntj->ntij", dev, dev) / len(models)
            cov[a:a + CHUNK] = c
            var = np.trace(c, axis1=-2, axis2=-1)
        spread[a:a + CHUNK] = np.sqrt(var)
        A = np.mean([_operator(m, zc, tc, dataset) for m in models], axis=0)
        trace[a:a + CHUNK] = np.trace(A, axis1=1, axis2=2)
        ev = np.linalg.eigvals(A)
        order = np.lexsort((-ev.imag, -ev.real), axis=-1)
        eig[a:a + CHUNK] = np.take_along_axis(ev, order, axis=-1)
    return pred, spread, cov, trace, eig


def _distribution(model, z, t, pred_times, dataset):
    """One model's predictive mean (n, T, D) and covariance (n, T, D, D), float64: the prediction and
    None (no covariance) for a deterministic model, the closed form for the single-piece stochastic decoder, else the
    moments of ``ANNOTATE_SAMPLES`` samples per cell."""
    if not model.stochastic:
        return model.predict(z, t, pred_times, dataset=dataset).astype(np.float64), None
    if model.decoder.piece_length is None:
        M, S = model.predict_distribution(z, t, pred_times, dataset=dataset)
        return M.astype(np.float64), S.astype(np.float64)
    draws = model.predict(z, t, pred_times, dataset=dataset, n_samples=ANNOTATE_SAMPLES).astype(np.float64)
    M = draws.mean(axis=0)
    dev = draws - M
    return M, np.einsum("knti,kntj->ntij", dev, dev) / (ANNOTATE_SAMPLES - 1)


def _operator(model, z, t, dataset) -> np.ndarray:
    """A(z, t) of one model as float64 (n, D, D)."""
    p = next(model.parameters())
    with torch.no_grad():
        A = model.operator(torch.as_tensor(z, dtype=p.dtype, device=p.device),
                           torch.as_tensor(t, dtype=torch.float64, device=p.device), dataset=dataset)
    return A.cpu().double().numpy()


def _mean_of(records: list) -> dict:
    """The interaction records of an ensemble's members as one: numeric arrays averaged."""
    out = dict(records[0])
    for k in ("weight", "fraction_positive", "weight_per_time", "fraction_positive_per_time"):
        out[k] = np.mean([r[k] for r in records], axis=0)
    return out


def _pred_features(pred, tr, prefix):
    """The predictions in feature space (n, T, F) float32, or None (with a warning) above
    ``MAX_FEATURE_VALUES`` values."""
    n, T, D = pred.shape
    F = tr.n_features
    if n * T * F <= MAX_FEATURE_VALUES:
        return tr.to_features(pred.reshape(n * T, D)).reshape(n, T, F).astype(np.float32)
    warn(f"obsm[{prefix + '_pred_features'!r}] skipped: {n} cells x {T} times x {F} features is more than "
         f"{MAX_FEATURE_VALUES:,} values; map obsm[{prefix + '_pred'!r}][:, j] with the model's transform "
         "(to_features) for the genes you need")
    return None


def _write(out, prefix, info, obs, obsm, keys_obs, keys_obsm) -> None:
    """Write the keys into ``out``; keys of this prefix an earlier annotate wrote and this one does
    not (e.g. pred_features, now skipped) are stale and removed."""
    old = out.uns.get(prefix)
    if _is_ours(old):
        for k in set(_recorded(old, "obsm")) & set(keys_obsm) - set(obsm):
            if k in out.obsm:
                del out.obsm[k]
        for k in set(_recorded(old, "obs")) & set(keys_obs) - set(obs):
            if k in out.obs.columns:
                del out.obs[k]
    for k, v in obsm.items():
        out.obsm[k] = v
    for k, v in obs.items():
        out.obs[k] = v
    out.uns[prefix] = info


# ----------------------------------------------------------------------------- checks

def _check_args(adata, model, prefix, copy, dataset) -> None:
    """The arguments of annotate's own (``plan_cells`` checks the rest), before any reading."""
    if not isinstance(copy, (bool, np.bool_)):
        raise TypeError(f"copy must be True or False, got {type(copy).__name__} {copy!r}")
    if not isinstance(prefix, str) or not prefix or "/" in prefix:
        raise ValueError(f"prefix must be a non-empty string without '/', got {prefix!r}")
    check_dataset(model, dataset)
    if getattr(adata, "is_view", False) and not copy:
        raise ValueError("adata is a view of another AnnData: annotating it in place would not reach the "
                         "original; pass copy=True or annotate adata.copy()")




def _pred_times(times, model, marginals):
    if times is None:
        if marginals is not None:
            times = marginals.times
        else:
            times = (getattr(model, "marginals_info", None) or {}).get("times")
            if times is None:
                raise ValueError("times: the model records no timepoints to predict at; pass times=")
    if isinstance(times, (str, bytes)):
        raise TypeError(f"times must be a number or a sequence of numbers, got {times!r}")
    if isinstance(times, torch.Tensor):
        times = times.detach().cpu().numpy()
    arr = np.asarray(times, dtype=object)
    if arr.ndim > 1:
        raise ValueError(f"times must be a number or a 1-D sequence of numbers; got shape {arr.shape}")
    arr = arr.reshape(-1)
    if not all(isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) for v in arr):
        raise TypeError(f"times must be numbers; got {[v for v in arr.tolist()][:5]!r}")
    arr = arr.astype(np.float64)
    if arr.size == 0:
        raise ValueError("times is empty; give at least one time to predict at")
    if not np.isfinite(arr).all():
        raise ValueError(f"times must be finite; got {arr.tolist()}")
    if len(np.unique(arr)) != len(arr):
        raise ValueError(f"times has repeated values: {arr.tolist()}")
    return arr


def _check_genes(genes, tr):
    if genes is None:
        return None
    genes = [genes] if isinstance(genes, str) else genes
    try:
        genes = list(genes)
    except TypeError:
        raise TypeError(f"genes must be a list of gene names, got {type(genes).__name__}") from None
    if not genes or not all(isinstance(g, str) for g in genes):
        raise ValueError(f"genes must be a non-empty list of gene names (strings); got {genes[:5]!r}")
    if duplicates(genes):
        raise ValueError(f"genes has repeated names: {duplicates(genes)[:10]}")
    names = gene_names(tr, tr.n_features)
    known = set(names)
    missing = [g for g in genes if g not in known]
    if missing:
        raise ValueError(f"genes: {len(missing)} not among the model's {len(names)} features: {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''} (features are e.g. {names[:5]})")
    return genes








def _is_ours(entry) -> bool:
    return isinstance(entry, Mapping) and entry.get("format") == FORMAT


def _recorded(entry, kind) -> list:
    keys = entry.get("keys")
    return [str(k) for k in np.asarray(keys.get(kind, []), dtype=object).ravel()] if isinstance(keys, Mapping) else []


def _check_overwrite(adata, prefix, keys_obs, keys_obsm):
    """Refuse to replace anything that an earlier ``annotate`` (recorded in uns[prefix]) did not write."""
    old = adata.uns.get(prefix) if prefix in adata.uns else None
    if prefix in adata.uns and not _is_ours(old):
        raise ValueError(f"adata.uns[{prefix!r}] exists and was not written by cellmnn.annotate; refusing to "
                         "overwrite it (pass another prefix= or remove it)")
    ours_obs = set(_recorded(old, "obs")) if old is not None else set()
    ours_obsm = set(_recorded(old, "obsm")) if old is not None else set()
    for where, keys, existing, ours in (("obs", keys_obs, adata.obs.columns, ours_obs),
                                        ("obsm", keys_obsm, adata.obsm.keys(), ours_obsm)):
        for k in keys:
            if k in existing and k not in ours:
                raise ValueError(f"adata.{where}[{k!r}] exists and was not written by cellmnn.annotate; refusing "
                                 "to overwrite it (pass another prefix= or remove it)")




# ----------------------------------------------------------------------------- read-outs

def _interactions(model, z, t, tr, genes, dataset=None) -> dict:
    """w_{j->i} among ``genes`` per distinct cell time and over all cells (row i = target, column j = source)."""
    uniq = np.unique(t)
    data = Marginals([z[t == u] for u in uniq], uniq, tr, "adata")
    res = gene_interactions(model, data, genes=genes, aggregate="timepoint", kind="weight", transform=tr,
                            dataset=dataset)
    G, K = len(genes), len(uniq)
    w = res.n_cells / res.n_cells.sum()  # the weighting gene_interactions uses for aggregate="all"
    return {"kind": "weight", "genes": list(genes),
            "weight": (w @ res.values).reshape(G, G), "fraction_positive": (w @ res.positive).reshape(G, G),
            "times": res.times, "n_cells": res.n_cells.astype(np.int64),
            "weight_per_time": res.values.reshape(K, G, G),
            "fraction_positive_per_time": res.positive.reshape(K, G, G)}


def _fit_record(model):
    """What the model records of its training (``fit_info`` of a fitted model, ``training_info`` of a
    loaded one), or None."""
    info = getattr(model, "fit_info", None)
    if info is not None:
        rec = {"holdout": info.holdout, "seed": info.seed, "epochs": info.epochs, "best_epoch": info.best_epoch,
               "best_score": info.best_score, "hparams": info.hparams.to_dict(),
               "history": np.asarray(info.history, dtype=np.float64).reshape(-1, 3) if info.history else None,
               "selection": info.selection}
    else:
        rec = getattr(model, "training_info", None)
        if not isinstance(rec, Mapping):
            return None
        rec = dict(rec)
    if isinstance(rec.get("holdout"), (tuple, list)):  # joint: one entry per dataset, -1 for none (no None in h5ad)
        rec["holdout"] = np.asarray([-1 if k is None else k for k in rec["holdout"]], dtype=np.int64)
    if rec.get("best_score") is not None and not np.isfinite(rec["best_score"]):
        rec["best_score"] = None
    if rec.get("selection") is not None:
        rec["selection"] = json.dumps(rec["selection"], default=_json_default)
    return rec


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def _plain(v):
    """``v`` as what h5ad stores faithfully: dicts (None entries left out), strings, numbers, bools and
    numeric or string arrays; anything else (mixed or nested lists of dicts) as a JSON string."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items() if x is not None}
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (numbers.Integral, np.integer)):
        return int(v)
    if isinstance(v, (numbers.Real, np.floating)):
        return float(v)
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple, np.ndarray)):
        try:
            arr = np.asarray(v)
            flat = list(np.asarray(v, dtype=object).ravel())
        except ValueError:  # ragged nested lists
            return json.dumps(v, default=_json_default)
        if arr.dtype.kind in "biuf":
            return arr
        if flat and all(isinstance(s, str) for s in flat):
            return arr.astype(object)
        if arr.size == 0:
            return np.zeros(0)
        return json.dumps(v.tolist() if isinstance(v, np.ndarray) else v, default=_json_default)
    return str(v)


def transform_from_uns(entry) -> Transform:
    """The ``Transform`` recorded in ``uns[prefix]`` by ``annotate`` (also after a round trip through
    .h5ad, which turns lists into arrays)."""
    if not _is_ours(entry):
        raise ValueError("not an entry written by cellmnn.annotate (no 'format': 'cellmnn-annotate')")
    d = dict(entry["transform"])
    if d.get("feature_names") is not None:
        d["feature_names"] = [str(s) for s in np.asarray(d["feature_names"], dtype=object).ravel()]
    return Transform.from_dict(d)
