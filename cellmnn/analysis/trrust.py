"""Validating gene interactions: curated TRRUST edges and networks with known ground truth.

TRRUST: for each transcription factor and each Activation/Repression edge TF -> target whose genes
are in the data, the per-cell interaction weight w_{TF->target} = J (x_TF - x*_TF)
(``gene_interactions``, averaged over an ensemble of fitted models) is compared in sign with the
curated mode.  Its sign is the sign of the regulation only in cells with the TF above x* (its mean
when the transform was fitted on these cells): below it, an activator's weight is negative.  So,
as in the paper, an edge is judged on the cells with x_TF > x*_TF: its score is the fraction of
them with w > 0 and its agreement the fraction with the curated sign.

Standard metrics, per TF and pooled, over edges with at least one such cell: an edge is called an
activation when its score exceeds 1/2; sign accuracy of those calls; precision, recall and F1 with
Activation as the positive class; AUROC of the score against the curated mode (defined when both
modes are present); mean agreement.  Beside them, a reference that needs no model: the sign and
AUROC of the TF-target Pearson correlation over the same cells in gene space (x - x*).

The paper's definitions (``TrrustReport.paper``; from the authors' validation script, labelled as
theirs): an edge is "correct" when its agreement exceeds 1/2 (no cell: not correct); then
TP = Activation edges correct, FP = Activation edges not correct, TN = Repression edges not
correct, FN = Repression edges correct; precision = TP / (TP + FP) (the sign accuracy on
Activation edges) and recall = TP / (TP + FN) (the share of activations among correct edges).
Their script scores the first 200 cells of each day; here every cell of the requested timepoints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..files import TRRUST_REPORT, write_csv_atomic
from .interactions import centered_expression, gene_interactions

TRRUST_MODES = ("Activation", "Repression", "Unknown")


def read_trrust(path) -> list:
    """(TF, target, mode) rows of a TRRUST TSV (TF, target, mode, PubMed ids), header line or not;
    a file that is not UTF-8 text or a row that is not TF, target, mode is an error naming the line."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            lines = fh.read().splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not a text file (byte {exc.object[exc.start]:#04x} at offset {exc.start} is not "
                         "UTF-8); give a TRRUST TSV (TF, target, mode, PubMed ids)") from None
    rows = []
    for n, line in enumerate(lines, start=1):
        parts = line.split("\t")
        if not line.strip():
            continue
        if len(parts) < 3:
            raise ValueError(f"{path}:{n}: expected tab-separated TF, target, mode (and PubMed ids); got {line!r}")
        tf, target, mode = (p.strip() for p in parts[:3])
        if mode not in TRRUST_MODES:
            if n == 1:  # a header line
                continue
            raise ValueError(f"{path}:{n}: mode must be one of {TRRUST_MODES}, got {mode!r}")
        rows.append((tf, target, mode))
    if not rows:
        raise ValueError(f"{path}: no TRRUST rows")
    return rows


def _check_rows(trrust) -> list:
    """TRRUST rows given in memory: (TF, target, mode) triples of strings, mode one of TRRUST_MODES."""
    try:
        rows = list(trrust)
    except TypeError:
        raise TypeError(f"trrust must be a TSV path or a list of (TF, target, mode) rows; got "
                        f"{type(trrust).__name__}") from None
    for i, row in enumerate(rows):
        if isinstance(row, str) or not hasattr(row, "__len__") or len(row) != 3 \
                or not all(isinstance(v, str) for v in row):
            raise ValueError(f"trrust[{i}] must be a (TF, target, mode) triple of strings; got {row!r}")
        if row[2] not in TRRUST_MODES:
            raise ValueError(f"trrust[{i}]: mode must be one of {TRRUST_MODES}, got {row[2]!r}")
    return [tuple(r) for r in rows]


def _precision_recall_f1(tp: int, fp: int, fn: int) -> dict:
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if tp else (0.0 if tp + fp + fn else float("nan"))
    return dict(precision=precision, recall=recall, f1=f1)


def _metrics(truth_act: np.ndarray, score: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    pred = score > 0.5
    tp = int((pred & truth_act).sum())
    fp = int((pred & ~truth_act).sum())
    fn = int((~pred & truth_act).sum())
    both = truth_act.any() and (~truth_act).any()
    return dict(n_edges=len(score), n_activation=int(truth_act.sum()), n_repression=int((~truth_act).sum()),
                sign_accuracy=float((pred == truth_act).mean()) if len(score) else float("nan"),
                **_precision_recall_f1(tp, fp, fn),
                auroc=float(roc_auc_score(truth_act, score)) if both else float("nan"))


def _paper_metrics(truth_act: np.ndarray, correct: np.ndarray) -> dict:
    tp = int((truth_act & correct).sum())
    fp = int((truth_act & ~correct).sum())
    tn = int((~truth_act & ~correct).sum())
    fn = int((~truth_act & correct).sum())
    return dict(tp=tp, fp=fp, tn=tn, fn=fn, **_precision_recall_f1(tp, fp, fn))


@dataclass
class TrrustReport:
    """Per-edge TRRUST sign checks of one or more models (``trrust_validation``), with metrics."""
    edges: list  # per edge: tf, target, mode, score, agreement, n_cells (cells with the TF above x*), correlation
    per_tf: list  # per TF: tf + standard metrics + mean agreement
    overall: dict  # pooled standard metrics; n_without_cells; correlation_sign_accuracy, correlation_auroc
    skipped_conflicting: list
    paper: list = None  # per TF and "all": the paper's TP/FP/TN/FN, precision, recall, F1

    def format(self) -> str:
        """The metrics and the edges as a printable table."""
        head = (f"{'TF':<10} {'edges':>5} {'act':>4} {'rep':>4} {'sign acc':>8} {'prec':>6} {'recall':>6} "
                f"{'F1':>6} {'AUROC':>6} {'agree':>6}")
        lines = [head]
        for r in self.per_tf + [dict(self.overall, tf="all")]:
            lines.append(f"{r['tf']:<10} {r['n_edges']:>5} {r['n_activation']:>4} {r['n_repression']:>4} "
                         f"{r['sign_accuracy']:>8.3f} {r['precision']:>6.3f} {r['recall']:>6.3f} {r['f1']:>6.3f} "
                         f"{r['auroc']:>6.3f} {r['agreement']:>6.3f}")
        lines.append(f"reference without a model, the sign of the TF-target correlation over these cells: "
                     f"sign accuracy {self.overall['correlation_sign_accuracy']:.3f}, "
                     f"AUROC {self.overall['correlation_auroc']:.3f}")
        if self.overall.get("n_without_cells"):
            lines.append(f"({self.overall['n_without_cells']} edge(s) left out: no cell has the TF above x*)")
        if self.paper:
            lines += ["", "the paper's definitions (not standard: TP/FP = Activation edges right/wrong, "
                      "TN/FN = Repression edges wrong/right)",
                      f"{'TF':<10} {'TP':>4} {'FP':>4} {'TN':>4} {'FN':>4} {'prec':>6} {'recall':>6} {'F1':>6}"]
            for r in self.paper:
                lines.append(f"{r['tf']:<10} {r['tp']:>4} {r['fp']:>4} {r['tn']:>4} {r['fn']:>4} "
                             f"{r['precision']:>6.3f} {r['recall']:>6.3f} {r['f1']:>6.3f}")
        return "\n".join(lines)

    def to_csv(self, path: str) -> None:
        """Write one row per edge (tf, target, mode, score, ...) as a CSV, atomically."""
        write_csv_atomic(path, ["tf", "target", "mode", "score", "agreement", "n_cells", "correlation"],
                         [[e["tf"], e["target"], e["mode"], f"{e['score']:.4f}", f"{e['agreement']:.4f}", e["n_cells"],
                           f"{e['correlation']:.4f}"] for e in self.edges], TRRUST_REPORT)


def trrust_validation(models, data, trrust, tfs=None, cells=None) -> TrrustReport:
    """Sign validation of TRRUST Activation/Repression edges (module docstring).

    ``models``: one fitted model or a list (an ensemble: per-cell weights are averaged);
    ``data``: the ``Marginals`` whose cells are scored; ``trrust``: a TSV path or (TF, target,
    mode) rows; ``tfs``: restrict to these TFs; ``cells``: timepoint indices (default all).
    """
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    if not models:
        raise ValueError("models is empty: give a fitted CellMNN or a list of them")
    bad = [type(m).__name__ for m in models if not callable(getattr(m, "operator", None))]
    if bad:
        raise TypeError(f"models must be fitted CellMNN models (with an operator(x, t) method); got {bad[:3]}")
    if isinstance(tfs, str):
        tfs = [tfs]
    if tfs is not None:
        tfs = list(tfs)
        if not tfs or not all(isinstance(tf, str) for tf in tfs):
            raise ValueError(f"tfs must be a non-empty list of gene names, got {tfs!r}")
    rows = read_trrust(trrust) if isinstance(trrust, (str, os.PathLike)) else _check_rows(trrust)
    names = set(data.transform.feature_names or [])
    modes, why = {}, dict(unknown=0, self=0, missing=0, other_tf=0)
    missing = set()
    for tf, tgt, mode in rows:
        if mode == "Unknown":
            why["unknown"] += 1
        elif tf == tgt:
            why["self"] += 1
        elif tf not in names or tgt not in names:
            why["missing"] += 1
            missing.update(g for g in (tf, tgt) if g not in names)
        elif tfs is not None and tf not in tfs:
            why["other_tf"] += 1
        else:
            modes.setdefault((tf, tgt), set()).add(mode)
    conflicting = sorted(k for k, v in modes.items() if len(v) > 1)
    edges = sorted(k for k, v in modes.items() if len(v) == 1)
    if not edges:
        raise ValueError(
            f"no TRRUST edge can be scored: of {len(rows)} rows, {why['unknown']} have mode Unknown, "
            f"{why['self']} are self-edges, {why['missing']} name a gene not in the data"
            + (f" (e.g. {sorted(missing)[:5]})" if missing else "")
            + (f", {why['other_tf']} have a TF not in tfs={tfs}" if tfs is not None else "")
            + f", and {len(conflicting)} pair(s) are listed as both Activation and Repression")
    weights = np.mean([gene_interactions(m, data, pairs=edges, cells=cells, aggregate=None).values
                       for m in models], axis=0)  # (cells, edges)
    truth_act = np.array([modes[e] == {"Activation"} for e in edges])
    expected = np.where(truth_act, 1.0, -1.0)
    x = centered_expression(data, [e[0] for e in edges] + [e[1] for e in edges], cells=cells)
    x_tf, x_tg = x[:, :len(edges)], x[:, len(edges):]  # (cells, edges) each
    active = x_tf > 0  # cells with the TF above x*
    n_cells = active.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = ((weights > 0) & active).sum(axis=0) / n_cells  # NaN where no cell judges the edge
        agreement = ((np.sign(weights) == expected) & active).sum(axis=0) / n_cells
    judged = n_cells > 0
    correct = judged & (np.nan_to_num(agreement) > 0.5)
    edge_rows = [dict(tf=e[0], target=e[1], mode="Activation" if a else "Repression", score=float(s),
                      agreement=float(g), n_cells=int(n))
                 for e, a, s, g, n in zip(edges, truth_act, score, agreement, n_cells)]
    per_tf, paper = [], []
    for tf in sorted({e[0] for e in edges}):
        sel = np.array([e[0] == tf for e in edges])
        use = sel & judged
        per_tf.append(dict(tf=tf, **_metrics(truth_act[use], score[use]),
                           agreement=float(agreement[use].mean()) if use.any() else float("nan")))
        paper.append(dict(tf=tf, **_paper_metrics(truth_act[sel], correct[sel])))
    # A reference that needs no model: the TF-target correlation over the same cells in gene space.
    xc, yc = x_tf - x_tf.mean(0), x_tg - x_tg.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (xc * yc).sum(0) / np.sqrt((xc ** 2).sum(0) * (yc ** 2).sum(0))
    for row, c in zip(edge_rows, corr):
        row["correlation"] = float(c)
    ref = _metrics(truth_act, (np.nan_to_num(corr) + 1) / 2)  # called an activation when corr > 0
    overall = dict(_metrics(truth_act[judged], score[judged]),
                   agreement=float(agreement[judged].mean()) if judged.any() else float("nan"),
                   n_without_cells=int((~judged).sum()),
                   correlation_sign_accuracy=ref["sign_accuracy"], correlation_auroc=ref["auroc"])
    paper.append(dict(tf="all", **_paper_metrics(truth_act, correct)))
    return TrrustReport(edge_rows, per_tf, overall, conflicting, paper)


def recovery_scores(J: np.ndarray, truth: np.ndarray) -> dict:
    """Scores of a recovered signed interaction matrix J against a signed ground truth (both
    targets x sources, zero = no edge), on off-diagonal entries: AUROC and AUPRC of |J| for edges
    against non-edges, and the sign accuracy of J on the true edges."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    J, truth = np.asarray(J, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if J.shape != truth.shape or J.ndim != 2 or J.shape[0] != J.shape[1]:
        raise ValueError(f"J and truth must be square and of one shape; got {J.shape} and {truth.shape}")
    off = ~np.eye(len(J), dtype=bool)
    edge = truth[off] != 0
    if edge.all() or not edge.any():
        raise ValueError("the ground truth needs both edges and non-edges off the diagonal")
    score = np.abs(J[off])
    return dict(auroc=float(roc_auc_score(edge, score)), auprc=float(average_precision_score(edge, score)),
                sign_accuracy=float((np.sign(J[off][edge]) == np.sign(truth[off][edge])).mean()),
                n_edges=int(edge.sum()), n_non_edges=int((~edge).sum()), edge_fraction=float(edge.mean()))
