"""Ground-truth recovery of gene interactions by Cell-MNN (D = number of genes, no PCA).

    python bench/grn_recovery.py [--cases linear krumsiek krumsiek-pca] [--seeds 0 1 2] [--ensemble 1]
                                 [--set key=value ...] [--n-cells 1000] [--linear-states 40]
                                 [--krumsiek-start uniform] [--krumsiek-times 0 1 2 3 4] [--json FILE]

The README's numbers, design 2: ``--seeds 2 3 4 --krumsiek-times 0 0.5 1 1.5 2`` with
``--cases linear krumsiek --ensemble 3 --set velocity_weight=0``, with ``--cases linear krumsiek``
(the paper's defaults), with ``--cases krumsiek-pca`` (with and without ``--set
velocity_weight=0``) and with ``--correlation-only``; design 1: ``--seeds 0 1 2 --n-cells 400
--linear-states 3 --krumsiek-start progenitor --cases linear krumsiek`` (with and without
``--set velocity_weight=0``, and ``--correlation-only``).

Two cases: a linear ODE dx/dt = M x with a random sparse signed M (10 genes), and the 11-gene
Krumsiek myeloid network in Hill form with noise (``cellmnn.analysis.grn``).  For each seed: simulate
snapshots, fit Cell-MNN on all timepoints, read J (targets x sources, gene space, averaged over all
cells) and score it against the truth: AUROC and AUPRC of |J| for edges against non-edges (off the
diagonal) and the sign accuracy on the true edges.  Both read-outs are scored: J from the operator
A (``kind="jacobian"``, the paper's) and from the Jacobian of the learned velocity field
(``kind="velocity_jacobian"``, keys prefixed ``vj_``).

A third case, ``krumsiek-pca``, runs the TRRUST-style validation the paper uses on real data, on
the Krumsiek simulation with its signed couplings written as Activation/Repression edges: PCA to
``--pca`` components and z-scoring, one model per seed, ``trrust_validation`` of the ensemble of
all seeds' models (standard metrics, the correlation reference and the paper's own
precision/recall/F1), beside untrained models.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cellmnn  # noqa: E402
from cellmnn.analysis.grn import krumsiek_network, linear_system, sample_linear, simulate_krumsiek  # noqa: E402
from cellmnn.analysis.interactions import gene_interactions  # noqa: E402
from cellmnn.files import check_output, json_kind, write_text_atomic  # noqa: E402
from cellmnn.analysis.trrust import recovery_scores  # noqa: E402

JSON_KIND = json_kind("cellmnn-grn-recovery", ("hparams", "rows", "summary"))


METRICS = ("auroc", "auprc", "sign_accuracy")


def recovered_jacobian(model, marginals, kind="jacobian"):
    """J (targets x sources, gene space) averaged over all cells: the operator A ("jacobian") or
    the Jacobian of the learned velocity field ("velocity_jacobian")."""
    genes = marginals.transform.feature_names
    inter = gene_interactions(model, marginals, genes=genes, aggregate="all", kind=kind)
    return inter.matrix(genes)


def krumsiek_pca(seed, sim, n_components):
    """The Krumsiek snapshots in gene space, reduced by PCA to ``n_components`` and z-scored."""
    genes = krumsiek_network()[0]
    _, m = simulate("krumsiek", seed, sim)
    pca = cellmnn.load_marginals([m.transform.to_features(d) for d in m.data], times=list(m.times),
                                 n_components=n_components)
    pca.transform.feature_names = list(genes)
    return pca


def trrust_rows(genes, C):
    return [(genes[j], genes[i], "Activation" if C[i, j] > 0 else "Repression")
            for i in range(len(genes)) for j in range(len(genes)) if C[i, j] != 0 and i != j]


def run_pca_case(seeds, hp, sim, n_components):
    genes, _, C = krumsiek_network()
    models, t0 = [], time.time()
    data = krumsiek_pca(seeds[0], sim, n_components)
    for seed in seeds:
        models.append(cellmnn.fit(data, seed=seed, **hp))
    seconds = round(time.time() - t0, 1)
    untrained = []  # a null reference: the same validation of freshly initialised models
    for seed in seeds:
        torch.manual_seed(seed)
        untrained.append(cellmnn.CellMNN(data.dim))
    out = dict(case="krumsiek-pca", seeds=list(seeds), n_components=n_components, seconds=seconds)
    for name, ms in (("fitted", models), ("untrained", untrained)):
        report = cellmnn.trrust_validation(ms, data, trrust_rows(genes, C))
        paper = report.paper[-1]
        out[name] = dict(report=report.format(),
                         **{k: report.overall[k] for k in ("n_edges", "sign_accuracy", "precision", "recall", "f1",
                                                           "auroc", "agreement", "n_without_cells")},
                         **{f"paper_{k}": paper[k] for k in ("tp", "fp", "tn", "fn", "precision", "recall", "f1")})
        out["correlation"] = {"sign_accuracy": report.overall["correlation_sign_accuracy"],
                              "auroc": report.overall["correlation_auroc"]}  # the same for every model set
    return out


def simulate(name, seed, sim):
    if name == "linear":
        truth = linear_system(10, seed=seed)
        return truth, sample_linear(truth, seed=seed, n_cells=sim["n_cells"], n_states=sim["linear_states"])
    _, _, truth = krumsiek_network()
    return truth, simulate_krumsiek(seed=seed, n_cells=sim["n_cells"], start=sim["krumsiek_start"],
                                    times=sim["krumsiek_times"])


def correlation_case(name, seed, sim):
    """No model: the gene-gene correlation matrix over all cells scored as J (it has no direction)."""
    truth, m = simulate(name, seed, sim)
    R = np.corrcoef(np.concatenate([m.transform.to_features(d) for d in m.data]), rowvar=False)
    return dict(case=name, seed=seed, **recovery_scores(R, truth))


def run_case(name, seed, hp, sim, ensemble=1):
    truth, m = simulate(name, seed, sim)
    t0 = time.time()
    Ja, Jv, epochs = [], [], []
    for e in range(ensemble):  # training seeds seed, seed + 100, ...: one dataset, several fits
        model = cellmnn.fit(m, seed=seed + 100 * e, **hp)
        Ja.append(recovered_jacobian(model, m))
        Jv.append(recovered_jacobian(model, m, "velocity_jacobian"))
        epochs.append(model.fit_info.epochs)
    row = dict(case=name, seed=seed, ensemble=ensemble, epochs=epochs, seconds=round(time.time() - t0, 1),
               **recovery_scores(Ja[0], truth))
    for prefix, J in (("vj_", Jv[0]), ("ens_", np.mean(Ja, 0)), ("ens_vj_", np.mean(Jv, 0))):
        scores = recovery_scores(J, truth)
        row.update({prefix + k: scores[k] for k in METRICS})
    return row


READOUTS = (("A, one model", ""), ("dv/dx, one model", "vj_"), ("A, ensemble", "ens_"),
            ("dv/dx, ensemble", "ens_vj_"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["linear", "krumsiek", "krumsiek-pca"],
                    choices=["linear", "krumsiek", "krumsiek-pca"])
    ap.add_argument("--pca", type=int, default=5, help="PCA components of the krumsiek-pca case")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", default=None)
    ap.add_argument("--set", nargs="*", default=[], dest="hparams",
                    help="fit hyperparameters as key=value (e.g. velocity_weight=0)")
    ap.add_argument("--ensemble", type=int, default=1,
                    help="models per dataset (training seeds seed, seed+100, ...); J averaged over them")
    ap.add_argument("--correlation-only", action="store_true",
                    help="no fitting: score the gene-gene correlation matrix as J (a model-free reference)")
    ap.add_argument("--n-cells", type=int, default=1000, help="cells per snapshot")
    ap.add_argument("--linear-states", type=int, default=40, help="starting states of the linear case")
    ap.add_argument("--krumsiek-start", default="uniform", choices=["uniform", "progenitor"])
    ap.add_argument("--krumsiek-times", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 4.0])
    args = ap.parse_args(argv)
    if args.json:
        check_output(args.json, JSON_KIND, "--json")
    sim = {"n_cells": args.n_cells, "linear_states": args.linear_states, "krumsiek_start": args.krumsiek_start,
           "krumsiek_times": args.krumsiek_times}
    hp = {"verbose": False}
    for kv in args.hparams:
        k, v = kv.split("=", 1)
        hp[k] = json.loads(v) if v not in ("direct", "eigen", "auto", "cpu", "cuda") else v
    rows, summary = [], {}
    if args.correlation_only:
        for case in [c for c in args.cases if c != "krumsiek-pca"]:
            rows += [correlation_case(case, seed, sim) for seed in args.seeds]
            sel = [r for r in rows if r["case"] == case]
            summary[case] = {k: (float(np.mean([r[k] for r in sel])), float(np.std([r[k] for r in sel])))
                             for k in METRICS}
            print(f"{case}: gene-gene correlation as J (no model), {len(sel)} seeds: "
                  + ", ".join(f"{k} {v[0]:.3f} +- {v[1]:.3f}" for k, v in summary[case].items()), flush=True)
        args.cases = []
    for case in [c for c in args.cases if c != "krumsiek-pca"]:
        for seed in args.seeds:
            r = run_case(case, seed, hp, sim, args.ensemble)
            rows.append(r)
            print(f"{case:<9} seed {seed}: {r['n_edges']} edges (fraction {r['edge_fraction']:.2f}), "
                  f"epochs {r['epochs']}, {r['seconds']} s", flush=True)
            for label, pre in READOUTS[: 4 if args.ensemble > 1 else 2]:
                print(f"    {label:<24} AUROC {r[pre + 'auroc']:.3f}  AUPRC {r[pre + 'auprc']:.3f}  "
                      f"sign accuracy {r[pre + 'sign_accuracy']:.3f}", flush=True)
        sel = [r for r in rows if r["case"] == case]
        summary[case] = {pre + k: (float(np.mean([r[pre + k] for r in sel])), float(np.std([r[pre + k] for r in sel])))
                         for _, pre in READOUTS[: 4 if args.ensemble > 1 else 2] for k in METRICS}
        print(f"{case}: mean +- std over {len(sel)} seeds", flush=True)
        for label, pre in READOUTS[: 4 if args.ensemble > 1 else 2]:
            m = summary[case]
            print(f"    {label:<24} AUROC {m[pre + 'auroc'][0]:.3f} +- {m[pre + 'auroc'][1]:.3f}  "
                  f"AUPRC {m[pre + 'auprc'][0]:.3f} +- {m[pre + 'auprc'][1]:.3f}  sign accuracy "
                  f"{m[pre + 'sign_accuracy'][0]:.3f} +- {m[pre + 'sign_accuracy'][1]:.3f}", flush=True)
    if "krumsiek-pca" in args.cases:
        r = run_pca_case(args.seeds, hp, sim, args.pca)
        rows.append(r)
        for name in ("fitted", "untrained"):
            print(f"krumsiek-pca: TRRUST-style validation, PCA {args.pca}, ensemble of {len(args.seeds)} "
                  f"{name} models [{r['seconds']} s]\n{r[name]['report']}\n", flush=True)

    if args.json:
        write_text_atomic(args.json, json.dumps({"format": "cellmnn-grn-recovery", "hparams": hp, "simulation": sim,
                                                 "ensemble": args.ensemble, "rows": rows, "summary": summary},
                                                indent=1), JSON_KIND)


if __name__ == "__main__":
    main()
