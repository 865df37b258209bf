"""Leave-one-out on simulated time courses with known dynamics: Cell-MNN beside OT-interpolate.

    python bench/simulated_courses.py [--cases ...] [--seeds 0 1] [--n-cells 300] [--set key=value ...]
                                      [--json bench/results/simulated_courses.json]

The cases are the simulated courses of ``cellmnn.data.simulate`` (stochastic differential equations
integrated by Euler-Maruyama; every snapshot an independent population): bifurcation, cycle, converging,
uneven-gaps, heavy-noise, bifurcation-5d and bifurcation-10d.

Every case has 5 snapshots (t = 0..4 unless stated); every interior snapshot is held out in turn.
Scores: exact W1 and MMD^2 (``cellmnn.leave_one_out``), mean over held-out timepoints.

The noise floor of a held-out snapshot: the exact W1, in the same model space, between it and an
independent re-simulation of it (same cell count, same rotation; mean over ``FLOOR_DRAWS``
re-simulations): what a perfect model of the process would score by sampling it.  Each method's
excess over the floor is reported beside its W1.

    python bench/simulated_courses.py --floor-only --results bench/results/simulated_courses.json
                                      [--json bench/results/simulated_courses_noise_floor.json]

computes only the floors and the excess of the methods recorded in an earlier ``--json`` file.
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
from cellmnn.data.simulate import CASES, simulate  # noqa: E402
from cellmnn.files import check_output, json_kind, write_text_atomic  # noqa: E402

JSON_KIND = json_kind("cellmnn-simulated-courses")
FLOOR_KIND = json_kind("cellmnn-simulated-courses-noise-floor")
FLOOR_DRAWS = 3  # re-simulations per held-out snapshot (seeds 1000, 1001, ...)


def noise_floor(case: str, n_cells: int, m, holdouts) -> dict:
    """Held-out index -> the mean W1 between the observed snapshot (data seed 0, in ``m``'s model
    space) and independent re-simulations of it."""
    out = {k: [] for k in holdouts}
    for draw in range(FLOOR_DRAWS):
        again, _ = simulate(case, n_cells, seed=1000 + draw, rotation_seed=0)
        for k in holdouts:
            out[k].append(cellmnn.wasserstein1(m.data[k], m.transform.to_model(again[k])))
    return {k: float(np.mean(v)) for k, v in out.items()}


def learned_noise(models: dict, m) -> list | None:
    """A learned diffusion in the simulator's units: per coordinate, the mean over models and over
    every observed cell of g(x, t) times the coordinate's z-score scale (None for deterministic
    models; for the rotated cases the coordinates are rotated ones)."""
    per_model = []
    for model in models.values():
        if not model.stochastic:
            return None
        p = next(model.parameters())
        x = torch.as_tensor(np.concatenate(m.data), dtype=p.dtype)
        t = torch.as_tensor(np.concatenate([np.full(len(d), tt) for d, tt in zip(m.data, m.times)]), dtype=p.dtype)
        with torch.no_grad():
            g = model.outputs(x, t)[2]
        per_model.append(g.mean(0).numpy() * m.transform.std)
    return np.mean(per_model, axis=0).tolist()


def excess_table(rows, floors: dict) -> dict:
    """Per method: mean over held-out timepoints of (W1 mean over seeds - floor), and the mean W1."""
    out = {}
    for method in sorted({r["method"] for r in rows}):
        per_k = {}
        for r in rows:
            if r["method"] == method:
                per_k.setdefault(r["holdout"], []).append(r["W1"])
        w1 = {k: float(np.mean(v)) for k, v in per_k.items()}
        out[method] = {"W1": float(np.mean(list(w1.values()))),
                       "excess": float(np.mean([w1[k] - floors[k] for k in w1]))}
    return out


def floor_only(args) -> None:
    """Floors of every case and the excess of the methods recorded in ``args.results``."""
    with open(args.results, encoding="utf-8") as fh:
        recorded = json.load(fh)
    n_cells, summary = recorded["n_cells"], {}
    for case in args.cases:
        arrays, times = simulate(case, n_cells, seed=0)
        m = cellmnn.load_marginals(arrays, times=times, n_components=None)
        rows = [r for r in recorded["rows"] if r["case"] == case]
        floors = noise_floor(case, n_cells, m, sorted({r["holdout"] for r in rows}))
        table = excess_table(rows, floors)
        summary[case] = {"floor_W1": float(np.mean(list(floors.values()))), "floors": floors, "methods": table}
        ours, ot = table["Cell-MNN"], table["OT-interpolate"]
        print(f"{case:<16} floor {summary[case]['floor_W1']:.3f}   Cell-MNN W1 {ours['W1']:.3f} (excess "
              f"{ours['excess']:.3f})   OT-interpolate {ot['W1']:.3f} (excess {ot['excess']:.3f})", flush=True)
    if args.json:
        doc = {"format": "cellmnn-simulated-courses-noise-floor", "results": args.results, "n_cells": n_cells,
               "floor_draws": FLOOR_DRAWS, "summary": summary}
        write_text_atomic(args.json, json.dumps(doc, indent=1), FLOOR_KIND)
        print(f"wrote {args.json}")


def parse_set(pairs) -> dict:
    """``--set key=value ...`` as fit hyperparameters (values read as JSON, except option names)."""
    hp = {"verbose": False}
    for kv in pairs:
        k, v = kv.split("=", 1)
        try:
            hp[k] = json.loads(v)
        except json.JSONDecodeError:  # an option name: direct, eigen, future, state, ...
            hp[k] = v
    return hp


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (data: seed 0)")
    ap.add_argument("--n-cells", type=int, default=300, help="cells per snapshot")
    ap.add_argument("--set", nargs="*", default=[], dest="hparams", help="fit hyperparameters as key=value")
    ap.add_argument("--json", default=None)
    ap.add_argument("--floor-only", action="store_true", help="only the noise floors, with --results")
    ap.add_argument("--results", default=None, help="with --floor-only: an earlier --json of this script")
    args = ap.parse_args(argv)
    if args.floor_only:
        if not args.results:
            ap.error("--floor-only needs --results FILE (an earlier --json of this script)")
        if args.json:
            check_output(args.json, FLOOR_KIND, "--json")
        return floor_only(args)
    if args.json:
        check_output(args.json, JSON_KIND, "--json")
    hp = parse_set(args.hparams)
    rows, summary = [], {}
    for case in args.cases:
        t0 = time.time()
        arrays, times = simulate(case, args.n_cells, seed=0)
        m = cellmnn.load_marginals(arrays, times=times, n_components=None)
        result, models = cellmnn.leave_one_out(m, seeds=args.seeds, report=False, return_models=True, **hp)
        s = result.summary()
        floors = noise_floor(case, args.n_cells, m, sorted({r["holdout"] for r in result.rows}))
        summary[case] = dict(dim=m.dim, times=times, seconds=round(time.time() - t0),
                             floor_W1=float(np.mean(list(floors.values()))),
                             excess=excess_table(result.rows, floors),
                             cell_mnn_W1=s["Cell-MNN"]["W1"], ot_interpolate_W1=s["OT-interpolate"]["W1"],
                             noise_scale=learned_noise(models, m),
                             winners=[dict(holdout=k, cell_mnn_W1=a, ot_interpolate_W1=b, winner=w)
                                      for k, _, a, b, w in result.winners()])
        rows += [dict(r, case=case) for r in result.rows]
        ours, ot = s["Cell-MNN"]["W1"], s["OT-interpolate"]["W1"]
        wins = sum(w["winner"] == "Cell-MNN" for w in summary[case]["winners"])
        g = summary[case]["noise_scale"]
        print(f"{case:<16} D={m.dim:<3} Cell-MNN W1 {ours[0]:.3f} +- {ours[1]:.3f}   OT-interpolate {ot[0]:.3f}   "
              f"Cell-MNN wins {wins} of {len(summary[case]['winners'])} holdouts   [{summary[case]['seconds']} s]"
              + (f"   learned noise {np.round(g, 3).tolist()} (simulated {CASES[case][3]})" if g else ""), flush=True)
        if args.json:  # after every case: a long run keeps what it has measured
            write_text_atomic(args.json, json.dumps({"format": "cellmnn-simulated-courses", "hparams": hp,
                                                     "seeds": args.seeds, "n_cells": args.n_cells,
                                                     "summary": summary, "rows": rows}, indent=1), JSON_KIND)
    if args.json:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
