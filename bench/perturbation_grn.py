"""In-silico knockouts against a known network: does ``perturb`` move a regulator's targets the way
the true network does, and does a gene without targets move nothing?

    python bench/perturbation_grn.py [--cases linear krumsiek] [--seeds 2 3 4] [--n-cells 1000]
                                     [--operator observed|perturbed] [--json bench/results/perturbation_grn.json]

Data: the ground-truth simulations of ``cellmnn.analysis.grn`` in the design where interactions
are recoverable (docs/benchmarks.md, "Gene interactions on a known ground truth", design 2): the
linear system dx/dt = M x (10 genes, 40 starting states) and the Krumsiek network (11 genes,
every gene uniform in [0, 1] at the start, snapshots every 0.5 up to t = 2); no PCA; an ensemble
of three models per dataset (training seeds 0, 1, 2, ``velocity_weight=0`` as for interactions).

Each gene in turn is knocked out (clamped at 0 along the path) in the cells of the first snapshot,
pushed to the second (0.5 time units later).  Truth: the same cells under the true dynamics with
the gene held at 0, minus without (linear: exact, expm(0.5 P M) x' - expm(0.5 M) x; Krumsiek:
``advance_krumsiek`` with the same noise for both runs).  Scores:

* edge agreement: over the true edges j -> i, the fraction where the model's per-cell shift of
  gene i points the way the true one does (positive inner product over cells);
* mean agreement: the same for the mean shift over cells;
* leaf ratio (linear; Krumsiek has no gene without targets): for a gene with no outgoing edge the
  true shift of every other gene is 0; the RMS over cells of the model's shift of the other genes,
  at its largest, over the median RMS of the model's shift of a true edge's target ("leaf ratio"),
  and over the median RMS error of the model's shift of a true edge's target against the truth
  (the model's own error where the answer is known: "leaf over edge error"); and the largest mean
  shift of another gene over its spread across the ensemble's members ("leaf mean over spread").
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cellmnn  # noqa: E402
from cellmnn.analysis.grn import (advance_krumsiek, krumsiek_network, linear_system, sample_linear,  # noqa: E402
                                  simulate_krumsiek)
from cellmnn.analysis.perturb import OPERATORS, perturb  # noqa: E402
from cellmnn.files import check_output, json_kind  # noqa: E402
from record import write_record  # noqa: E402  (bench/record.py, beside this script)

FORMAT = "cellmnn-perturbation-grn"
JSON_KIND = json_kind(FORMAT)
KRUMSIEK_TIMES = (0.0, 0.5, 1.0, 1.5, 2.0)


def as_anndata(m):
    """Marginals in gene space as an AnnData (X the genes, obs "day")."""
    import anndata
    import pandas as pd

    X = np.concatenate([m.transform.to_features(d) for d in m.data])
    t = np.repeat(np.asarray(m.times, dtype=np.float64), m.sizes)
    ad = anndata.AnnData(X.astype(np.float32), obs=pd.DataFrame({"day": t}, index=[f"c{i}" for i in range(len(t))]))
    ad.var_names = list(m.transform.feature_names)
    return ad


def true_shift(case, truth, x0, duration, j, seed):
    """The true per-cell shift (n, G) of knocking gene j out for ``duration``."""
    if case == "linear":
        from scipy.linalg import expm

        P = np.eye(len(truth))
        P[j, j] = 0.0
        x1 = x0.copy()
        x1[:, j] = 0.0
        return x1 @ expm(duration * P @ truth).T - x0 @ expm(duration * truth).T
    genes = krumsiek_network()[0]
    return (advance_krumsiek(x0, duration, clamp={genes[j]: 0.0}, seed=seed)
            - advance_krumsiek(x0, duration, seed=seed))


def score(case, truth, adata, models, src, tgt, operator="observed"):
    """Edge agreement, mean agreement and the leaf ratio for one dataset."""
    genes = list(adata.var_names)
    x0 = np.asarray(adata.X[adata.obs["day"].to_numpy() == src], dtype=np.float64)
    G = len(genes)
    edge_ok, mean_ok, edge_rms, edge_err, leaf_rms, leaf_z, per_gene = [], [], [], [], [], [], []
    for j in range(G):
        true = true_shift(case, truth, x0, tgt - src, j, seed=j)
        res = perturb(models, adata, {genes[j]: 0.0}, src, tgt, operator=operator)
        targets = [i for i in range(G) if i != j and truth[i, j] != 0]
        for i in targets:
            edge_ok.append(bool((res.cell_shift[:, i] * true[:, i]).sum() > 0))
            mean_ok.append(bool(np.sign(res.shift[i]) == np.sign(true[:, i].mean())))
            edge_rms.append(float(np.sqrt((res.cell_shift[:, i] ** 2).mean())))
            edge_err.append(float(np.sqrt(((res.cell_shift[:, i] - true[:, i]) ** 2).mean())))
        others = [i for i in range(G) if i != j]
        rms = np.sqrt((res.cell_shift[:, others] ** 2).mean(axis=0))
        if not targets:
            leaf_rms.append(float(rms.max()))
            leaf_z.append(float((np.abs(res.shift[others]) / res.shift_spread[others]).max()))
        per_gene.append(dict(gene=genes[j], targets=[genes[i] for i in targets],
                             model_rms_others=float(np.sqrt((res.cell_shift[:, others] ** 2).mean())),
                             true_rms_others=float(np.sqrt((true[:, others] ** 2).mean())),
                             max_spread=float(res.shift_spread[others].max())))
    out = dict(edges=len(edge_ok), edge_agreement=float(np.mean(edge_ok)), mean_agreement=float(np.mean(mean_ok)),
               median_edge_rms=float(np.median(edge_rms)), median_edge_error=float(np.median(edge_err)),
               leaf_genes=[g["gene"] for g in per_gene if not g["targets"]],
               per_gene=per_gene)
    if leaf_rms:
        out["leaf_max_rms"] = max(leaf_rms)
        out["leaf_ratio"] = max(leaf_rms) / float(np.median(edge_rms))
        out["leaf_over_edge_error"] = max(leaf_rms) / float(np.median(edge_err))
        out["leaf_mean_over_spread"] = max(leaf_z)
    return out


def dataset(case, seed, n_cells):
    """(truth, marginals) of one simulated dataset."""
    if case == "linear":
        M = linear_system(10, seed=seed)
        return M, sample_linear(M, seed=seed, n_cells=n_cells, n_states=40)
    return krumsiek_network()[2], simulate_krumsiek(seed=seed, n_cells=n_cells, start="uniform",
                                                    times=KRUMSIEK_TIMES)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["linear", "krumsiek"], choices=["linear", "krumsiek"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[2, 3, 4], help="data seeds")
    ap.add_argument("--n-cells", type=int, default=1000)
    ap.add_argument("--operator", choices=OPERATORS, default="observed",
                    help="where perturb reads A: the cell as observed (default) or moved onto the clamp")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.json:
        check_output(args.json, JSON_KIND, "--json")
    rows = []
    for case in args.cases:
        for seed in args.seeds:
            t0 = time.time()
            truth, m = dataset(case, seed, args.n_cells)
            models = cellmnn.fit(m, seeds=[0, 1, 2], velocity_weight=0, verbose=False)
            r = dict(case=case, seed=seed, operator=args.operator,
                     **score(case, truth, as_anndata(m), models, m.times[0], m.times[1], args.operator))
            r["seconds"] = round(time.time() - t0)
            rows.append(r)
            leaf = ""
            if "leaf_ratio" in r:
                leaf = (f"  leaf ratio {r['leaf_ratio']:.2f}, over edge error {r['leaf_over_edge_error']:.2f}, mean "
                        f"over spread {r['leaf_mean_over_spread']:.1f} ({', '.join(r['leaf_genes'])})")
            print(f"{case:<9} seed {seed}: edge agreement {r['edge_agreement']:.2f} of {r['edges']}, mean agreement "
                  f"{r['mean_agreement']:.2f}{leaf}  [{r['seconds']} s]", flush=True)
    if args.json:
        write_record(args.json, FORMAT, JSON_KIND, n_cells=args.n_cells, rows=rows)


if __name__ == "__main__":
    main()
