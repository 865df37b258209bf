"""Can the validation score choose the decoder?  Leave-one-out models of each decoder variant on
every dataset, with each model's held-out W1 beside its validation score (the early-stopping
criterion: the objective's MMD part on the cells of the kept timepoints held back from training),
and the W1 that choosing by that score would give.

    python bench/decoder_selection.py [--datasets emt3d emt10d bifurcation ...] [--seeds 0 1]
                                      [--json bench/results/decoder_selection.json]

Datasets: the EMT files (3-d, the package's own; 10-d in 5 components from ``--emt10d``, by
default the development data beside the project, ../shared/data/emt_a549_10d.csv; seeds 0-2 unless
--seeds) and the seven
simulated courses of bench/simulated_courses.py (data seed 0, 300 cells per snapshot; seeds 0-1).
Variants: the paper's decoder and noise + affine (docs/decoders.md).  Two rules, per dataset:
"per split" keeps, for every (held-out timepoint, seed), the variant with the lower validation
score (what a user who fits both and keeps the better-validated one gets); "per dataset" keeps the
variant with the lower mean validation score.  "oracle" picks by the held-out W1 itself.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cellmnn  # noqa: E402
from cellmnn.data.simulate import CASES, simulate  # noqa: E402
from cellmnn.files import check_output, json_kind  # noqa: E402
from record import write_record  # noqa: E402  (bench/record.py, beside this script)

FORMAT = "cellmnn-decoder-selection"
JSON_KIND = json_kind(FORMAT)
VARIANTS = {"paper": {}, "noise+affine": dict(noise="state", affine=True)}
EMT_10D = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "emt_a549_10d.csv")


def dataset(name: str, emt10d: str = EMT_10D):
    """(marginals, default seeds) of a dataset name."""
    if name == "emt3d":
        return cellmnn.load_marginals(None), [0, 1, 2]
    if name == "emt10d":
        return cellmnn.load_marginals(emt10d, n_components=5), [0, 1, 2]
    arrays, times = simulate(name, 300, seed=0)
    return cellmnn.load_marginals(arrays, times=times, n_components=None), [0, 1]


def rules(rows: list) -> dict:
    """Mean W1 of each variant and of the selection rules (module docstring)."""
    splits = {}
    for r in rows:
        splits.setdefault((r["holdout"], r["seed"]), {})[r["variant"]] = r
    names = list(VARIANTS)
    mean_val = {v: float(np.mean([r["val"] for r in rows if r["variant"] == v])) for v in names}
    out = {v: float(np.mean([r["W1"] for r in rows if r["variant"] == v])) for v in names}
    by_val = [s[min(names, key=lambda v: s[v]["val"])] for s in splits.values()]
    out["per split"] = float(np.mean([r["W1"] for r in by_val]))
    out["per split picks"] = {v: sum(r["variant"] == v for r in by_val) for v in names}
    out["per dataset"] = out[min(names, key=mean_val.get)]
    out["oracle"] = float(np.mean([min(s[v]["W1"] for v in names) for s in splits.values()]))
    out["mean validation"] = mean_val
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["emt3d", "emt10d", *CASES],
                    choices=["emt3d", "emt10d", *CASES])
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default per dataset)")
    ap.add_argument("--emt10d", default=EMT_10D, help="the 10-d EMT file (emt_a549_10d.csv)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if "emt10d" in args.datasets and not os.path.isfile(args.emt10d):
        ap.error(f"--emt10d: no file at {args.emt10d} (the dataset emt10d needs it)")
    if args.json:
        check_output(args.json, JSON_KIND, "--json")
    torch.set_num_threads(1)  # one thread per process (run parts side by side, one per core)
    results = {}
    for name in args.datasets:
        m, seeds = dataset(name, args.emt10d)
        seeds = args.seeds or seeds
        rows, t0 = [], time.time()
        for variant, kw in VARIANTS.items():
            res, models = cellmnn.leave_one_out(m, seeds=seeds, baseline=False, report=False, return_models=True,
                                                verbose=False, **kw)
            rows += [dict(variant=variant, holdout=r["holdout"], seed=r["seed"], W1=r["W1"],
                          val=models[(r["holdout"], r["seed"])].fit_info.best_score) for r in res.rows]
        results[name] = dict(seeds=seeds, seconds=round(time.time() - t0), rules=rules(rows), rows=rows)
        s = results[name]["rules"]
        print(f"{name:<16} " + "  ".join(f"{k} {s[k]:.3f}" for k in (*VARIANTS, "per split", "per dataset", "oracle"))
              + f"   picks {s['per split picks']}", flush=True)
        if args.json:  # after every dataset: a long run keeps what it has measured
            write_record(args.json, FORMAT, JSON_KIND, variants=VARIANTS, results=results)


if __name__ == "__main__":
    main()
