"""An ensemble's models trained in several worker processes on the CPU (``HParams.n_jobs``).

One process of a small ensemble leaves CPU cores idle: its steps are hundreds of small tensor
operations that torch does not spread over threads.  With ``n_jobs`` > 1 the models are dealt
out to that many worker processes (members of one joint model stay together), each a fresh
Python process with cores / n_jobs threads that trains its share as one ensemble
(``cellmnn.train.worker``, started by its module name, since this module sits below the
trainer).  A member's batches, initial weights and validation split depend on its own seed
only, so it trains to the same model in any share (up to float rounding of batched products).

Workers exchange inputs and results through files in a temporary folder this module creates and
removes; an error in a worker is raised again here with its type and message.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import torch
from tqdm.auto import tqdm

WORKER = "cellmnn.train.worker"  # the worker processes' module (python -m)


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # platforms without sched_getaffinity
        return max(1, os.cpu_count() or 1)


def n_workers(n_jobs, n_units: int) -> int:
    """Worker processes for ``n_units`` models: ``n_jobs`` (-1: every usable core; None: 1), at
    most one per model."""
    want = 1 if n_jobs is None else usable_cores() if n_jobs == -1 else int(n_jobs)
    return max(1, min(want, n_units))


def units(members: list) -> list:
    """Member indices grouped by model: the members of one joint model together, each other member
    alone (the units that ``shares`` deals out)."""
    out: dict = {}
    for i, m in enumerate(members):
        out.setdefault(("joint", m.joint) if m.joint is not None else ("member", i), []).append(i)
    return list(out.values())


def shares(members: list, k: int) -> list:
    """Member indices dealt into ``k`` shares of about equal work: members of one joint model stay
    together; largest models first, each to the share with least work so far (work: members x
    max_epochs); each share in the members' order."""
    order = sorted(units(members), key=lambda u: -len(u) * members[u[0]].hp.max_epochs)
    out, load = [[] for _ in range(k)], [0] * k
    for u in order:
        j = load.index(min(load))
        out[j] += u
        load[j] += len(u) * members[u[0]].hp.max_epochs
    return [sorted(s) for s in out if s]


def train_in_processes(marginals, members: list, k: int, desc: str | None, embed: bool) -> list:
    """``trainer.train`` of ``members`` in ``k`` worker processes; the models in member order."""
    parts = shares(members, k)
    threads = max(1, usable_cores() // len(parts))
    verbose = any(m.hp.verbose for m in members)
    # The workers import what this process imported: its module search path, in its order.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    tmp = tempfile.mkdtemp(prefix="cellmnn-workers-")
    procs = []
    try:
        for j, idx in enumerate(parts):
            job, out = os.path.join(tmp, f"job{j}.pt"), os.path.join(tmp, f"out{j}.pt")
            torch.save({"marginals": marginals, "members": [members[i] for i in idx], "embed": embed,
                        "threads": threads}, job)
            with open(os.path.join(tmp, f"log{j}.txt"), "w") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", WORKER, job, out], env=env,
                                              stdout=subprocess.DEVNULL, stderr=log))
        what = desc or f"Cell-MNN ensemble of {len(members)}"
        bar = tqdm(total=len(members), desc=f"{what} in {len(parts)} processes", disable=not verbose, leave=False,
                   unit="model")
        models = [None] * len(members)
        for j, (idx, p) in enumerate(zip(parts, procs)):
            p.wait()
            result = _read(os.path.join(tmp, f"out{j}.pt"))
            if result is None:
                with open(os.path.join(tmp, f"log{j}.txt")) as log:
                    err = log.read().strip()[-2000:]
                raise RuntimeError(f"cellmnn: a training worker process ended with exit status {p.returncode} "
                                   f"and no result: {err}")
            if "error" in result:
                raise result["error"]
            for i, model in zip(idx, result["models"]):
                models[i] = model
            bar.update(len(idx))
        bar.close()
        return models
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def _read(path: str):
    """A worker's result file (our own, written by ``worker.main``), or None if it wrote none."""
    if not os.path.exists(path):
        return None
    return torch.load(path, weights_only=False)
