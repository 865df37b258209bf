"""Training step cost and memory against dataset size (the paper's scaling protocol), in memory and from .h5ad.

Mode "inflate" (in memory): a D = 5 time course (Gaussian blobs drifting in time, 5 timepoints with
the embedded EMT file's proportions) inflated with ``cellmnn.inflate`` to n cells.
Modes reading an .h5ad of n cells (written once per size into ``--h5ad-dir`` as
``bench_scale_{n}x{genes}.h5ad``: dense float32 X of ``--genes`` genes, obsm["X_pca"] (n x 50, the
course in its first 5 columns), obs["day"] with the same proportions, rows shuffled):

  memory      ``anndata.read_h5ad(path)`` (everything in memory), then
              ``load_marginals(adata, embedding="X_pca", time_key="day")``
  backed      ``load_marginals(path, embedding="X_pca", time_key="day", backed=True)`` (obsm read in
              row chunks, X never read)
  memory_pca  ``anndata.read_h5ad(path)``, then ``load_marginals(adata, time_key="day")`` (sklearn PCA of X)
  backed_pca  ``load_marginals(path, time_key="day", backed=True)`` (exact PCA of X from row chunks)

Then, for every mode, ``cellmnn.train`` is set up for one model (B = 200, holdout 2) and timed over
training steps.  Each (mode, size) runs in its own process so that its peak resident memory (VmHWM)
is its own.  Reported: load seconds (inflate, or reading + ``load_marginals``), setup seconds (split,
pools, weights), steps/s (median of 5 repeats of 20 steps; also per CPU second), peak RSS, and the
share of the CPUs other processes kept busy meanwhile.  On a small shared machine the step rate of one
run can be off by 20% or more, also with idle CPUs: ``--rounds R`` runs everything R times, interleaved,
and reports medians; ``--wait-quiet S`` waits up to S seconds for idle CPUs before each run.

    python bench/bench_scale.py [--sizes 5000 50000 250000 1000000] [--h5ad-sizes 50000 250000 1000000]
        [--modes inflate memory backed memory_pca backed_pca] [--genes 200] [--h5ad-dir DIR]
        [--rounds 3] [--wait-quiet 0] [--json FILE]
    python bench/bench_scale.py --data-parallel [--batches 200 4096] [--rounds 3] [--json FILE]

``--data-parallel``: the step time of one model (the inflate course, 50,000 cells, holdout 2)
with the same global batch in one process of one thread, one process of two threads, and two
``torchrun`` processes (gloo) of one thread each; an epoch has the same steps in all three, so the
ratio of step times is the ratio of epoch times.  Each configuration in a fresh process; medians
over the rounds.

Without ``--h5ad-dir`` the files go to a new temporary folder, removed at the end; with it they are
kept and reused (only files with the names above are written or read there, each written atomically).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PROPORTIONS = [577, 885, 788, 754, 129]  # cells per timepoint in the embedded EMT file
DRIFT = [1.0, 0.625, 0.25, -0.125, -0.5]  # np.linspace(1.0, -0.5, 5): the course's drift per day
H5AD_MODES = ("memory", "backed", "memory_pca", "backed_pca")
EMBEDDING_WIDTH = 50


def h5ad_name(n: int, genes: int) -> str:
    return f"bench_scale_{n}x{genes}.h5ad"


def h5ad_bytes(n: int, genes: int) -> int:
    """Rough size of the file: X, obsm["X_pca"] (float32), obs (index and day)."""
    return n * (4 * genes + 4 * EMBEDDING_WIDTH + 24)


def write_h5ad(path: str, n: int, genes: int, block: int = 100_000) -> None:
    """The benchmark's .h5ad of n cells, written in blocks of rows to ``path`` via a temporary name."""
    import anndata
    import h5py
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(n)
    counts = np.floor(np.array(PROPORTIONS) / sum(PROPORTIONS) * n).astype(int)
    counts[0] += n - counts.sum()
    day = rng.permutation(np.repeat(np.arange(5.0), counts))
    loadings = rng.normal(0.0, 1.0, (5, genes)).astype(np.float32)
    gene_scale = rng.uniform(0.2, 1.0, genes).astype(np.float32)
    gene_mean = rng.uniform(0.0, 3.0, genes).astype(np.float32)
    tmp = f"{path}.tmp-{os.getpid()}"
    obsm = np.empty((n, EMBEDDING_WIDTH), dtype=np.float32)
    ad = anndata.AnnData(obs=pd.DataFrame({"day": day}, index=pd.RangeIndex(n).astype(str)),
                         var=pd.DataFrame(index=[f"gene{j}" for j in range(genes)]))
    try:
        ad.write_h5ad(tmp)  # obs and var; X and obsm are added block by block below
        with h5py.File(tmp, "a") as f:
            X = f.create_dataset("X", shape=(n, genes), dtype=np.float32)
            X.attrs["encoding-type"], X.attrs["encoding-version"] = "array", "0.2.0"
            for a in range(0, n, block):
                b = min(n, a + block)
                latent = rng.normal(0.0, 1.0, (b - a, 5)) + day[a:b, None] * np.array(DRIFT)
                obsm[a:b, :5] = latent
                obsm[a:b, 5:] = rng.normal(0.0, 0.3, (b - a, EMBEDDING_WIDTH - 5))
                noise = rng.standard_normal((b - a, genes), dtype=np.float32)
                X[a:b] = latent.astype(np.float32) @ loadings + gene_mean + gene_scale * noise
            if "obsm" in f:
                del f["obsm"]
            g = f.create_group("obsm")
            g.attrs["encoding-type"], g.attrs["encoding-version"] = "dict", "0.1.0"
            e = g.create_dataset("X_pca", data=obsm)
            e.attrs["encoding-type"], e.attrs["encoding-version"] = "array", "0.2.0"
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(mode: str, n: int, path: str | None):
    """(marginals, seconds to get them) for one mode; the libraries a mode needs are imported untimed."""
    import numpy as np

    import cellmnn

    needs = [] if mode == "inflate" else ["anndata", "h5py"]
    needs += ["sklearn.decomposition"] if mode == "memory_pca" else []
    for module in needs:
        importlib.import_module(module)
    if mode == "inflate":
        rng = np.random.default_rng(0)
        base = cellmnn.load_marginals([rng.normal(0.0, 1.0, (k, 5)) + t * np.array(DRIFT)
                                       for t, k in enumerate(PROPORTIONS)], times=[0.0, 1.0, 2.0, 3.0, 4.0])
        t0 = time.perf_counter()
        return (cellmnn.inflate(base, n, seed=0) if n > sum(PROPORTIONS) else base), time.perf_counter() - t0
    embedding = None if mode.endswith("_pca") else "X_pca"
    t0 = time.perf_counter()
    if mode.startswith("memory"):
        adata = importlib.import_module("anndata").read_h5ad(path)
        m = cellmnn.load_marginals(adata, time_key="day", embedding=embedding)
        del adata
    else:
        m = cellmnn.load_marginals(path, time_key="day", embedding=embedding, backed=True)
    return m, time.perf_counter() - t0


def peak_rss_MB() -> float:
    """This process's peak resident memory: VmHWM, the high-water mark of its own address space (unlike
    ru_maxrss, which on Linux keeps the parent's peak from before fork and exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def children_cpu_s() -> float:
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def cpu_busy_s() -> float | None:
    """CPU seconds the whole machine has been busy (all CPUs, from /proc/stat), or None."""
    try:
        with open("/proc/stat") as fh:
            f = [int(v) for v in fh.readline().split()[1:]]
        return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def wait_quiet(limit_s: float, below: float = 0.1) -> float:
    """Wait (at most limit_s) until the machine's CPUs are busy less than ``below`` over 2 s; seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        b0 = cpu_busy_s()
        if b0 is None:
            break
        time.sleep(2.0)
        if (cpu_busy_s() - b0) / (2.0 * os.cpu_count()) < below:
            break
    return time.perf_counter() - t0


def one(n: int, mode: str = "inflate", path: str | None = None) -> dict:
    import torch

    from cellmnn.train import HParams, Member
    from cellmnn.train.layout import Setup
    from cellmnn.train.step import Runner

    torch.set_num_threads(1)
    m, t_load = load(mode, n, path)
    hp = HParams(verbose=False)
    t0 = time.perf_counter()
    s = Setup(m, [Member(2, 0, hp)], torch.device("cpu"))
    runner = Runner(s, s.flat0, False)
    t_setup = time.perf_counter() - t0
    for _ in range(5):
        runner.step()
    rates, cpu_rates = [], []
    for _ in range(5):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(20):
            runner.step()
        rates.append(20 / (time.perf_counter() - t0))
        cpu_rates.append(20 / (time.process_time() - c0))
    row = dict(mode=mode, cells=int(sum(m.sizes)), load_s=t_load, setup_s=t_setup,
               steps_per_s=statistics.median(rates), steps_per_cpu_s=statistics.median(cpu_rates),
               peak_rss_MB=peak_rss_MB())
    if mode == "inflate":
        row["inflate_s"] = t_load  # the key of the first version of this file
    else:
        row.update(source=m.source.replace(os.path.dirname(path) + os.sep, ""), dim=m.dim)
    return row


def dp_one(B: int, steps: int = 20) -> dict | None:
    """Seconds per training step of one model with global batch B, in this process or, under
    torchrun, in the process group (gloo); rank 0 returns the row, other ranks None."""
    import torch
    import torch.distributed as dist

    from cellmnn.train import HParams, Member
    from cellmnn.train.layout import Setup
    from cellmnn.train.step import Runner

    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    m, _ = load("inflate", 50000, None)
    s = Setup(m, [Member(2, 0, HParams(batch_size=B, verbose=False, backend="torch"))], torch.device("cpu"))
    runner = Runner(s, s.flat0, False)
    for _ in range(3):
        runner.step()
    sync = dist.barrier if dist.is_initialized() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        runner.step()
    sync()
    step_s = (time.perf_counter() - t0) / steps
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if dist.is_initialized():
        dist.destroy_process_group()
    return dict(B=B, processes=world, threads=torch.get_num_threads(), step_s=step_s,
                epoch_s=step_s * s.steps[0]) if rank == 0 else None


DP_CONFIGS = (("1 process, 1 thread", 1, 1), ("1 process, 2 threads", 1, 2), ("2 processes, 1 thread each", 2, 1))


def data_parallel(batches, rounds: int) -> list:
    """``dp_one`` for every batch size and configuration, in fresh processes, interleaved over the
    rounds; the rows with median step and epoch times and the epoch ratio to each one-process row."""
    runs = {(B, name): [] for B in batches for name, _, _ in DP_CONFIGS}
    for _ in range(rounds):
        for B in batches:
            for name, procs, threads in DP_CONFIGS:
                launch = [sys.executable] if procs == 1 else \
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
                out = subprocess.run(launch + [__file__, "--dp-one", str(B)], capture_output=True, text=True,
                                     env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
                if out.returncode:
                    raise RuntimeError(f"{name}, B = {B}: {out.stderr.strip()[-2000:]}")
                runs[(B, name)].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for B in batches:
        one = {}
        for name, _, _ in DP_CONFIGS:
            got = runs[(B, name)]
            r = dict(got[0], config=name, step_s=statistics.median(x["step_s"] for x in got),
                     epoch_s=statistics.median(x["epoch_s"] for x in got), epoch_s_runs=[x["epoch_s"] for x in got])
            one.setdefault(name, r["epoch_s"])
            r.update({f"epoch_ratio_to_{k.replace(' ', '_').replace(',', '')}": r["epoch_s"] / v
                      for k, v in one.items() if k != name})
            rows.append(r)
            print(f"B = {B:5d}  {name:28s} step {r['step_s'] * 1e3:8.2f} ms  epoch {r['epoch_s']:7.2f} s  " +
                  "  ".join(f"{k[15:]}: {v:.2f}" for k, v in r.items() if k.startswith("epoch_ratio")), flush=True)
    return rows


def data_parallel_report(batches, rounds: int, json_path: str | None) -> None:
    """``data_parallel``, its rows written to ``json_path`` (atomically) if given."""
    rows = data_parallel(batches, rounds)
    if json_path:
        tmp = json_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"machine": f"{os.cpu_count()} cores, torch " + __import__("torch").__version__,
                       "rounds": rounds, "rows": rows}, fh, indent=1)
        os.replace(tmp, json_path)


HEADER = (f"{'mode':>10} {'cells':>9} {'load s':>8} {'setup s':>8} {'steps/s':>8} {'/CPU s':>8} "
          f"{'peak RSS MB':>12} {'others':>7}")


def line(r: dict) -> str:
    if "error" in r or "skipped" in r:
        return f"{r['mode']:>10} {r['cells']:>9} {r.get('error') or r.get('skipped')}"
    busy = r["other_cpu_busy"]
    return (f"{r['mode']:>10} {r['cells']:>9} {r['load_s']:>8.2f} {r['setup_s']:>8.2f} {r['steps_per_s']:>8.1f} "
            f"{r['steps_per_cpu_s']:>8.1f} {r['peak_rss_MB']:>12.0f} "
            f"{busy if busy is not None else float('nan'):>7.0%}")


def run(mode: str, n: int, path: str | None, wait_s: float) -> dict:
    """One (mode, size) in a process of its own: its row, with the share of the machine's CPUs that other
    processes kept busy meanwhile."""
    cmd = [sys.executable, __file__, "--one", str(n), "--mode", mode] + (["--path", path] if path else [])
    waited = wait_quiet(wait_s) if wait_s else 0.0
    b0, c0, w0 = cpu_busy_s(), children_cpu_s(), time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    b1, c1, w1 = cpu_busy_s(), children_cpu_s(), time.perf_counter()
    if out.returncode:
        return dict(mode=mode, cells=n, error=out.stderr.strip().splitlines()[-1:])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    others = None if b0 is None else ((b1 - b0) - (c1 - c0)) / ((w1 - w0) * os.cpu_count())
    r.update(other_cpu_busy=None if others is None else round(max(others, 0.0), 3), waited_s=round(waited, 1))
    return r


def combine(runs: list) -> dict:
    """One row for repeated runs of a (mode, size): median times and rates, largest peak and neighbour load."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    r = dict(ok[0])
    for key in ("load_s", "setup_s", "steps_per_s", "steps_per_cpu_s"):
        r[key] = statistics.median(x[key] for x in ok)
    r["peak_rss_MB"] = max(x["peak_rss_MB"] for x in ok)
    busy = [x["other_cpu_busy"] for x in ok if x["other_cpu_busy"] is not None]
    r["other_cpu_busy"] = max(busy) if busy else None
    r["waited_s"] = round(sum(x["waited_s"] for x in ok), 1)
    if "inflate_s" in r:
        r["inflate_s"] = r["load_s"]
    if len(runs) > 1:
        r["steps_per_s_runs"] = [x.get("steps_per_s") for x in runs]
        r["load_s_runs"] = [x.get("load_s") for x in runs]
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000, 250000, 1000000],
                   help="cells for the inflate mode")
    p.add_argument("--h5ad-sizes", type=int, nargs="+", default=[50000, 250000, 1000000],
                   help="cells for the modes reading an .h5ad")
    p.add_argument("--modes", nargs="+", default=["inflate", *H5AD_MODES], choices=["inflate", *H5AD_MODES])
    p.add_argument("--genes", type=int, default=200, help="genes (columns of the dense float32 X) in the .h5ad")
    p.add_argument("--h5ad-dir", help="where the .h5ad files are written once and reused (default: a temporary "
                                      "folder, removed at the end)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each run wait up to S seconds for other jobs to leave the CPUs idle")
    p.add_argument("--rounds", type=int, default=3,
                   help="run every (mode, size) this many times, interleaved; rows report the medians")
    p.add_argument("--json")
    p.add_argument("--data-parallel", action="store_true",
                   help="one model's epoch time in 1 process (1 and 2 threads) against 2 torchrun processes")
    p.add_argument("--batches", type=int, nargs="+", default=[200, 4096], help="global batch sizes (--data-parallel)")
    p.add_argument("--dp-one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="inflate", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.dp_one:
        row = dp_one(a.dp_one)
        if row is not None:
            print(json.dumps(row))
        return
    if a.data_parallel:
        return data_parallel_report(a.batches, a.rounds, a.json)
    if a.one:
        print(json.dumps(one(a.one, a.mode, a.path)))
        return
    h5ad_modes = [m for m in a.modes if m != "inflate"]
    folder = a.h5ad_dir or (tempfile.mkdtemp(prefix="bench_scale_") if h5ad_modes else None)
    if folder:
        os.makedirs(folder, exist_ok=True)
    jobs = [("inflate", n, None) for n in a.sizes] if "inflate" in a.modes else []
    files, rows, written = {}, [], {}
    try:
        for n in a.h5ad_sizes if h5ad_modes else []:
            path = os.path.join(folder, h5ad_name(n, a.genes))
            if not os.path.exists(path):
                need, free = h5ad_bytes(n, a.genes), shutil.disk_usage(folder).free
                if free < need + (2 << 30):
                    print(f"skipping {n} cells: the .h5ad needs about {need / 1e9:.1f} GB and {folder} has "
                          f"{free / 1e9:.1f} GB free (keeping 2 GB spare); try fewer --genes", flush=True)
                    rows.append(dict(mode="h5ad", cells=n,
                                     skipped=f"{need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free"))
                    continue
                t0 = time.perf_counter()
                write_h5ad(path, n, a.genes)
                written[n] = time.perf_counter() - t0
                print(f"wrote {path} ({os.path.getsize(path) / 1e6:.0f} MB) in {written[n]:.1f} s", flush=True)
            files[n] = (path, os.path.getsize(path) / 1e6)
            jobs += [(mode, n, path) for mode in h5ad_modes]
        runs = {job: [] for job in jobs}
        for round_ in range(a.rounds):  # the rounds interleaved, so that a slow spell spreads over the modes
            if a.rounds > 1:
                print(f"round {round_ + 1} of {a.rounds}", flush=True)
            print(HEADER, flush=True)
            for job in jobs:
                r = run(*job, a.wait_quiet)
                runs[job].append(r)
                print(line(r), flush=True)
        rows += [combine(r) for r in runs.values()]
        if a.rounds > 1:
            print(f"median over {a.rounds} rounds\n{HEADER}\n" + "\n".join(map(line, rows)), flush=True)
    finally:
        if folder and not a.h5ad_dir:
            shutil.rmtree(folder)  # the temporary folder made above
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"machine": "AMD EPYC, one thread, torch " + __import__("torch").__version__,
                       "h5ad": {"genes": a.genes, "X": "dense float32", "obsm": f"X_pca (n x {EMBEDDING_WIDTH})",
                                "file_MB": {os.path.basename(f): mb for f, mb in files.values()},
                                "write_s": {str(n): s for n, s in written.items()}},
                       "rounds": a.rounds, "rows": rows}, fh, indent=1)
        os.replace(tmp, a.json)


if __name__ == "__main__":
    main()
