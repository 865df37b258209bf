"""Training step cost against dataset size (the paper's scaling protocol, in memory).

For each size: a D = 5 time course (Gaussian blobs drifting in time, 5 timepoints with the
embedded EMT file's proportions) inflated with ``cellmnn.inflate`` to n cells, then
``cellmnn.ensemble`` set up for one model (B = 200, holdout 2) and timed over training steps.
Each size runs in its own process so that its peak resident memory (``ru_maxrss``) is its own.
Reported: setup seconds (split, pools, weights), steps/s (median of 5 repeats of 20 steps),
peak RSS.  The data are held in memory; reading a backed ``.h5ad`` by index is not implemented.

    python bench/bench_scale.py [--sizes 5000 50000 250000 1000000] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def one(n: int) -> dict:
    import numpy as np
    import torch

    import cellmnn
    from cellmnn.ensemble import Member, _Runner, _Setup
    from cellmnn.train import DEFAULTS

    torch.set_num_threads(1)
    sizes = np.array([577, 885, 788, 754, 129])
    rng = np.random.default_rng(0)
    drift = np.linspace(1.0, -0.5, 5)
    base = cellmnn.load_marginals([rng.normal(0.0, 1.0, (k, 5)) + t * drift for t, k in enumerate(sizes)],
                                  times=[0.0, 1.0, 2.0, 3.0, 4.0])
    t0 = time.perf_counter()
    m = cellmnn.inflate(base, n, seed=0) if n > sum(sizes) else base
    t_inflate = time.perf_counter() - t0
    hp = dict(DEFAULTS, verbose=False)
    t0 = time.perf_counter()
    s = _Setup(m, [Member(2, 0, hp)], torch.device("cpu"))
    runner = _Runner(s, s.flat0, False)
    t_setup = time.perf_counter() - t0
    for _ in range(5):
        runner.step()
    rates = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(20):
            runner.step()
        rates.append(20 / (time.perf_counter() - t0))
    return dict(cells=int(sum(m.sizes)), inflate_s=t_inflate, setup_s=t_setup, steps_per_s=statistics.median(rates),
                peak_rss_MB=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000, 250000, 1000000])
    p.add_argument("--json")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one)))
        return
    rows = []
    print(f"{'cells':>9} {'inflate s':>10} {'setup s':>8} {'steps/s':>8} {'peak RSS MB':>12}", flush=True)
    for n in a.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(n)], capture_output=True, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
        if out.returncode:
            rows.append(dict(cells=n, error=out.stderr.strip().splitlines()[-1:]))
            print(f"{n:>9} error: {rows[-1]['error']}", flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{r['cells']:>9} {r['inflate_s']:>10.2f} {r['setup_s']:>8.2f} {r['steps_per_s']:>8.1f} "
              f"{r['peak_rss_MB']:>12.0f}", flush=True)
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"machine": "AMD EPYC, one thread, torch " + __import__("torch").__version__, "rows": rows},
                      fh, indent=1)
        os.replace(tmp, a.json)


if __name__ == "__main__":
    main()
