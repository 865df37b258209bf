"""Training throughput: cellmnn's ensemble step against the authors' formulation.

The authors' formulation (github.com/vbjan/cell-mnn, ``src/cell_mnn/model.py``), written here as
a small reference with the same MLP, batch and optimizer: each step decodes every initial cell to
every kept time with ``torch.linalg.matrix_exp``, computes each MMD term densely with
``torch.cdist`` (one call per kernel block), adds the kinetic term and takes a
``torch.optim.AdamW`` step.  Models of an ensemble are trained one after the other there.

cellmnn: ``cellmnn.train`` (E models in one step: stacked MLP, one ``local_linear_step``,
one ``laplace_mmd_loss`` for the whole loss, one fused AdamW update).

Reported per row: milliseconds per step and per-model epochs/s (E / (step time x steps per
epoch); the authors take floor(cells / batch) steps per epoch, cellmnn the ceiling) for both,
and the speedup in per-model throughput at equal work per step: E x authors' step time / ours.
Data: the embedded EMT time course for D = 3
(2,433 cells in 5 timepoints, holdout 1,2,3 rotating over members), Gaussian blobs drifting in
time with the same timepoint sizes for D = 5 and 10.  One thread unless --threads.

    python bench/bench_train.py [--quick] [--device cuda] [--json bench/results/train_<machine>.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

import cellmnn
from cellmnn.train import HParams, Member, time_unit
from cellmnn.train.layout import Setup
from cellmnn.train.step import Runner


def data(D: int):
    if D == 3:
        return cellmnn.load_marginals(None)
    emt = cellmnn.load_marginals(None)
    rng = np.random.default_rng(0)
    drift = np.linspace(1.0, -0.5, D)
    arrays = [rng.normal(0.0, 1.0, (len(d), D)) + t * drift for d, t in zip(emt.data, emt.times)]
    return cellmnn.load_marginals(arrays, times=list(emt.times))


class Authors:
    """One model trained the authors' way (see the module docstring)."""

    def __init__(self, m, holdout: int, seed: int, hp: dict, device):
        torch.manual_seed(seed)
        self.rng = torch.Generator(device="cpu").manual_seed(seed)
        self.hp, self.device = hp, device
        times = [float(t) for t in m.times]
        self.kept = [i for i in range(len(m)) if i != holdout]
        span = max(times) - min(times)
        self.model = cellmnn.CellMNN(m.dim, hp.width, hp.depth, hp.init_scale, time_offset=min(times),
                                     time_scale=span, time_unit=time_unit(times)).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        self.data = {i: torch.as_tensor(m.data[i], dtype=torch.float32, device=device) for i in self.kept}
        self.times = torch.tensor([times[i] for i in self.kept], dtype=torch.float32, device=device)
        n_src, B = len(self.kept) - 1, hp.batch_size
        self.per_src = [B // n_src + (k == n_src - 1) * (B % n_src) for k in range(n_src)]  # theirs: remainder last
        self.steps = max(1, sum(len(m.data[i]) for i in self.kept) // B)

    def sample(self, i, n):
        d = self.data[i]
        return d[torch.randint(0, len(d), (n,), generator=self.rng).to(self.device)]

    @staticmethod
    def mmd(x, y, sigma):
        D = x.shape[1]
        k = lambda a, b: torch.exp(-torch.cdist(a, b, p=1) / (D * sigma))  # noqa: E731
        return k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()

    def step(self):
        hp, B = self.hp, self.hp.batch_size
        x0 = torch.cat([self.sample(s, n) for s, n in zip(self.kept[:-1], self.per_src)])
        t0 = torch.cat([self.times[k].expand(n) for k, n in enumerate(self.per_src)])
        A = self.model.operator(x0, t0)
        dt = self.times[None, :] - t0[:, None]
        expA = torch.linalg.matrix_exp(dt[:, :, None, None] * A[:, None])
        X = (expA @ x0[:, None, :, None]).squeeze(-1)
        V = (A[:, None] @ X[..., None]).squeeze(-1)
        loss, start = 0.0, 0
        for k, n in enumerate(self.per_src):
            for r, col in enumerate(range(k + 1, len(self.kept)), start=1):
                y = self.sample(self.kept[col], B)
                loss = loss + hp.gamma ** (r - 1) * self.mmd(X[start:start + n, col], y, hp.sigma)
            start += n
        loss = loss + hp.velocity_weight * (V * self.model.time_unit).pow(2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss


def timed(fn, steps: int, repeats: int, sync):
    fn()
    sync()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        out.append((time.perf_counter() - t) / steps)
    return statistics.median(out)


def row(D, E, B, device, steps, repeats):
    m = data(D)
    hp = HParams(batch_size=B, verbose=False, device=str(device))
    members = [Member(1 + e % 3, e, hp) for e in range(E)]
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    s = Setup(m, members, device)
    runner = Runner(s, s.flat0, False)
    ours = timed(runner.step, steps, repeats, sync)
    ours_epochs = E / (ours * statistics.mean(s.steps))
    theirs_models = [Authors(m, mem.holdout, mem.seed, hp, device) for mem in members[:min(E, 3)]]
    k = iter(range(10 ** 9))
    theirs = timed(lambda: theirs_models[next(k) % len(theirs_models)].step(), steps, repeats, sync)
    theirs_epochs = 1.0 / (theirs * statistics.mean(a.steps for a in theirs_models))
    return dict(D=D, E=E, B=B, device=str(device), ours_ms_per_step=ours * 1e3, authors_ms_per_step=theirs * 1e3,
                ours_model_epochs_per_s=ours_epochs, authors_model_epochs_per_s=theirs_epochs,
                speedup=E * theirs / ours)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="E = 1 and 9, B = 200, D = 3 only")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    grid = [(3, 1, 200), (3, 9, 200)] if a.quick else \
        [(D, E, B) for B in (200, 4096) for D in (3, 5, 10) for E in (1, 9)]
    rows = []
    print(f"{'D':>3} {'E':>3} {'B':>5} {'ours ms/step':>13} {'authors ms/step':>16} {'ours ep/s/model':>16} "
          f"{'authors ep/s':>13} {'speedup':>8}", flush=True)
    for D, E, B in grid:
        steps, repeats = (20, 5) if B <= 200 else (1, 2)
        try:
            r = row(D, E, B, device, steps, repeats)
        except Exception as exc:  # recorded, and the other rows still run
            rows.append(dict(D=D, E=E, B=B, error=f"{type(exc).__name__}: {exc}"))
            print(f"{D:>3} {E:>3} {B:>5} error: {rows[-1]['error']}", flush=True)
            continue
        rows.append(r)
        print(f"{D:>3} {E:>3} {B:>5} {r['ours_ms_per_step']:>13.2f} {r['authors_ms_per_step']:>16.2f} "
              f"{r['ours_model_epochs_per_s']:>16.2f} {r['authors_model_epochs_per_s']:>13.2f} "
              f"{r['speedup']:>7.1f}x", flush=True)
    machine = dict(cpu=platform.processor() or platform.machine(), threads=a.threads, torch=torch.__version__,
                   python=sys.version.split()[0], cpu_count=os.cpu_count())
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"machine": machine, "rows": rows}, fh, indent=1)
        os.replace(tmp, a.json)
    return rows


if __name__ == "__main__":
    main()
