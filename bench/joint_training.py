"""Joint training across datasets: does training one model on two time courses help or hurt each?

    python bench/joint_training.py [--scenarios ...] [--seeds 0 1 2] [--set key=value ...]
                                   [--json bench/results/joint_training.json]

Every scenario is a pair of time courses A and B in one model space (identical, identity
transforms, so ``cellmnn.data.joint.check_joint`` accepts them).  For each dataset and each of its
interior timepoints k (every one held out in turn) and each seed, four predictions of timepoint
k are scored by exact W1 (and MMD^2) against its held-out cells, as in ``cellmnn.leave_one_out``:

* separate: Cell-MNN trained on that dataset alone without k (``leave_one_out(m)``);
* joint: one Cell-MNN trained on that dataset without k plus the other dataset whole, the loss
  the sum of both courses' losses (``leave_one_out([m_a, m_b])``);
* joint+embedding: the same with a learned dataset embedding (``dataset_embedding=True``: the
  MLP also reads the dataset's one-hot code);
* OT-interpolate: displacement interpolation of the exact OT plan between k-1 and k+1
  (deterministic; the same in every row).

Paper-default hyperparameters for every Cell-MNN (``--set`` overrides them for all), the same
seeds for every method.  Per dataset and method: mean over held-out timepoints of W1, then mean
+- std (numpy std, ddof 0) of that over seeds; plus the per-holdout W1 mean over seeds.

Verdict (joint, and joint+embedding, each against separate): a difference only when the gap of
the seed means exceeds the larger of the two seed stds: "helps" if joint's W1 is lower by more
than that, "hurts" if higher by more than that, else "no clear difference".

Scenarios:

* ``emt-sparse``: the embedded A549 EMT cells (3-d, z-scored over all cells as
  ``cellmnn.load_marginals()`` gives, t = 0..4), each timepoint's cells split at random (seed 0)
  into two halves; A = first halves at all five timepoints, B = second halves at t = 0, 2, 3, 4
  only (a sparser replicate with an interior gap).  Held out: t = 1, 2, 3 of A; t = 2, 3 of B.
* ``sim-shared``: two simulations of the pitchfork SDE of ``cellmnn.data.simulate``
  (``bifurcation``, t = 0..4, 300 cells per snapshot, diffusion 0.1).  A: bench/simulated_courses.py's
  simulation (start x ~ N(0, 0.1^2), y ~ N(0, 0.3^2), data seed 0); B: the same drift and noise
  from another start, x ~ N(0.2, 0.2^2), y ~ N(-0.5, 0.3^2) (most cells take the x = +1 fate),
  data seed 1.  Shared dynamics.
* ``sim-different``: A = the ``bifurcation`` simulation (seed 0), B = the ``converging``
  simulation (two clusters drawn to (2, 0); seed 1), both 300 cells per snapshot at t = 0..4:
  different dynamics in the same coordinates, where joint training without a dataset embedding
  is expected to hurt.

The simulated scenarios are z-scored with the mean and std pooled over all cells of A and B (per
coordinate), then both are built with ``load_marginals(..., standardize=False,
n_components=None)``; W1 is in those units (so not comparable with ``simulated_courses.json``,
which z-scores each case alone).

Measured with:

    TRITON_INTERPRET=1 OMP_NUM_THREADS=2 python bench/joint_training.py --json bench/results/joint_training.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from simulated_courses import parse_set  # noqa: E402

import cellmnn  # noqa: E402
from cellmnn.data.simulate import simulate  # noqa: E402
from cellmnn.files import check_output, json_kind, write_text_atomic  # noqa: E402

FORMAT = "cellmnn-joint-training"
JSON_KIND = json_kind(FORMAT)
N_CELLS = 300  # cells per simulated snapshot, as bench/simulated_courses.py --n-cells defaults
SPLIT_SEED = 0
MODES = ("separate", "joint", "joint_embedding", "ot_interpolate")


# ----------------------------------------------------------------------------- data

def shifted_bifurcation_start(n, rng):
    return np.stack([rng.normal(0.2, 0.2, n), rng.normal(-0.5, 0.3, n)], axis=1)


def one_space(courses):
    """[(arrays, times), ...] z-scored with the pooled mean and std of all their cells, each built
    as Marginals with identity transforms (so they share one model space)."""
    x = np.concatenate([a for arrays, _ in courses for a in arrays])
    mean, std = x.mean(axis=0), x.std(axis=0)
    return [cellmnn.load_marginals([(a - mean) / std for a in arrays], times=times, standardize=False,
                                   n_components=None) for arrays, times in courses]


def emt_sparse():
    emt = cellmnn.load_marginals()
    rng = np.random.default_rng(SPLIT_SEED)
    first, second = [], []
    for d in emt.data:
        perm = rng.permutation(len(d))
        first.append(d[perm[:len(d) // 2]])
        second.append(d[perm[len(d) // 2:]])
    times = [float(t) for t in emt.times]
    keep_b = [i for i, t in enumerate(times) if t != 1.0]
    a = cellmnn.load_marginals(first, times=times, standardize=False, n_components=None)
    b = cellmnn.load_marginals([second[i] for i in keep_b], times=[times[i] for i in keep_b], standardize=False,
                               n_components=None)
    return a, b


def sim_shared():
    return one_space([simulate("bifurcation", N_CELLS, seed=0),
                      simulate("bifurcation", N_CELLS, seed=1, initial=shifted_bifurcation_start)])


def sim_different():
    return one_space([simulate("bifurcation", N_CELLS, seed=0), simulate("converging", N_CELLS, seed=1)])


SCENARIOS = {
    "emt-sparse": (emt_sparse, "A549 EMT halves: A all of t = 0..4, B t = 0, 2, 3, 4"),
    "sim-shared": (sim_shared, "bifurcation SDE from two starts (data seeds 0 and 1)"),
    "sim-different": (sim_different, "bifurcation SDE (A) vs converging SDE (B)"),
}


# ----------------------------------------------------------------------------- scoring

def method_stats(result, method):
    """W1 and MMD mean +- std over seeds of the mean over holdouts, and per-holdout W1 means."""
    s = result.summary()[method]
    per_holdout = {}
    for r in result.rows:
        if r["method"] == method:
            per_holdout.setdefault(r["holdout"], (r["time"], []))[1].append(r["W1"])
    out = dict(W1=s["W1"], MMD=s["MMD"],
               per_holdout_W1=[dict(holdout=k, time=t, W1=float(np.mean(v))) for k, (t, v) in per_holdout.items()])
    epochs = [r["epochs"] for r in result.rows if r["method"] == method and "epochs" in r]
    if epochs:  # Cell-MNN: epochs trained (early stopping), mean over holdouts and seeds
        out["mean_epochs"] = float(np.mean(epochs))
    return out


def verdict(sep, other) -> str:
    """"helps"/"hurts" when the gap of the seed means exceeds the larger seed std, else "no clear difference"."""
    (m_s, s_s), (m_o, s_o) = sep, other
    gap = m_o - m_s
    if abs(gap) <= max(s_s, s_o):
        return "no clear difference"
    return "helps" if gap < 0 else "hurts"


def machine(hp) -> str:
    import torch

    if str(hp.get("device", "cpu")).startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} CPU"


def run_scenario(name, seeds, hp):
    build, description = SCENARIOS[name]
    datasets = build()
    out = dict(description=description, datasets={}, seconds={})
    rows = []
    results = {mode: [] for mode in MODES[:3]}
    for d, m in zip("AB", datasets):
        t0 = time.time()
        results["separate"].append(cellmnn.leave_one_out(m, seeds=seeds, report=False, **hp))
        out["seconds"][f"separate_{d}"] = round(time.time() - t0, 1)
        print(f"  {name}: separate {d} done [{out['seconds'][f'separate_{d}']} s]", flush=True)
    for mode, embed in (("joint", False), ("joint_embedding", True)):
        t0 = time.time()
        results[mode] = cellmnn.leave_one_out(list(datasets), seeds=seeds, dataset_embedding=embed, report=False,
                                              **hp)
        out["seconds"][mode] = round(time.time() - t0, 1)
        print(f"  {name}: {mode} done [{out['seconds'][mode]} s]", flush=True)
    for i, (d, m) in enumerate(zip("AB", datasets)):
        stats = {mode: method_stats(results[mode][i], "Cell-MNN") for mode in MODES[:3]}
        stats["ot_interpolate"] = method_stats(results["separate"][i], "OT-interpolate")
        for mode in ("joint", "joint_embedding"):  # the baseline does not depend on training
            assert method_stats(results[mode][i], "OT-interpolate")["W1"] == stats["ot_interpolate"]["W1"]
        out["datasets"][d] = dict(
            times=[float(t) for t in m.times], n_cells=[len(x) for x in m.data], dim=m.dim, **stats,
            verdict_joint=verdict(stats["separate"]["W1"], stats["joint"]["W1"]),
            verdict_joint_embedding=verdict(stats["separate"]["W1"], stats["joint_embedding"]["W1"]))
        for mode in MODES[:3]:
            rows += [dict(r, scenario=name, dataset=d, training=mode) for r in results[mode][i].rows
                     if r["method"] == "Cell-MNN"]
        rows += [dict(r, scenario=name, dataset=d, training="none") for r in results["separate"][i].rows
                 if r["method"] == "OT-interpolate"]
    return out, rows


def table(summary) -> str:
    f = lambda v: f"{v[0]:.3f} +- {v[1]:.3f}"  # noqa: E731
    head = (f"{'scenario':<14} {'data':<4} {'separate W1':>15} {'joint W1':>15} {'joint+emb W1':>15} {'OT W1':>7}  "
            f"{'verdict joint':<20} verdict joint+emb")
    lines = [head, "-" * len(head)]
    for name, sc in summary.items():
        for d, s in sc["datasets"].items():
            lines.append(f"{name:<14} {d:<4} {f(s['separate']['W1']):>15} {f(s['joint']['W1']):>15} "
                         f"{f(s['joint_embedding']['W1']):>15} {s['ot_interpolate']['W1'][0]:>7.3f}  "
                         f"{s['verdict_joint']:<20} {s['verdict_joint_embedding']}")
    return "\n".join(lines)


def per_holdout_table(summary) -> str:
    lines = [f"{'scenario':<14} {'data':<4} {'t':>4} {'separate':>9} {'joint':>9} {'joint+emb':>9} {'OT':>9}"]
    for name, sc in summary.items():
        for d, s in sc["datasets"].items():
            for i, h in enumerate(s["separate"]["per_holdout_W1"]):
                vals = [s[mode]["per_holdout_W1"][i]["W1"] for mode in MODES]
                lines.append(f"{name:<14} {d:<4} {h['time']:>4g} " + " ".join(f"{v:>9.3f}" for v in vals))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (every method)")
    ap.add_argument("--set", nargs="*", default=[], dest="hparams", help="fit hyperparameters as key=value")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.json:
        check_output(args.json, JSON_KIND, "--json")
    hp = parse_set(args.hparams)
    t_all = time.time()
    summary, rows = {}, []
    for name in args.scenarios:
        t0 = time.time()
        print(f"{name}: {SCENARIOS[name][1]}", flush=True)
        summary[name], r = run_scenario(name, args.seeds, hp)
        summary[name]["seconds"]["total"] = round(time.time() - t0, 1)
        rows += r
    wall = round(time.time() - t_all, 1)
    print("\nW1 per held-out timepoint (mean over seeds):")
    print(per_holdout_table(summary))
    print("\nW1: mean over held-out timepoints, mean +- std over seeds; verdicts against separate training:")
    print(table(summary))
    print(f"\nwall time {wall} s on {machine(hp)}")
    if args.json:
        write_text_atomic(args.json, json.dumps({
            "format": FORMAT, "machine": machine(hp), "threads": os.environ.get("OMP_NUM_THREADS"),
            "command": "python bench/joint_training.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "hparams": hp, "seeds": args.seeds, "n_cells_simulated": N_CELLS, "split_seed": SPLIT_SEED,
            "verdict_rule": "difference only when |gap of seed means| > max(seed std of the two); "
                            "helps = lower W1 with joint training",
            "wall_seconds": wall, "summary": summary, "rows": rows}, indent=1), JSON_KIND)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
