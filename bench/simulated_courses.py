"""Leave-one-out on simulated time courses with known dynamics: Cell-MNN beside OT-interpolate.

    python bench/simulated_courses.py [--cases ...] [--seeds 0 1] [--n-cells 300] [--set key=value ...]
                                      [--json bench/results/simulated_courses.json]

Each case is a stochastic differential equation dx = f(x) dt + s dW integrated by Euler-Maruyama
(step 0.01); every snapshot is an independent population (cells are destroyed by measurement),
so only the marginals carry the dynamics.  The cases:

* ``bifurcation`` (2-d): a pitchfork, dx = 2 (x - x^3) dt, dy = 0.5 dt, from x ~ N(0, 0.1^2):
  one population splits into two fates.
* ``cycle`` (2-d): a limit cycle of radius 1 turning at one radian per unit time, from a cluster
  at angle 0: the population travels most of the way round.
* ``converging`` (2-d): two starting clusters at (-2, +-1) drawn to one fate at (2, 0) at rate 0.6.
* ``uneven-gaps``: the bifurcation with snapshots at t = 0, 0.3, 1.0, 1.2, 3.0.
* ``heavy-noise``: the converging case with diffusion s = 0.6 (others 0.1).
* ``bifurcation-5d`` and ``bifurcation-10d``: the bifurcation plus 3 or 8 Ornstein-Uhlenbeck
  coordinates (rate 1, s = 0.3), all turned by a random rotation, so every coordinate mixes the
  dynamics with noise.

Every case has 5 snapshots (t = 0..4 unless stated); every interior snapshot is held out in turn.
Scores: exact W1 and MMD^2 (``cellmnn.leave_one_out``), mean over held-out timepoints.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cellmnn  # noqa: E402
from cellmnn.files import check_output, json_kind, write_text_atomic  # noqa: E402

JSON_KIND = json_kind("cellmnn-simulated-courses")
STEP = 0.01


def bifurcation(x):
    return np.stack([2.0 * (x[:, 0] - x[:, 0] ** 3), np.full(len(x), 0.5)], axis=1)


def cycle(x):
    r2 = (x ** 2).sum(axis=1, keepdims=True)
    rot = np.stack([-x[:, 1], x[:, 0]], axis=1)
    return x * (1.0 - r2) + rot


def converging(x):
    return -0.6 * (x - np.array([2.0, 0.0]))


def ou_padded(drift):
    """``drift`` on the first two coordinates, Ornstein-Uhlenbeck decay (rate 1) on the others."""
    def f(x):
        return np.concatenate([drift(x[:, :2]), -x[:, 2:]], axis=1)
    return f


def start(case, n, rng, dim):
    if case.startswith("bifurcation") or case == "uneven-gaps":
        x = np.stack([rng.normal(0.0, 0.1, n), rng.normal(0.0, 0.3, n)], axis=1)
    elif case == "cycle":
        angle, radius = rng.normal(0.0, 0.2, n), rng.normal(1.0, 0.1, n)
        x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    else:  # converging, heavy-noise
        x = np.stack([rng.normal(-2.0, 0.25, n), rng.choice([-1.0, 1.0], n) + rng.normal(0.0, 0.25, n)], axis=1)
    return np.concatenate([x, rng.normal(0.0, 0.3, (n, dim - 2))], axis=1)


CASES = {  # name: (drift, dimension, times, diffusion)
    "bifurcation": (bifurcation, 2, (0, 1, 2, 3, 4), 0.1),
    "cycle": (cycle, 2, (0, 1, 2, 3, 4), 0.1),
    "converging": (converging, 2, (0, 1, 2, 3, 4), 0.1),
    "uneven-gaps": (bifurcation, 2, (0, 0.3, 1.0, 1.2, 3.0), 0.1),
    "heavy-noise": (converging, 2, (0, 1, 2, 3, 4), 0.6),
    "bifurcation-5d": (ou_padded(bifurcation), 5, (0, 1, 2, 3, 4), 0.1),
    "bifurcation-10d": (ou_padded(bifurcation), 10, (0, 1, 2, 3, 4), 0.1),
}


def simulate(case: str, n_cells: int, seed: int, initial=None):
    """(arrays, times): one independent population of ``n_cells`` per snapshot time, each started
    from the case's initial distribution (or ``initial(n, rng)``, a 2-d case's other start) and
    integrated by Euler-Maruyama with step ``STEP``."""
    drift, dim, times, s = CASES[case]
    if initial is not None and dim != 2:
        raise ValueError(f"another initial distribution is for the 2-d cases; {case} has {dim} dimensions")
    rng = np.random.default_rng(seed)
    noise = np.full(dim, s)
    noise[2:] = 0.3  # the Ornstein-Uhlenbeck coordinates
    arrays = []
    for t in times:
        x = start(case, n_cells, rng, dim) if initial is None else initial(n_cells, rng)
        for _ in range(int(round(t / STEP))):
            x = x + drift(x) * STEP + noise * np.sqrt(STEP) * rng.standard_normal(x.shape)
        arrays.append(x)
    if dim > 2:  # mix the dynamics into every coordinate
        Q, _ = np.linalg.qr(np.random.default_rng(1000 + seed).standard_normal((dim, dim)))
        arrays = [a @ Q.T for a in arrays]
    return arrays, list(times)


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
