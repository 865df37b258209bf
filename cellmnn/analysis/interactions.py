"""Gene interactions read back from the learned operator A(x, t).

Mapping to gene space.  The data transform is z = S^-1 (W (x - mu) - m) (``Transform``: PCA
loadings W (D x G, orthonormal rows), PCA mean mu, z-score mean m and std S = diag(s); W = I,
mu = 0 without PCA).  Its inverse on the PCA subspace is x = mu + W^T (S z + m).  In model space
a cell moves as dz/dt = A z, so in gene space

    dx/dt = W^T S A z = J (x - x*),     J = W^T S A S^-1 W,     x* = mu + W^T m,

where x* is the gene-space image of the model-space origin (where the local velocity vanishes).
The interaction weight of gene j on gene i in a cell is the j-th term of that sum,

    w_{j->i} = J_ij (x_j - x*_j) = (u_i^T A v_j) (u_j . z),      u = S W[:, .],  v = S^-1 W[:, .],

so the weights of all genes j on gene i add up to the cell's velocity of gene i.  (The paper uses
J = W A W^T and J_ij x_j, ignoring the z-scoring and the PCA mean.)  Only the requested entries
are computed: per cell D x |sources| numbers, never genes x genes.

``kind="velocity_jacobian"`` reads the Jacobian of the learned velocity field instead of A: in
model space v(z, t) = A(z, t) z has Jacobian dv/dz = A + (dA/dz) z, mapped to gene space the same
way, W^T S (dv/dz) S^-1 W.  For a linear system the two agree; for nonlinear dynamics A(x) is a
secant (A(x) z = v(z)) and dv/dz is the local sensitivity d(dx_i/dt)/dx_j that network edges
describe.  It costs D backward passes per batch of cells.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.marginals import Transform
from ..files import INTERACTIONS, write_csv_atomic

AGGREGATES = ("timepoint", "all", None)
KINDS = ("weight", "jacobian", "velocity_jacobian")


@dataclass
class Interactions:
    """Interaction values for ``pairs`` (source gene, target gene).

    ``values``: (n_cells, P) per cell if ``aggregate`` is None, (K, P) means per timepoint
    (``times``) for "timepoint", (P,) for "all"; ``positive`` the matching fraction of cells
    with a positive value (per cell: 1 or 0).  ``kind``: "weight" (J_ij (x_j - x*_j)),
    "jacobian" (J_ij) or "velocity_jacobian" (the gene-space Jacobian of the velocity field).
    """
    pairs: list
    values: np.ndarray
    positive: np.ndarray
    aggregate: str | None
    kind: str
    times: np.ndarray
    n_cells: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def matrix(self, genes):
        """The aggregated values over all cells as a (targets x sources) table for ``genes``."""
        vals = self.values if self.values.ndim == 1 else self.values.mean(axis=0)
        idx = {p: k for k, p in enumerate(self.pairs)}
        M = np.full((len(genes), len(genes)), np.nan)
        for a, tgt in enumerate(genes):
            for b, src in enumerate(genes):
                if (src, tgt) in idx:
                    M[a, b] = vals[idx[(src, tgt)]]
        return M

    def to_csv(self, path: str) -> None:
        """Write the values as a CSV (one row per pair, and per timepoint or cell), atomically."""
        rows = []
        if self.aggregate == "timepoint":
            for k, t in enumerate(self.times):
                for p, (s, g) in enumerate(self.pairs):
                    rows.append([s, g, f"{t:g}", int(self.n_cells[k]), f"{self.values[k, p]:.6g}",
                                 f"{self.positive[k, p]:.4f}"])
            header = ["source", "target", "time", "n_cells", f"mean_{self.kind}", "fraction_positive"]
        elif self.aggregate == "all":
            for p, (s, g) in enumerate(self.pairs):
                rows.append([s, g, int(self.n_cells.sum()), f"{self.values[p]:.6g}", f"{self.positive[p]:.4f}"])
            header = ["source", "target", "n_cells", f"mean_{self.kind}", "fraction_positive"]
        else:
            for c in range(self.values.shape[0]):
                for p, (s, g) in enumerate(self.pairs):
                    rows.append([c, f"{self.times[c]:g}", s, g, f"{self.values[c, p]:.6g}"])
            header = ["cell", "time", "source", "target", self.kind]
        write_csv_atomic(path, header, rows, INTERACTIONS)


def gene_names(transform, G) -> list:
    """The transform's feature names when it has G of them, else x1..xG."""
    names = transform.feature_names if transform is not None and transform.feature_names else None
    return list(names) if names is not None and len(names) == G else [f"x{i + 1}" for i in range(G)]


def _loadings(data, transform):
    """The transform (default ``data.transform``), its loadings W (D x G, float64; the identity
    without PCA) and the gene names."""
    transform = data.transform if transform is None else transform
    W = np.eye(data.dim) if transform.pca_components is None else np.asarray(transform.pca_components, dtype=np.float64)
    return transform, W, gene_names(transform, W.shape[1])


def model_transform(model):
    """The transform a model was fitted with: ``model.transform`` (loaded models) or the record
    ``fit`` attaches; None when unknown."""
    tr = getattr(model, "transform", None)
    if tr is None and (getattr(model, "marginals_info", None) or {}).get("transform"):
        tr = Transform.from_dict(model.marginals_info["transform"])
    return tr


def _check_same_space(model, transform):
    """Refuse data mapped by another transform than the model's: its model space means other genes."""
    own = model_transform(model)
    if own is not None and not own.same_as(transform):
        raise ValueError("the data were mapped with another transform (features, PCA or z-score) than the model "
                         "was fitted with; map raw data with model.transform (its align and to_model)")


def _check_genes(index, genes):
    missing = [g for g in genes if g not in index]
    if missing:
        raise ValueError(f"genes not in the data: {missing[:10]}")


def _resolve_pairs(names, genes, pairs):
    if (genes is None) == (pairs is None):
        raise ValueError("give exactly one of genes= (a block of genes) or pairs= ((source, target) pairs)")
    index = {g: i for i, g in enumerate(names)}
    if genes is not None:
        _check_genes(index, genes)
        pairs = [(s, t) for t in genes for s in genes]
    else:
        pairs = [tuple(p) for p in pairs]
        bad = [p for p in pairs if len(p) != 2]
        if bad:
            raise ValueError(f"pairs must be (source, target) couples; got {bad[:3]}")
        _check_genes(index, sorted({g for p in pairs for g in p}))
    if not pairs:
        raise ValueError("no gene pairs requested")
    return pairs, [index[s] for s, _ in pairs], [index[t] for _, t in pairs]


def centered_expression(data, genes, cells=None, transform=None) -> np.ndarray:
    """x_j - x*_j = (W^T S z)_j for ``genes`` (names, repeats allowed) of every cell of timepoints
    ``cells`` (default all), in the order ``gene_interactions(..., aggregate=None)`` lists cells:
    (n_cells, len(genes)), float64.  x* is the gene-space image of the model-space origin
    (module docstring): each gene's mean when the transform was fitted on these cells."""
    transform, W, names = _loadings(data, transform)
    index = {g: i for i, g in enumerate(names)}
    _check_genes(index, genes)
    ks = _timepoints(data, cells)
    U = np.asarray(transform.std, dtype=np.float64)[:, None] * W[:, [index[g] for g in genes]]
    return np.concatenate([np.asarray(data.data[k], dtype=np.float64) @ U for k in ks])


def _operator(model, z, t, dataset):
    """``model.operator``; ``dataset`` only when given (any object with ``operator(z, t)`` works)."""
    return model.operator(z, t) if dataset is None else model.operator(z, t, dataset=dataset)


def _velocity_jacobian(model, z, t, dataset=None):
    """dv/dz (n, D, D) of v(z, t) = A(z, t) z, one backward pass per output dimension (cells are
    independent, so the gradient of a column sum gives every cell's row)."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        v = torch.einsum("bde,be->bd", _operator(model, z, t, dataset), z)
        rows = [torch.autograd.grad(v[:, d].sum(), z, retain_graph=d + 1 < v.shape[1])[0]
                for d in range(v.shape[1])]
    return torch.stack(rows, dim=1)


def _timepoints(data, cells):
    ks = list(range(len(data))) if cells is None else [int(k) for k in cells]
    if any(not 0 <= k < len(data) for k in ks) or not ks:
        raise ValueError(f"cells must be timepoint indices in [0, {len(data)}); got {cells!r}")
    return ks


@torch.no_grad()
def gene_interactions(model, data, genes=None, pairs=None, cells=None, aggregate="timepoint",
                      kind="weight", transform=None, batch_size=4096, dataset=None) -> Interactions:
    """Per-cell gene interactions of a fitted model, aggregated on request.

    Args:
        model: a fitted ``CellMNN``.
        data: ``Marginals`` (model space) whose cells are scored.
        genes: a block of genes (all ordered pairs among them), or
        pairs: (source, target) gene pairs; gene names are the transform's feature names.
        cells: timepoint indices to include (default: all).
        aggregate: "timepoint" (mean per timepoint), "all" (mean over cells) or None (per cell).
        kind: "weight" for w_{j->i} = J_ij (x_j - x*_j), "jacobian" for J_ij, "velocity_jacobian"
            for d(dx_i/dt)/dx_j of the learned velocity field (module docstring).
        transform: the data transform (default: ``data.transform``).
        dataset: for a model trained jointly with a dataset embedding, the dataset the cells
            belong to (``CellMNN.predict``).
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    genes = [genes] if isinstance(genes, str) else genes
    transform, W, names = _loadings(data, transform)
    _check_same_space(model, transform)
    if W.shape[0] != data.dim or W.shape[0] != model.dim:
        raise ValueError(f"the transform maps to {W.shape[0]} dimensions; the data have {data.dim} "
                         f"and the model {model.dim}")
    pairs, src, tgt = _resolve_pairs(names, genes, pairs)
    ks = _timepoints(data, cells)

    p = next(model.parameters())
    s = np.asarray(transform.std, dtype=np.float64)
    u_src = torch.as_tensor(s[:, None] * W[:, src], dtype=p.dtype, device=p.device)  # (D, P): u_j
    u_tgt = torch.as_tensor(s[:, None] * W[:, tgt], dtype=p.dtype, device=p.device)  # (D, P): u_i
    v_src = torch.as_tensor(W[:, src] / s[:, None], dtype=p.dtype, device=p.device)  # (D, P): v_j
    per_t, pos_t, counts, all_vals, all_times = [], [], [], [], []
    for k in ks:
        z_all = torch.as_tensor(np.asarray(data.data[k]), dtype=p.dtype, device=p.device)
        total = torch.zeros(len(pairs), dtype=torch.float64, device=p.device)
        positive = torch.zeros(len(pairs), dtype=torch.float64, device=p.device)
        for a in range(0, len(z_all), batch_size):
            z = z_all[a:a + batch_size]
            t = torch.full((len(z),), float(data.times[k]), dtype=p.dtype, device=p.device)
            A = (_operator(model, z, t, dataset) if kind != "velocity_jacobian"
                 else _velocity_jacobian(model, z, t, dataset))
            J = torch.einsum("dp,bde,ep->bp", u_tgt, A, v_src)  # (n, P): u_i^T A v_j
            vals = J * (z @ u_src) if kind == "weight" else J
            total += vals.double().sum(0)
            positive += (vals > 0).double().sum(0)
            if aggregate is None:
                all_vals.append(vals.double().cpu().numpy())
                all_times.append(np.full(len(z), float(data.times[k])))
        counts.append(len(z_all))
        per_t.append((total / len(z_all)).cpu().numpy())
        pos_t.append((positive / len(z_all)).cpu().numpy())
    counts = np.asarray(counts)
    times = np.asarray([float(data.times[k]) for k in ks])
    if aggregate is None:
        vals = np.concatenate(all_vals)
        return Interactions(pairs, vals, (vals > 0).astype(np.float64), None, kind, np.concatenate(all_times), counts)
    per_t, pos_t = np.stack(per_t), np.stack(pos_t)
    if aggregate == "timepoint":
        return Interactions(pairs, per_t, pos_t, "timepoint", kind, times, counts)
    w = counts / counts.sum()
    return Interactions(pairs, w @ per_t, w @ pos_t, "all", kind, times, counts)
