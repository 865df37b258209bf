"""Leave-one-out on simulated time courses with known dynamics: Cell-MNN beside OT-interpolate.

    python bench/simulated_courses.py [--cases ...] [--seeds 0 1] [--n-cells 300] [--set key=value ...]
                                      [--json bench/results/simulated_courses.json]

The cases are the simulated courses of ``cellmnn.data.simulate`` (stochastic differential equations
integrated by Euler-Maruyama; every snapshot an independent population): bifurcation, cycle, converging,
uneven-gaps, heavy-noise, bifurcation-5d and bifurcation-10d.

Every case has 5 snapshots (t = 0..4 unless stated); every interior snapshot is held out in turn.
Scores: exact W1 and MMD^2 (``cellmnn.leave_one_out``), mean over held-out timepoints.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cellmnn  # noqa: E402
from cellmnn.data.simulate import CASES, simulate  # noqa: E402
from cellmnn.files import check_output, json_kind, write_text_atomic  # noqa: E402

JSON_KIND = json_kind("cellmnn-simulated-courses")


def parse_set(pairs) -> dict:
    """``--set key=value ...`` as fit hyperparameters (values read as JSON, except option names)."""
    hp = {"verbose": False}
    for kv in pairs:
        k, v = kv.split("=", 1)
        hp[k] = json.loads(v) if v not in ("direct", "eigen", "auto", "cpu", "cuda", "kept_times", "future",
                                           "grid") else v
    return hp


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (data: seed 0)")
    ap.add_argument("--n-cells", type=int, default=300, help="cells per snapshot")
    ap.add_argument("--set", nargs="*", default=[], dest="hparams", help="fit hyperparameters as key=value")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.json:
        check_output(args.json, JSON_KIND, "--json")
    hp = parse_set(args.hparams)
    rows, summary = [], {}
    for case in args.cases:
        t0 = time.time()
        arrays, times = simulate(case, args.n_cells, seed=0)
        m = cellmnn.load_marginals(arrays, times=times, n_components=None)
        result = cellmnn.leave_one_out(m, seeds=args.seeds, report=False, **hp)
        s = result.summary()
        summary[case] = dict(dim=m.dim, times=times, seconds=round(time.time() - t0),
                             cell_mnn_W1=s["Cell-MNN"]["W1"], ot_interpolate_W1=s["OT-interpolate"]["W1"],
                             winners=[dict(holdout=k, cell_mnn_W1=a, ot_interpolate_W1=b, winner=w)
                                      for k, _, a, b, w in result.winners()])
        rows += [dict(r, case=case) for r in result.rows]
        ours, ot = s["Cell-MNN"]["W1"], s["OT-interpolate"]["W1"]
        wins = sum(w["winner"] == "Cell-MNN" for w in summary[case]["winners"])
        print(f"{case:<16} D={m.dim:<3} Cell-MNN W1 {ours[0]:.3f} +- {ours[1]:.3f}   OT-interpolate {ot[0]:.3f}   "
              f"Cell-MNN wins {wins} of {len(summary[case]['winners'])} holdouts   [{summary[case]['seconds']} s]",
              flush=True)
    if args.json:
        write_text_atomic(args.json, json.dumps({"format": "cellmnn-simulated-courses", "hparams": hp,
                                                 "seeds": args.seeds, "n_cells": args.n_cells,
                                                 "summary": summary, "rows": rows}, indent=1), JSON_KIND)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
