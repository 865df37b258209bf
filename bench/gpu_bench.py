"""One call on a GPU machine: correctness, then the target rows, then sweeps, under one deadline.

    python bench/gpu_bench.py --out "$OUT" [--deadline 420] [--test-timeout 90]
    python bench/gpu_bench.py --dry-run --out /tmp/x    # CPU rehearsal: interpreter tests, tiny sizes

(A rehearsal with the GPU machines' pair, torch 2.11 and triton 3.6, needs numpy < 2.4 for that
triton's interpreter: with numpy 2.4 its run-time loops fail on array-to-scalar conversion.)

Order of work (everything is written to gpu_bench.json / gpu_bench.md under --out and printed,
flushed, after every row, so a crash or a kill loses at most the row in progress):

1. environment: device, torch/triton versions, what imported (pykeops is optional);
2. correctness: a subset of the triton op tests in a pytest subprocess, compiled kernels, capped
   at --test-timeout seconds (pytest, hypothesis and numpy are imported there and nowhere else);
3. copy bandwidth (device-to-device copy of 1 GiB, do_bench median): the roofline's denominator;
4. the target rows: local_linear_step fwd+bwd at B*T = 1e6, D = 5 (triton and reference), the
   SDE step (local_linear_sde_step, mean + L eps, covariance by the triton kernels) fwd+bwd at the
   same size, the triton forward at B*T = 1e7, D = 5 (fraction of copy bandwidth), laplace_mmd
   fwd+bwd at N = M = 8192 (triton and the dense reference);
5. the compiled kernels' real registers and spills, and the anchor-level statistics of the
   benchmark input (A = randn/sqrt(D), dt ~ U[0, 4], T = 16);
6. training (``bench/bench_train.py``'s rows on the device): an ensemble step (E = 9, B = 200,
   D = 3) eager and replayed from a CUDA graph against the authors' formulation; whether graph
   replays train the same weights as eager steps; whether a step as a graph captures it (the
   step's backward sizing its scratch without a host read) runs under
   ``torch.cuda.set_sync_debug_mode("error")`` (no host synchronisation); the kernels, copies and
   fills one eager step puts on the GPU (the CUDA profiler: the device's own count of what
   ``bench/bench_step_ops.py --path gpu`` counts on the CPU);
7. sweeps: local_linear_step B*T from 1e3 to 1e7, D in {5, 16, 64}; laplace_mmd N up to 1e6.

Every row's cost is predicted before it starts (from the previous size of the same series, or a
first guess) and the row is skipped if it would pass the deadline; every exception is caught and
recorded with its row.  Exit status 1 if the correctness step failed or timed out, else 0.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)  # bench_train

MEM_LIMIT = 0.6  # fraction of device memory a single row may plan to use
COMPILE_S = 40.0  # allowance for a first call that compiles a kernel (sm_90, D = 5 backward ~ 20 s)
TEST_SELECTION = ("bit_for_bit or capturing or (triton and (rotation or decaying or zero_time or edge_of_the_contract "
                  "or chunked or identical_sets or single_call or retain_graph or no_noise or many_doublings "
                  "or default_network or oracles_rows or strided_pool or key_splits or same_bits))")
# (The SDE kernels' hypothesis test is left out: one compile per D, dtype and time block, minutes in all.)
TEST_FILES = ("test_local_linear_step.py", "test_laplace_mmd.py", "test_local_linear_sde_triton.py",
              "test_fused_mlp.py", "test_sample_cells.py", "test_laplace_mmd_loss.py")


def say(*parts, sep=" "):
    print(*parts, sep=sep, flush=True)


# ----------------------------------------------------------------------------- inputs

def step_inputs(B, T, D, device, seed=0, dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(seed)
    A = torch.randn(B, D, D, generator=g, dtype=dtype) / D ** 0.5
    x0 = torch.randn(B, D, generator=g, dtype=dtype)
    dt = torch.rand(B, T, generator=g, dtype=dtype) * 4.0
    return A.to(device), x0.to(device), dt.to(device)


def mmd_points(N, device, D=5, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    y = torch.randn(N, D, generator=g) + 0.2
    return x.to(device), y.to(device)


def step_bytes(B, T, D, itemsize=4):
    """Compulsory bytes of a forward: A and x0 once per cell, dt read and X, V written per pair."""
    return itemsize * (B * D * D + B * D + B * T + 2 * B * T * D)


def planned_memory(backend, B, T, D, mode):
    P = B * T
    io = step_bytes(B, T, D)
    if backend == "reference":  # (B,T,D,D) batches; the backward runs 2D x 2D exponentials
        return io + 4 * P * D * D * (8 if mode == "fwd" else 40)
    if backend == "torch":
        return io + 4 * P * D * 30 * (1 if mode == "fwd" else 2)
    return io * (1 if mode == "fwd" else 2.5)


# ----------------------------------------------------------------------------- the run

class Run:
    """Rows, the deadline and the output files; every row is written and printed as it ends."""

    def __init__(self, out, deadline_s, device, do_bench, meta):
        self.out, self.device, self.do_bench, self.meta = out, device, do_bench, meta
        self.t_end = time.time() + deadline_s
        self.rows, self.seen_compile, self.last = [], set(), {}
        os.makedirs(out, exist_ok=True)

    def left(self):
        return self.t_end - time.time()

    def predict(self, series, size, compiles):
        """Seconds a row will take: do_bench runs the function about 5 + 50 ms / t times plus its
        own 25 + 100 ms budgets; the time per call scales linearly from the last size measured."""
        t_call = 0.05
        if series in self.last:
            prev_size, prev_ms = self.last[series]
            t_call = prev_ms * 1e-3 * size / prev_size
        return 10 * t_call + 0.5 + (COMPILE_S if compiles and series[0] not in self.seen_compile else 0.0)

    def row(self, row, fn, series, size, compiles=False, grad_to_none=None, memory=0.0):
        est = self.predict(series, size, compiles)
        row = dict(row, predicted_s=round(est, 2))
        total = torch.cuda.get_device_properties(0).total_memory if self.device == "cuda" else 16 << 30
        if memory > MEM_LIMIT * total:
            row["skipped"] = f"needs about {memory / 2**30:.1f} GiB"
        elif est > self.left():
            row["skipped"] = f"predicted {est:.0f} s, {max(0, self.left()):.0f} s left"
        else:
            t0 = time.time()
            try:
                if self.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                ms = self.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
                row["ms"] = ms
                if self.device == "cuda":
                    row["peak_MB"] = torch.cuda.max_memory_allocated() / 2 ** 20
                self.last[series] = (size, ms)
                if compiles:
                    self.seen_compile.add(series[0])
            except Exception as exc:  # out of memory, a compile error, anything: recorded, not fatal
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            row["wall_s"] = round(time.time() - t0, 2)
            if self.device == "cuda":
                torch.cuda.empty_cache()
        self.rows.append(row)
        self.flush()
        say("row", json.dumps(row))
        return row

    def flush(self):
        write_atomic(os.path.join(self.out, "gpu_bench.json"),
                     json.dumps({"meta": self.meta, "rows": self.rows}, indent=1))
        write_atomic(os.path.join(self.out, "gpu_bench.md"), markdown(self.meta, self.rows))


def step_row(run, backend, mode, B, T, D, target=False):
    from cellmnn_kernels import local_linear_step

    A, x0, dt = step_inputs(B, T, D, run.device)
    grads = None
    if mode == "fwd+bwd":
        A, x0, dt = (t.requires_grad_() for t in (A, x0, dt))
        g = torch.ones(B, T, D, device=run.device)
        grads = [A, x0, dt]

        def fn():
            X, V = local_linear_step(A, x0, dt, backend=backend, check_finite=False)
            torch.autograd.backward([X, V], [g, g])
    else:
        def fn():
            local_linear_step(A, x0, dt, backend=backend, check_finite=False)
    row = {"op": "local_linear_step", "backend": backend, "mode": mode, "D": D, "B": B, "T": T, "pairs": B * T,
           "target": target}
    row = run.row(row, fn, ("step", backend, mode, D), B * T, compiles=backend == "triton", grad_to_none=grads,
                  memory=planned_memory(backend, B, T, D, mode))
    if "ms" in row and mode == "fwd":
        row["GBps"] = step_bytes(B, T, D) / (row["ms"] * 1e-3) / 1e9
        row["fraction_of_copy_bw"] = row["GBps"] * 1e9 / run.meta["copy_Bps"]
        run.flush()
    return row


def sde_row(run, backend, B, T, D, target=False):
    """local_linear_sde_step forward+backward (mean, drift and a sample; g uniform in [0.1, 1]) with
    the covariance's ``backend``: what the noise adds to ``step_row``'s fwd+bwd at the same size."""
    from cellmnn_kernels import local_linear_sde_step

    A, x0, dt = step_inputs(B, T, D, run.device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    g = (0.1 + 0.9 * torch.rand(B, D, generator=gen)).to(run.device)
    eps = torch.randn(B, T, D, generator=gen).to(run.device)
    A, x0, dt, g = (t.requires_grad_() for t in (A, x0, dt, g))
    ones = torch.ones(B, T, D, device=run.device)

    def fn():
        X, V, Y = local_linear_sde_step(A, x0, dt, g, eps, backend=backend, check_finite=False)
        torch.autograd.backward([Y, V], [ones, ones])
    row = {"op": "local_linear_sde_step", "backend": backend, "mode": "fwd+bwd", "D": D, "B": B, "T": T,
           "pairs": B * T, "target": target}
    return run.row(row, fn, ("sde", backend, D), B * T, compiles=backend == "triton", grad_to_none=[A, x0, dt, g],
                   memory=planned_memory(backend, B, T, D, "fwd+bwd") + 4 * B * T * D * D * 4)


def mlp_row(run, backend, E, n, target=False):
    """fused_mlp forward+backward of E default networks (6 inputs, four hidden layers of 96, 25
    outputs: a 5-d model's) on n cells each, gradients in the weights and the inputs."""
    from cellmnn_kernels import fused_mlp
    from cellmnn_kernels.testing import mlp_inputs

    shapes, flat, x = mlp_inputs(0, 5, 96, 4, 25, E, n, device=run.device)
    flat, x = flat.requires_grad_(), x.requires_grad_()
    gy = torch.ones(E, n, 25, device=run.device)

    def fn():
        fused_mlp(flat, shapes, x, backend=backend).backward(gy)
    row = {"op": "fused_mlp", "backend": backend, "mode": "fwd+bwd", "D": 5, "E": E, "B": n, "cells": E * n,
           "target": target}
    return run.row(row, fn, ("mlp", backend), E * n, compiles=backend == "triton", grad_to_none=[flat, x],
                   memory=E * n * (6 + 25 + 4 * 96) * 4 * 4)


def _rel(a, b) -> float:
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-300))


def oracle_step(device, B=500, T=16, D=5, seed=1) -> dict:
    """The compiled step kernels (the benchmark's configuration: fp32, D = 5, T = 16, a B of the same
    divisibility by 16, so no new compile) against the float64 matrix-exponential oracle on the
    same inputs, by the accuracy contract of docs/engine.md: per pair ||X - X_ref|| <= 1e-4
    (||X_ref|| + 1e-6 ||x0||), V likewise with 1e-6 ||A||_1 ||x0||, gradients <= 1e-3 relative."""
    from cellmnn_kernels import local_linear_step

    A, x0, dt = (t.requires_grad_() for t in step_inputs(B, T, D, device, seed=seed))
    ref_in = [t.detach().double().requires_grad_() for t in (A, x0, dt)]
    g = torch.randn(B, T, D, device=device, generator=torch.Generator(device=device).manual_seed(seed))
    out = {}
    for name, inputs, backend in (("triton", (A, x0, dt), "triton"), ("reference", ref_in, "reference")):
        X, V = local_linear_step(*inputs, backend=backend, check_finite=False)
        torch.autograd.backward([X, V], [g.to(X.dtype), g.to(X.dtype)])
        out[name] = (X.detach(), V.detach(), [t.grad for t in inputs])
    (X, V, grads), (Xr, Vr, gr) = out["triton"], out["reference"]
    x_norm = x0.detach().double().norm(dim=1)[:, None]
    a_norm = A.detach().double().abs().sum(1).amax(1)[:, None]
    ex = ((X.double() - Xr).norm(dim=2) / (Xr.norm(dim=2) + 1e-6 * x_norm)).max().item()
    ev = ((V.double() - Vr).norm(dim=2) / (Vr.norm(dim=2) + 1e-6 * a_norm * x_norm)).max().item()
    eg = {n: _rel(a, b) for n, a, b in zip(("dA", "dx0", "ddt"), grads, gr)}
    ok = ex <= 1e-4 and ev <= 1e-4 and max(eg.values()) <= 1e-3
    return {"check": "local_linear_step triton fp32 vs float64 oracle", "B": B, "T": T, "D": D, "X": ex, "V": ev,
            **eg, "ok": bool(ok)}


def oracle_mmd(device, N=8192, seed=1) -> dict:
    """The compiled laplace_mmd kernel (fp32) against the float64 dense reference on the same points:
    |MMD^2 - ref| <= 1e-5 x the scale, gradient <= 1e-4 relative (docs/engine.md)."""
    from cellmnn_kernels import laplace_mmd

    x, y = mmd_points(N, device, seed=seed)
    x.requires_grad_()
    xr = x.detach().double().requires_grad_()
    v = laplace_mmd(x, y, backend="triton", check_finite=False)
    v.backward()
    vr = laplace_mmd(xr, y.double(), backend="reference", check_finite=False)
    vr.backward()
    scale = 4.0  # mean k(X,X) + mean k(Y,Y) + 2 mean k(X,Y) <= 4 (k <= 1)
    err, eg = abs(float(v.detach()) - float(vr.detach())) / scale, _rel(x.grad, xr.grad)
    return {"check": "laplace_mmd triton fp32 vs float64 dense", "N": N, "value": err, "dx": eg,
            "ok": bool(err <= 1e-5 and eg <= 1e-4)}


def oracle_checks(device) -> list:
    """``oracle_step`` and ``oracle_mmd``, each printed as it ends; an exception is a failed check."""
    out = []
    for check in (oracle_step, oracle_mmd):
        try:
            out.append(check(device))
        except Exception as exc:  # noqa: BLE001 - recorded, and the run fails
            out.append({"check": check.__name__, "error": f"{type(exc).__name__}: {exc}", "ok": False})
        say("oracle:", json.dumps(out[-1]))
    return out


def mmd_row(run, backend, mode, N, target=False):
    from cellmnn_kernels import laplace_mmd

    x, y = mmd_points(N, run.device)
    x.requires_grad_(mode == "fwd+bwd")

    def fn():
        if backend == "keops":
            v = keops_mmd(x, y)
        else:
            v = laplace_mmd(x, y, backend=backend, check_finite=False)
        if mode == "fwd+bwd":
            v.backward()
    row = {"op": "laplace_mmd", "backend": backend, "mode": mode, "D": 5, "N": N, "target": target}
    memory = 4.0 * N * N * (6 if backend == "reference" else 0) + 64 * N
    row = run.row(row, fn, ("mmd", backend, mode), N * N, compiles=backend == "triton",
                  grad_to_none=[x] if mode != "fwd" else None, memory=memory)
    if "ms" in row:
        row["evals_per_s"] = 3 * N * N / (row["ms"] * 1e-3)
        run.flush()
    return row


def train_rows(run):
    """Training steps on the device: cellmnn's ensemble (eager and CUDA graph) beside the authors'
    formulation (bench_train.Authors); graph == eager; no host synchronisation in a step."""
    import cellmnn
    from cellmnn.train import HParams, Member
    from cellmnn.train.layout import Setup
    from cellmnn.train.step import Runner
    from bench_train import Authors

    dev = torch.device(run.device)
    m = cellmnn.load_marginals(None)
    backend = "triton" if run.device == "cuda" else "torch"
    hp = HParams(verbose=False, device=run.device, backend=backend)
    members = [Member(1 + e % 3, e, hp) for e in range(9)]
    s = Setup(m, members, dev)
    eager = Runner(s, s.flat0, False)
    base = {"op": "train", "backend": backend, "mode": "step", "D": 3, "E": 9, "B": 200}
    run.row(dict(base, variant="cellmnn eager"), eager.step, ("train", "eager"), 1, compiles=True)
    if run.device == "cuda":
        graph = Runner(s, s.flat0, True)
        run.row(dict(base, variant="cellmnn cuda graph"), graph.step, ("train", "graph"), 1, compiles=True)
        a, b = Runner(s, s.flat0, False), Runner(s, s.flat0, True)
        for _ in range(8):
            a.step(), b.step()
        run.meta["cuda_graph_used"] = b.graph is not None
        run.meta["cuda_graph_max_rel_diff"] = float(((a.flat - b.flat).abs().max() / a.flat.abs().max()).item())
        from cellmnn_kernels.ops.local_linear_step import triton_impl as llstep_triton
        capturing = llstep_triton.capturing
        try:
            torch.cuda.synchronize()
            llstep_triton.capturing = lambda device: True  # the step as a CUDA graph captures it
            torch.cuda.set_sync_debug_mode("error")
            for _ in range(3):
                eager.step()
            run.meta["step_sync_free"] = True
        except Exception as exc:
            run.meta["step_sync_free"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
            llstep_triton.capturing = capturing
        run.meta["device_launches_per_step"] = device_launches(eager.step)
    authors = Authors(m, 1, 0, hp, dev)
    run.row(dict(base, E=1, variant="authors' formulation"), authors.step, ("train", "authors"), 1)
    run.flush()


def device_launches(step) -> dict | str:
    """Kernels, copies and fills one eager training step puts on the GPU, from the CUDA profiler
    (what bench_step_ops.py --path gpu counts on the CPU), or the error text."""
    try:
        step()
        torch.cuda.synchronize()
        act = torch.profiler.ProfilerActivity
        with torch.profiler.profile(activities=[act.CPU, act.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kinds = {"kernels": 0, "memcpy": 0, "memset": 0}
        for e in prof.events():
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            name = e.name.lower()
            kinds["memcpy" if "memcpy" in name else "memset" if "memset" in name else "kernels"] += 1
        return {**kinds, "total": sum(kinds.values())}
    except Exception as exc:  # noqa: BLE001 - a measurement, never a reason to stop the run
        return f"{type(exc).__name__}: {str(exc)[:300]}"


def keops_mmd(x, y, sigma=1.0):
    """The same biased L1-Laplace MMD^2 with pykeops LazyTensors (uniform weights)."""
    from pykeops.torch import LazyTensor

    D = x.shape[1]

    def mean_k(a, b):
        dij = (LazyTensor(a[:, None, :]) - LazyTensor(b[None, :, :])).abs().sum(-1) / D
        kij = (-(dij.relu() - 1e-8).relu().__add__(1e-8) / sigma).exp()  # max(d, 1e-8)
        return kij.sum(dim=1).sum() / (a.shape[0] * b.shape[0])

    return mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y)


def compiled_kernels(device):
    """Registers and spills of the kernels the JIT compiled for D = 5 float32 (launched once)."""
    if device != "cuda":
        return {"note": "no JIT compile on CPU (the interpreter runs the kernels)"}
    from cellmnn_kernels.ops.local_linear_step.triton_impl import anchor_slots, variant_for

    out = {}
    A, x0, dt = step_inputs(256, 16, 5, device)
    X, V = torch.empty(256, 16, 5, device=device), torch.empty(256, 16, 5, device=device)
    dA, dx0, ddt = torch.empty_like(A), torch.empty_like(x0), torch.empty_like(dt)
    v = variant_for(5, A.dtype)  # the register kernels
    LS = anchor_slots(A, dt)
    S = torch.empty(v.scratch_size(256, 5, LS), device=device)
    launches = {f"{v.name}_fwd_fp32_D5": v.forward_launch(A, x0, dt, X, V),
                f"{v.name}_bwd_fp32_D5": v.backward_launch(A, x0, dt, X, V, dA, dx0, ddt, S, LS)}
    for name, (kernel, grid, kw) in launches.items():
        try:
            ck = kernel[grid](**kw)
            out[name] = {"registers": getattr(ck, "n_regs", None), "spills": getattr(ck, "n_spills", None)}
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return out


def anchor_statistics():
    from cellmnn_kernels.sass_cost import BENCH_INPUT, benchmark_levels

    per_block, lev = benchmark_levels(5, BENCH_INPUT["B"], BENCH_INPUT["T"], BENCH_INPUT["seed"], 1.0, 16)
    return {"input": BENCH_INPUT, "D": 5, "mean_pair_level": float(lev.double().mean()),
            "mean_program_max_level": float(per_block.double().mean()), "max_level": int(lev.max())}


def run_tests(timeout, dry_run):
    """The GPU subset of the op tests (compiled kernels; on a dry run, two under the interpreter) in
    a pytest subprocess capped at ``timeout`` seconds: ok, return code, seconds, the output's tail."""
    env = dict(os.environ)
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
        selection = "bit_for_bit or (triton and (zero_time or no_noise))"
    else:
        env.pop("TRITON_INTERPRET", None)
        selection = TEST_SELECTION
    # -o addopts=: one process, whatever pytest.ini asks for (its -n needs pytest-xdist, and the
    # kernels compile once in this process rather than once per worker).
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=-ra", "-k", selection,
           *(os.path.join(ROOT, "tests", f) for f in TEST_FILES)]
    t0 = time.time()
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        tail = (res.stdout + res.stderr).strip().splitlines()[-12:]
        return {"ok": res.returncode == 0, "returncode": res.returncode, "seconds": round(time.time() - t0, 1),
                "selection": selection, "tail": tail}
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {"ok": False, "returncode": "timeout", "seconds": timeout, "selection": selection,
                "tail": out.strip().splitlines()[-12:]}


def copy_bandwidth(do_bench, device):
    n = 1 << (28 if device == "cuda" else 22)  # 1 GiB of float32 on the GPU
    src = torch.empty(n, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * n * 4 / (ms * 1e-3)


def cpu_do_bench(fn, warmup=25, rep=100, grad_to_none=None, return_mode="median"):
    """Stand-in for triton.testing.do_bench on CPU: median of three timed calls after one."""
    fn()
    times = []
    for _ in range(3):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


# ----------------------------------------------------------------------------- reports

def _find(rows, **key):
    return next((r for r in rows if all(r.get(k) == v for k, v in key.items()) and "ms" in r), None)


def summary_lines(meta, rows):
    tests = meta.get("tests", {})
    verdict = "passed" if tests.get("ok") else "skipped" if tests.get("skipped") else "FAILED or not run"
    lines = [f"summary on {meta['device']}: copy bandwidth {meta.get('copy_Bps', 0) / 1e9:.0f} GB/s; "
             f"pytest correctness step {verdict}"]
    for c in meta.get("oracle", []):
        errors = ", ".join(f"{k} {v:.1e}" for k, v in c.items() if isinstance(v, float))
        lines.append(f"  {c['check']}: {'ok' if c['ok'] else 'FAILED'} ({c.get('error') or errors})")
    t = _find(rows, op="local_linear_step", backend="triton", mode="fwd+bwd", D=5, pairs=10 ** 6)
    r = _find(rows, op="local_linear_step", backend="reference", mode="fwd+bwd", D=5, pairs=10 ** 6)
    lines.append("  triton fwd+bwd vs reference, B*T=1e6, D=5: "
                 + (f"{r['ms'] / t['ms']:.0f}x ({t['ms']:.3g} ms)" if t and r else "n/a") + " (target >= 100x)")
    q = _find(rows, op="local_linear_sde_step", backend="triton", D=5, pairs=10 ** 6)
    lines.append("  SDE step fwd+bwd vs local_linear_step fwd+bwd, B*T=1e6, D=5: "
                 + (f"{q['ms'] / t['ms']:.1f}x ({q['ms']:.3g} ms)" if t and q else "n/a")
                 + " (target <= 2x)")
    f = _find(rows, op="local_linear_step", backend="triton", mode="fwd", D=5, pairs=10 ** 7)
    f = f if f and "fraction_of_copy_bw" in f else None  # a skipped row has no measurement
    lines.append("  triton fwd, B*T=1e7, D=5: "
                 + (f"{100 * f['fraction_of_copy_bw']:.0f}% of copy bandwidth ({f['GBps']:.0f} GB/s)" if f else "n/a")
                 + " (target >= 70%)")
    t = _find(rows, op="laplace_mmd", backend="triton", mode="fwd+bwd", N=8192)
    r = _find(rows, op="laplace_mmd", backend="reference", mode="fwd+bwd", N=8192)
    lines.append("  laplace_mmd fwd+bwd N=M=8192: " + (f"triton {r['ms'] / t['ms']:.1f}x dense" if t and r else "n/a")
                 + " (target >= 10x)")
    t = _find(rows, op="fused_mlp", backend="triton", E=1)
    r = _find(rows, op="fused_mlp", backend="torch", E=1)
    lines.append("  fused_mlp fwd+bwd, 1e6 cells, default network: "
                 + (f"triton {t['ms']:.3g} ms = {1e6 * t['ms'] / t['cells']:.2f} ns per cell, {r['ms'] / t['ms']:.1f}x "
                    "torch" if t and r else "n/a") + " (cost model: fwd 0.53 + bwd 6.9 ns per cell)")
    best = [r for r in rows if r.get("op") == "train" and "ms" in r and r.get("variant", "").startswith("cellmnn")]
    a = _find(rows, op="train", variant="authors' formulation")
    if best and a:
        t = min(best, key=lambda r: r["ms"])
        lines.append(f"  training E=9 B=200 D=3 ({t['variant']}): {9 * a['ms'] / t['ms']:.0f}x the authors' "
                     f"per-model throughput (target >= 50x); graph == eager: {meta.get('cuda_graph_max_rel_diff')}; "
                     f"sync-free step: {meta.get('step_sync_free')}; device launches per step: "
                     f"{meta.get('device_launches_per_step')} (target <= 25)")
    return lines


def markdown(meta, rows):
    lines = [f"# gpu_bench on {meta['device']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}; copy bandwidth "
             f"{meta.get('copy_Bps', 0) / 1e9:.0f} GB/s; correctness: {meta.get('tests', {}).get('returncode')}", "",
             "| op | backend | mode | D | size | median ms | GB/s | of copy BW | predicted s | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        size = (f"{r['pairs']:.0e} pairs" if "pairs" in r else f"N={r['N']:.0e}" if "N" in r
                else f"E={r['E']} B={r['B']} {r.get('variant', '')}")
        ms = f"{r['ms']:.4g}" if "ms" in r else ""
        gb = f"{r['GBps']:.0f}" if "GBps" in r else ""
        fr = f"{100 * r['fraction_of_copy_bw']:.0f}%" if "fraction_of_copy_bw" in r else ""
        note = r.get("skipped") or r.get("error") or ("target row" if r.get("target") else "")
        lines.append(f"| {r['op']} | {r['backend']} | {r['mode']} | {r['D']} | {size} | {ms} | {gb} | {fr} | "
                     f"{r['predicted_s']} | {note} |")
    lines += ["", "```", *summary_lines(meta, rows), "```", ""]
    return "\n".join(lines)


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def sweeps(run, device: str, imported: dict) -> None:
    """The sweeps, smallest sizes first, while time is left: local_linear_step over B*T and D,
    laplace_mmd over N, for every backend."""
    backends = ("triton", "torch", "reference") if device == "cuda" else ("torch", "reference")
    sizes = [10 ** k for k in range(3, 8)] if device == "cuda" else [10 ** 3, 10 ** 4]
    for D in (5, 16, 64):
        for P in sizes:
            for backend in backends:
                for mode in ("fwd", "fwd+bwd"):
                    if _find(run.rows, op="local_linear_step", backend=backend, mode=mode, D=D, pairs=P):
                        continue
                    step_row(run, backend, mode, max(1, P // 16), 16, D)
    mmd_backends = backends + (("keops",) if imported["pykeops"] and device == "cuda" else ())
    for N in ([1000, 10 ** 5, 10 ** 6] if device == "cuda" else [200, 1000]):
        for backend in mmd_backends:
            if backend == "reference" and N > 16384:
                continue
            mmd_row(run, backend, "fwd+bwd", N)


def target_rows(run, device):
    """The rows the targets are read from (``summary_lines``); tiny sizes off CUDA (a rehearsal)."""
    big = 10 ** 7 if device == "cuda" else 10 ** 4
    mid = 10 ** 6 if device == "cuda" else 10 ** 3
    n_mmd = 8192 if device == "cuda" else 512
    fast = "triton" if device == "cuda" else "torch"
    step_row(run, fast, "fwd+bwd", mid // 16, 16, 5, target=True)
    step_row(run, "reference", "fwd+bwd", mid // 16, 16, 5, target=True)
    sde_row(run, fast, mid // 16, 16, 5, target=True)
    step_row(run, fast, "fwd", big // 16, 16, 5, target=True)
    mmd_row(run, fast, "fwd+bwd", n_mmd, target=True)
    mmd_row(run, "reference", "fwd+bwd", n_mmd, target=True)
    for backend in (fast, "torch"):
        mlp_row(run, backend, 1, mid, target=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--deadline", type=float, default=420.0, help="seconds for the whole call")
    ap.add_argument("--test-timeout", type=int, default=90)
    ap.add_argument("--dry-run", action="store_true", help="rehearse on CPU (interpreter tests, tiny sizes)")
    args = ap.parse_args(argv)
    t_start = time.time()
    imported = {"torch": torch.__version__}
    try:
        import triton

        imported["triton"] = triton.__version__
    except ImportError as exc:
        imported["triton"] = f"not importable: {exc}"
    try:
        import pykeops

        imported["pykeops"] = pykeops.__version__
    except Exception:
        imported["pykeops"] = None
    if args.dry_run:
        device, do_bench = "cpu", cpu_do_bench
        name = "CPU (dry run)"
    else:
        if not torch.cuda.is_available():
            say("no CUDA device: nothing to do (use --dry-run to rehearse on CPU)")
            return 2
        from triton.testing import do_bench

        device, name = "cuda", torch.cuda.get_device_name()
    meta = {"device": name, "torch": torch.__version__, "triton": imported["triton"], "imported": imported,
            "deadline_s": args.deadline}
    run = Run(args.out, args.deadline - (time.time() - t_start), device, do_bench, meta)
    run.flush()
    say("environment:", json.dumps(imported))
    if args.test_timeout > 0:
        meta["tests"] = run_tests(min(args.test_timeout, max(10, run.left() - 60)), args.dry_run)
    else:  # --test-timeout 0: no pytest step (the oracle checks of the timed kernels still run)
        meta["tests"] = {"ok": False, "returncode": "skipped", "skipped": "--test-timeout 0", "tail": []}
    say("correctness:", meta["tests"]["returncode"], *meta["tests"]["tail"][-3:])
    run.flush()
    meta["copy_Bps"] = copy_bandwidth(do_bench, device)
    say(f"copy bandwidth: {meta['copy_Bps'] / 1e9:.0f} GB/s")
    run.flush()

    target_rows(run, device)  # the target rows first
    if device == "cuda":  # the compiled kernels just timed, against the float64 oracles
        meta["oracle"] = oracle_checks(device)
        run.flush()
    try:
        meta["compiled_kernels"] = compiled_kernels(device)
    except Exception as exc:
        meta["compiled_kernels"] = {"error": f"{type(exc).__name__}: {exc}"}
    meta["anchor_levels"] = anchor_statistics()
    run.flush()
    say("compiled kernels:", json.dumps(meta["compiled_kernels"]))
    say("anchor levels:", json.dumps(meta["anchor_levels"]))
    try:
        train_rows(run)
    except Exception as exc:  # recorded, not fatal: the sweeps still run
        meta["train_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        run.flush()
    sweeps(run, device, imported)
    meta["wall_s"] = round(time.time() - t_start, 1)
    run.flush()
    say(*summary_lines(meta, run.rows), sep="\n")
    oracle_ok = all(c["ok"] for c in meta.get("oracle", []))
    return 0 if (meta["tests"]["ok"] or meta["tests"].get("skipped")) and oracle_ok else 1


if __name__ == "__main__":
    sys.exit(main())
