"""In-silico perturbation: clamp or scale genes (or directions of the model space) and push the
cells with the perturbation held along the whole path.

Semantics.  A gene's value is an affine function of the model state, x_g = c_g + a_g . z (the
transform's inverse: a_g = S W[:, g], c_g = mu_g + W[:, g] . m, ``interactions`` module docstring).
Clamping genes g_1..g_k to values v is the affine constraint C z = b (rows a_g, b_g = v_g - c_g).
At the source time each cell is moved onto the constraint by the smallest change of z (orthogonal
projection, z' = z + C^T (C C^T)^-1 (b - C z)); along the path its velocity loses the component
that would change a clamped gene, dz/ds = P A z with P = I - C^T (C C^T)^-1 C.  Because C P = 0,
every clamped gene keeps its value for the whole path, and the path is still decoded in closed
form, z(t) = expm((t - t0) P A) z', by ``local_linear_step``.  Without PCA (one model coordinate
per gene) this is the textbook clamp: the clamped gene's row of A is zeroed and its value fixed.
With PCA a gene is a direction of the model space, and the clamp also moves the genes that share
its components.

Every decoder option is perturbed the same way: an affine drift A z + b becomes P (A z + b);
re-linearised pieces read A (and b) at the perturbed path's own states from the second piece on,
each projected.  A model with a learned diffusion is perturbed on its mean path (the noise off,
for the control as for the perturbed path: for the single-piece decoder the control is its
predictive mean, ``predict_distribution``), so the shift is the change of the expected path and
holds no sampling noise.

A = A(z, t0) is the operator of the cell as observed, the one its unperturbed prediction uses:
the perturbation is read as a change of state under the cell's own linearisation, so that the
perturbed and the control path differ by the perturbation alone.  (``operator="perturbed"`` reads
A at the cell moved onto the clamp instead: on the linear ground truth of
``bench/perturbation_grn.py`` genes without targets then moved 0.74 of a true target's shift
against 0.59, and the direction of the mean shift was right on 0.86 of the true edges against
0.91; mean of three datasets.)  ``operator="population"`` gives every cell the mean operator of
the source cells, A-bar (the population's interaction matrix, as ``gene_interactions`` averages
it), for the control as for the perturbed path: a knockout then acts through A-bar's column,
which averages out what single cells' operators get wrong about it; single-piece decoders only.

* ``{"GATA1": 0.0}``: clamp the gene at that value (in the units of the data's features: a
  knockout at 0).
* ``{"GATA1": ("scale", 2.0)}``: each cell's value at the source time times 2.0, then clamped
  there (over-expression relative to the cell's own level).
* ``directions={"name": (u, value)}`` (u a vector of the model space, value a number or
  ("scale", s)): the same for the coordinate u . z.

The control is the model's own prediction of the same cells (``predict``; the mean path for a
model with a learned diffusion), so the shift is the effect of the perturbation alone.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import checks
from .cells import CHUNK
from .fate import match, two_times
from .interactions import gene_names

RANK_TOL = 1e-8  # relative singular value below which clamped directions count as dependent


@dataclass
class Perturbation:
    """The result of ``perturb``.

    ``cells``: indices (into the AnnData) of the cells pushed, those at ``source``.
    ``control`` / ``perturbed``: (n, D) predicted positions at ``target`` in model space, the mean
    over the ensemble's members; ``members_control`` / ``members_perturbed`` (members, n, D).
    ``shift``: (F,) the mean over cells of perturbed minus control in feature space (genes),
    ``shift_spread``: (F,) its standard deviation over the members (0 for one model),
    ``cell_shift``: (n, F) per cell, mean over members; ``features``: the feature names.
    ``fractions``: with ``annotation``, a DataFrame indexed by the groups at ``target`` with
    columns "control", "perturbed" and "shift" (the share of the pushed cells reaching each group,
    matched to the observed cells as ``cell_transition`` does); else None.
    """
    cells: np.ndarray
    source: float
    target: float
    control: np.ndarray
    perturbed: np.ndarray
    members_control: np.ndarray
    members_perturbed: np.ndarray
    shift: np.ndarray
    shift_spread: np.ndarray
    cell_shift: np.ndarray
    features: list
    fractions: object = None
    spec: dict = field(default_factory=dict)

    def shift_table(self):
        """``shift`` and ``shift_spread`` as a pandas DataFrame indexed by feature."""
        import pandas as pd

        return pd.DataFrame({"shift": self.shift, "spread": self.shift_spread}, index=self.features)


def _value(name, v):
    """A clamp value or ("scale", s) as ("clamp" | "scale", float)."""
    if isinstance(v, tuple) and len(v) == 2 and v[0] in ("scale", "clamp"):
        return v[0], checks.number(f"{name} {v[0]}", v[1])
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        return "clamp", checks.number(name, v)
    raise ValueError(f"{name}: give a value to clamp at (a number) or ('scale', factor); got {v!r}")


def constraints(transform, genes=None, directions=None):
    """The rows C (k, D) of the clamped directions in model space, their offsets c (k,) (the
    feature value at z = 0) and their specs [("clamp" | "scale", value)], from ``genes``
    (feature name -> spec) and ``directions`` (label -> (vector (D,), spec)); errors name the entry."""
    D = len(transform.mean)
    W = np.eye(D) if transform.pca_components is None else np.asarray(transform.pca_components, dtype=np.float64)
    mu = np.zeros(W.shape[1]) if transform.pca_mean is None else np.asarray(transform.pca_mean, dtype=np.float64)
    names = gene_names(transform, W.shape[1])
    for what, value in (("genes", genes), ("directions", directions)):
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"{what} must be a dict (name -> value), got {type(value).__name__} {value!r}")
    rows, offsets, specs = [], [], []
    for name, spec in (genes or {}).items():
        if name not in names:
            raise ValueError(f"genes: {name!r} is not among the model's {len(names)} features "
                             f"(e.g. {names[:5]})")
        g = names.index(name)
        rows.append(transform.std * W[:, g])
        offsets.append(mu[g] + W[:, g] @ transform.mean)
        specs.append(_value(f"genes[{name!r}]", spec))
    for label, entry in (directions or {}).items():
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise ValueError(f"directions[{label!r}] must be (vector, value); got {entry!r}")
        u = np.asarray(entry[0], dtype=np.float64)
        if u.shape != (D,) or not np.isfinite(u).all() or not np.any(u):
            raise ValueError(f"directions[{label!r}]: the vector must be {D} finite numbers, not all 0; "
                             f"got shape {u.shape}")
        rows.append(u)
        offsets.append(0.0)
        specs.append(_value(f"directions[{label!r}]", entry[1]))
    if not rows:
        raise ValueError("give at least one gene to perturb (genes=) or direction (directions=)")
    C = np.stack(rows)
    s = np.linalg.svd(C, compute_uv=False)
    if len(rows) > D or s[-1] <= RANK_TOL * s[0]:
        what = list(genes or {}) + [f"direction {k}" for k in directions or {}]
        raise ValueError(f"the perturbed {what} are not independent directions of the {D}-dimensional model "
                         f"space (at most {D}, and no gene a combination of the others there); perturb fewer")
    return C, np.asarray(offsets), specs


OPERATORS = ("observed", "perturbed", "population")


def clamped_push(model, z0, t0: float, t1: float, C, offsets, specs, dataset=None, operator="observed",
                 population=None) -> np.ndarray:
    """Cells ``z0`` (n, D) at ``t0`` pushed to ``t1`` with the constraints held along the path
    (module docstring), under the operator of the cell as observed, A(z0, t0), with
    ``operator="perturbed"`` of the cell moved onto the constraints, or with "population" the mean
    operator of the cells z0 for every cell (``population``, when already computed, else
    ``population_operator``): (n, D) float64."""
    if operator not in OPERATORS:
        raise ValueError(f"operator must be one of {OPERATORS}, got {operator!r}")
    z0 = np.asarray(z0, dtype=np.float64)
    current = z0 @ C.T + offsets  # (n, k) the values at the source time
    values = np.stack([np.full(len(z0), v) if kind == "clamp" else v * current[:, i]
                       for i, (kind, v) in enumerate(specs)], axis=1)
    G = np.linalg.inv(C @ C.T)
    z1 = z0 + (values - current) @ G @ C  # the smallest move onto C z + offsets = values
    P = np.eye(C.shape[1]) - C.T @ G @ C
    pop = None
    if operator == "population":
        pop = population if population is not None else population_operator(model, z0, t0, dataset)
    out = mean_path(model, z1 if operator == "perturbed" else z0, z1, t0, t1, dataset, P, pop)
    if not np.isfinite(out).all():
        raise FloatingPointError(f"the perturbed push from {t0:g} to {t1:g} gave NaN or Inf")
    return out


def population_operator(model, z, t0: float, dataset=None):
    """The mean over cells ``z`` (n, D) at ``t0`` of the model's operator A and drift offset b:
    (D, D) and (D,) or None, tensors of the model's dtype.  Single-piece decoders only (pieces read
    A along each cell's own path)."""
    if model.decoder.piece_length is not None:
        raise ValueError("operator='population' needs the single-piece decoder (piece_length=None); this model "
                         f"re-linearises every {model.decoder.piece_length} time units")
    p = next(model.parameters())
    A_sum, b_sum = None, None
    with torch.no_grad():
        for a in range(0, len(z), CHUNK):
            x = torch.as_tensor(z[a:a + CHUNK], dtype=p.dtype, device=p.device)
            t = torch.full((len(x),), float(t0), dtype=torch.float64, device=p.device)
            code = dataset if dataset is None or np.ndim(dataset) == 0 else dataset[a:a + CHUNK]
            A, b, _, _ = model.outputs(x, t, code)
            A_sum = A.double().sum(0) if A_sum is None else A_sum + A.double().sum(0)
            if b is not None:
                b_sum = b.double().sum(0) if b_sum is None else b_sum + b.double().sum(0)
    return (A_sum / len(z)).to(p.dtype), None if b_sum is None else (b_sum / len(z)).to(p.dtype)


def mean_path(model, z_read, z_start, t0: float, t1: float, dataset=None, P=None, population=None) -> np.ndarray:
    """The model's decoder from ``z_start`` (n, D) at ``t0`` to ``t1`` with the noise off, the first
    piece's operator read at ``z_read`` (n, D) (or ``population``, an (A, b) shared by every cell)
    and every drift projected by ``P`` (D, D; None: not projected, which for a deterministic model
    is ``predict`` itself): (n, D) float64."""
    p = next(model.parameters())
    Pt = None if P is None else torch.as_tensor(P, dtype=p.dtype, device=p.device)
    out = np.empty(np.shape(z_start), dtype=np.float64)
    with torch.no_grad():
        for a in range(0, len(out), CHUNK):
            x = torch.as_tensor(z_start[a:a + CHUNK], dtype=p.dtype, device=p.device)
            read = torch.as_tensor(z_read[a:a + CHUNK], dtype=p.dtype, device=p.device)
            t = torch.full((len(x),), float(t0), dtype=torch.float64, device=p.device)
            code = dataset if dataset is None or np.ndim(dataset) == 0 else dataset[a:a + CHUNK]
            if population is None:
                A, b, _, _ = model.outputs(read, t, code)
            else:
                A = population[0].expand(len(x), -1, -1)
                b = None if population[1] is None else population[1].expand(len(x), -1)
            X, _ = model(x, t, torch.full((len(x), 1), float(t1), dtype=torch.float64, device=p.device),
                         dataset=code, noise=False, first=(A, b, None), project=Pt)
            out[a:a + CHUNK] = X[:, 0].double().cpu().numpy()
    return out


def perturb(model, adata, genes, source, target, directions=None, annotation=None, rule="knn",
            k=15, time_key=None, embedding=None, marginals=None, dataset=None, operator="observed") -> Perturbation:
    """Push the cells observed at ``source`` to ``target`` with ``genes`` (and ``directions``)
    clamped or scaled along the whole path (module docstring), beside the unperturbed prediction.

    ``model``: a fitted ``CellMNN`` or a list (an ensemble: member-wise, then averaged, with the
    spread over members).  ``adata``, ``time_key``, ``embedding``, ``marginals``, ``dataset``: as
    in ``cell_transition``.  With ``annotation`` (an obs column), the share of the pushed cells
    reaching each group at ``target`` with and without the perturbation (``rule``, ``k`` as in
    ``cell_transition``).  ``operator``: "observed" (default: A of the cell as observed),
    "perturbed" (A of the cell moved onto the clamp) or "population" (the mean A of the source
    cells for every cell, control included; module docstring).  Every argument is checked
    before the model runs.
    """
    if operator not in OPERATORS:
        raise ValueError(f"operator must be one of {OPERATORS}, got {operator!r}")
    c = two_times(model, adata, annotation, source, target, rule, k, time_key, embedding, marginals, dataset)
    C, offsets, specs = constraints(c.transform, genes, directions)
    z0, zt, models = c.z_source, c.z_target, c.models
    pops = [population_operator(m, z0, c.source_time, dataset) if operator == "population" else None
            for m in models]
    ctrl = np.stack([mean_path(m, z0, z0, c.source_time, c.target_time, dataset, population=pop)
                     for m, pop in zip(models, pops)])
    if not np.isfinite(ctrl).all():
        raise FloatingPointError(f"the model pushed cells from {c.source_time:g} to {c.target_time:g} to NaN or Inf")
    pert = np.stack([clamped_push(m, z0, c.source_time, c.target_time, C, offsets, specs, dataset, operator, pop)
                     for m, pop in zip(models, pops)])
    W = np.eye(C.shape[1]) if c.transform.pca_components is None else np.asarray(c.transform.pca_components)
    to_genes = c.transform.std[:, None] * W  # (D, F): a change of z as a change of the features
    member_shift = np.einsum("mnd,df->mnf", pert - ctrl, to_genes)
    fractions = None
    if annotation is not None:
        fractions = _fractions(ctrl, pert, zt, c.target_labels, rule, c.k)
    return Perturbation(c.source_cells, c.source_time, c.target_time, ctrl.mean(0), pert.mean(0), ctrl, pert,
                        member_shift.mean(axis=(0, 1)), member_shift.mean(axis=1).std(axis=0),
                        member_shift.mean(0), gene_names(c.transform, W.shape[1]), fractions,
                        {"genes": dict(genes or {}), "directions": list(directions or {})})


def _fractions(ctrl, pert, observed, labels, rule, k):
    """Share of the pushed cells reaching each group of ``labels`` (observed cells), control and
    perturbed, mean over members."""
    import pandas as pd

    groups = sorted({v for v in labels if v is not None})
    out = {}
    for name, pushed in (("control", ctrl), ("perturbed", pert)):
        reach = np.mean([np.asarray(match(p, observed, rule, k).mean(axis=0)).ravel() for p in pushed], axis=0)
        out[name] = [float(reach[labels == g].sum()) for g in groups]
    df = pd.DataFrame(out, index=pd.Index(groups, name="group at target"))
    df["shift"] = df["perturbed"] - df["control"]
    return df
