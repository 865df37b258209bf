"""One leave-one-out split of a simulated course, every decoder variant side by side.

    python bench/decoder_variants.py CASE [--holdout 2] [--seed 0] [--variants JSON]

Fits one model per variant (``fit`` keyword arguments; default: the paper's decoder, affine,
noise + affine, pieces of 0.5 + affine, all three) without the held-out snapshot, predicts it from
the previous one and prints the exact W1, the epochs, the predicted and observed spread per
coordinate and, for a learned diffusion, its mean over the observed cells in the simulator's units.
A quick look at one split: ``simulated_courses.py`` is the measurement (every holdout, seeds).

``--cost``: instead, the time per training epoch of each variant (all snapshots, 20 epochs after
one warm-up fit of 2, one thread; the median of three runs) and its ratio to the first variant's.
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

VARIANTS = [{}, {"affine": True}, {"noise": "state", "affine": True}, {"piece_length": 0.5, "affine": True},
            {"piece_length": 0.5, "noise": "state", "affine": True}]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", choices=list(CASES))
    ap.add_argument("--holdout", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", type=json.loads, default=VARIANTS, help="a JSON list of fit keyword dicts")
    ap.add_argument("--cost", action="store_true", help="time per training epoch instead of W1")
    args = ap.parse_args(argv)
    arrays, times = simulate(args.case, 300, seed=0)
    m = cellmnn.load_marginals(arrays, times=list(times))
    if args.cost:
        return cost(m, args.variants)
    k = args.holdout
    x = torch.as_tensor(np.concatenate(m.data), dtype=torch.float32)
    t = torch.as_tensor(np.concatenate([np.full(len(d), tt) for d, tt in zip(m.data, m.times)]), dtype=torch.float32)
    for kw in args.variants:
        model = cellmnn.fit(m, holdout=k, seed=args.seed, verbose=False, **kw)
        pred = model.predict(m.data[k - 1], times[k - 1], times[k])
        with torch.no_grad():
            g = model.outputs(x, t)[2]
        noise = None if g is None else (g.mean(0).numpy() * m.transform.std).round(3).tolist()
        print(f"{json.dumps(kw):<55} W1 {cellmnn.wasserstein1(pred, m.data[k]):.3f}  epochs {model.fit_info.epochs}  "
              f"spread {pred.std(0).round(3).tolist()} (observed {m.data[k].std(0).round(3).tolist()})"
              + (f"  noise {noise}" if noise else ""), flush=True)


def cost(m, variants) -> None:
    """Seconds per training epoch of each variant (module docstring)."""
    torch.set_num_threads(1)
    fast = dict(check_every=10, patience=100, verbose=False)
    base = None
    for kw in variants:
        cellmnn.fit(m, seed=0, max_epochs=2, **fast, **kw)
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            cellmnn.fit(m, seed=0, max_epochs=20, **fast, **kw)
            runs.append((time.perf_counter() - t0) / 20)
        per = float(np.median(runs))
        base = base or per
        print(f"{json.dumps(kw):<55} {1000 * per:7.1f} ms per epoch   {per / base:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
