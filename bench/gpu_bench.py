"""One call on a GPU machine: correctness subset with compiled kernels, then benchmarks.

    python bench/gpu_bench.py --out "$OUT" [--test-timeout 150] [--bench-budget 150] [--quick]
    python bench/gpu_bench.py --dry-run --out /tmp/x    # CPU rehearsal of the script's logic

1. runs the triton-backend op tests on CUDA tensors (compiled kernels, not the interpreter);
2. measures the device copy bandwidth (torch copy of 1 GiB, triton.testing.do_bench median);
3. times local_linear_step forward and forward+backward for each backend, B*T from 1e3 to 1e7
   (T = 16) and D in {5, 16, 64}, medians from do_bench; skips sizes a backend cannot hold;
4. times laplace_mmd (D = 5) for N = M from 1e3 to 1e6: each backend, and KeOps (pykeops) on
   the same L1-Laplace formula when it is importable (``--keops-wheels DIR`` installs it from
   wheels carried to the machine); kernel evaluations per second and peak memory;
5. prints a short table last and writes gpu_bench.json and gpu_bench.md under --out.
Forward "roofline" counts only unavoidable bytes: A and x0 once per cell, dt read and X, V
written once per pair.
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
sys.path.insert(0, HERE)

MEM_LIMIT = 0.6  # fraction of device memory a single benchmark may plan to use


def run_tests(timeout: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "triton",
           os.path.join(ROOT, "tests", "test_local_linear_step.py"), os.path.join(ROOT, "tests", "test_laplace_mmd.py")]
    t0 = time.time()
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        tail = (res.stdout + res.stderr).strip().splitlines()[-15:]
        return {"returncode": res.returncode, "seconds": round(time.time() - t0, 1), "tail": tail}
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {"returncode": "timeout", "seconds": timeout, "tail": out.strip().splitlines()[-15:]}


def cpu_do_bench(fn, warmup=1, rep=None, grad_to_none=None, return_mode="median"):
    """Stand-in for triton.testing.do_bench in --dry-run (CPU): median of a few timed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(3):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def copy_bandwidth(do_bench, device="cuda") -> float:
    n = 1 << (28 if device == "cuda" else 24)  # 1 GiB of float32 on the GPU
    src = torch.empty(n, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    del src, dst
    return 2 * n * 4 / (ms * 1e-3)


def planned_bytes(backend: str, B: int, T: int, D: int, mode: str) -> float:
    P = B * T
    io = 4 * (B * D * D + B * D + P + 2 * P * D)
    if backend == "reference":  # (B,T,D,D) batches; the backward runs 2D x 2D exponentials
        return io + 4 * P * D * D * (8 if mode == "fwd" else 40)
    if backend == "torch":  # Horner states (2m+2) x (B,D,T), plus anchor tables
        return io + 4 * P * D * 30 * (1 if mode == "fwd" else 2)
    return io * (1 if mode == "fwd" else 2.5)


def bench_step(do_bench, sizes, dims, backends, budget_s, device="cuda"):
    from bench_local_linear_step import make_inputs

    from cellmnn_kernels import local_linear_step

    total_mem = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else 8 << 30
    rows, t_start = [], time.time()
    for D in dims:
        for P in sizes:
            T = 16
            B = max(1, P // T)
            for backend in backends:
                for mode in ("fwd", "fwd+bwd"):
                    row = {"D": D, "B": B, "T": T, "pairs": B * T, "backend": backend, "mode": mode}
                    if planned_bytes(backend, B, T, D, mode) > MEM_LIMIT * total_mem:
                        rows.append({**row, "skipped": "memory"})
                        continue
                    if time.time() - t_start > budget_s:
                        rows.append({**row, "skipped": "time budget"})
                        continue
                    A, x0, dt = make_inputs(B, T, D, device=device)
                    if mode == "fwd+bwd":
                        A, x0, dt = (t.requires_grad_() for t in (A, x0, dt))
                        gX = torch.ones(B, T, D, device=device)

                        def fn():
                            X, V = local_linear_step(A, x0, dt, backend=backend, check_finite=False)
                            torch.autograd.backward([X, V], [gX, gX])
                    else:
                        def fn():
                            local_linear_step(A, x0, dt, backend=backend, check_finite=False)
                    try:
                        ms = do_bench(fn, warmup=5, rep=50, grad_to_none=[A, x0, dt] if mode != "fwd" else None,
                                      return_mode="median")
                        row["ms"] = ms
                    except torch.cuda.OutOfMemoryError:
                        row["skipped"] = "out of memory"
                    rows.append(row)
                    del A, x0, dt
                    if device == "cuda":
                        torch.cuda.empty_cache()
    return rows


def keops_mmd(x, y, sigma=1.0):
    """The same biased L1-Laplace MMD^2 with pykeops LazyTensors (uniform weights)."""
    from pykeops.torch import LazyTensor

    D = x.shape[1]

    def mean_k(a, b):
        dij = (LazyTensor(a[:, None, :]) - LazyTensor(b[None, :, :])).abs().sum(-1) / D
        kij = (-(dij.relu() - 1e-8).relu().__add__(1e-8) / sigma).exp()  # max(d, 1e-8)
        return kij.sum(dim=1).sum() / (a.shape[0] * b.shape[0])

    return mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y)


def bench_mmd(do_bench, sizes, backends, budget_s, device="cuda"):
    from bench_laplace_mmd import make_points

    from cellmnn_kernels import laplace_mmd

    rows, t_start = [], time.time()
    for N in sizes:
        for backend in backends:
            for mode in ("fwd", "fwd+bwd"):
                row = {"op": "laplace_mmd", "N": N, "D": 5, "backend": backend, "mode": mode}
                if backend == "reference" and N > 16384:
                    rows.append({**row, "skipped": "dense N x N"})
                    continue
                if time.time() - t_start > budget_s:
                    rows.append({**row, "skipped": "time budget"})
                    continue
                x, y = make_points(N, device=device)
                x.requires_grad_(mode == "fwd+bwd")

                def fn():
                    v = keops_mmd(x, y) if backend == "keops" else laplace_mmd(x, y, backend=backend, check_finite=False)
                    if mode == "fwd+bwd":
                        v.backward()
                try:
                    if device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    row["ms"] = do_bench(fn, warmup=1, rep=50, grad_to_none=[x] if mode != "fwd" else None,
                                         return_mode="median")
                    row["evals_per_s"] = 3 * N * N / (row["ms"] * 1e-3)  # k(X,X), k(Y,Y), k(X,Y)
                    if device == "cuda":
                        row["peak_MB"] = torch.cuda.max_memory_allocated() / 2 ** 20
                except Exception as exc:  # out of memory, or KeOps failing to build
                    row["skipped"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                rows.append(row)
                del x, y
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


def summarise(rows, copy_bw):
    by_key = {(r["D"], r["pairs"], r["mode"], r["backend"]): r for r in rows if "ms" in r}
    for r in rows:
        if "ms" not in r:
            continue
        ref = by_key.get((r["D"], r["pairs"], r["mode"], "reference"))
        if ref and r["backend"] != "reference":
            r["speedup_vs_reference"] = ref["ms"] / r["ms"]
        if r["mode"] == "fwd":
            B, T, D = r["B"], r["T"], r["D"]
            nbytes = 4 * (B * D * D + B * D + B * T + 2 * B * T * D)
            r["GBps"] = nbytes / (r["ms"] * 1e-3) / 1e9
            r["fraction_of_copy_bw"] = nbytes / (r["ms"] * 1e-3) / copy_bw
    return rows


def markdown_mmd(rows) -> str:
    lines = ["", "## laplace_mmd (D = 5, N = M)", "",
             "| N | mode | backend | median ms | x reference | kernel evals / s | peak MB |", "|---|---|---|---|---|---|---|"]
    ref = {(r["N"], r["mode"]): r["ms"] for r in rows if r["backend"] == "reference" and "ms" in r}
    for r in rows:
        if "ms" not in r:
            lines.append(f"| {r['N']:.0e} | {r['mode']} | {r['backend']} | skipped: {r['skipped']} | | | |")
            continue
        sp = f"{ref[(r['N'], r['mode'])] / r['ms']:.1f}" if (r["N"], r["mode"]) in ref and r["backend"] != "reference" else ""
        lines.append(f"| {r['N']:.0e} | {r['mode']} | {r['backend']} | {r['ms']:.4g} | {sp} | "
                     f"{r['evals_per_s']:.3g} | {r.get('peak_MB', float('nan')):.0f} |")
    return "\n".join(lines) + "\n"


def markdown(meta, rows) -> str:
    lines = [f"# local_linear_step on {meta['device']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}; copy bandwidth {meta['copy_GBps']:.0f} GB/s; "
             f"tests: {meta['tests']['returncode']} in {meta['tests']['seconds']} s", "",
             "| D | B*T | mode | backend | median ms | x reference | GB/s | of copy BW |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ms" not in r:
            lines.append(f"| {r['D']} | {r['pairs']:.0e} | {r['mode']} | {r['backend']} | skipped: {r['skipped']} | | | |")
            continue
        sp = f"{r['speedup_vs_reference']:.1f}" if "speedup_vs_reference" in r else ""
        gb = f"{r['GBps']:.0f}" if "GBps" in r else ""
        fr = f"{100 * r['fraction_of_copy_bw']:.0f}%" if "fraction_of_copy_bw" in r else ""
        lines.append(f"| {r['D']} | {r['pairs']:.0e} | {r['mode']} | {r['backend']} | {r['ms']:.4g} | {sp} | {gb} | {fr} |")
    return "\n".join(lines) + "\n"


def short_summary(meta, rows, mmd_rows=()) -> str:
    """The targets, one line each: printed last."""
    def find(D, pairs, mode, backend):
        return next((r for r in rows if (r["D"], r["pairs"], r["mode"], r["backend"]) == (D, pairs, mode, backend)
                     and "ms" in r), None)

    big = max(r["pairs"] for r in rows)
    lines = [f"summary on {meta['device']}: copy bandwidth {meta['copy_GBps']:.0f} GB/s; "
             f"tests {meta['tests']['returncode']}"]
    r = find(5, 10 ** 6, "fwd+bwd", "triton")
    sp = f"{r['speedup_vs_reference']:.0f}x" if r and "speedup_vs_reference" in r else "n/a"
    lines.append(f"  triton fwd+bwd vs reference, B*T=1e6, D=5: {sp} (target >= 100x)")
    for D in sorted({r["D"] for r in rows}):
        r = find(D, big, "fwd", "triton")
        frac = f"{100 * r['fraction_of_copy_bw']:.0f}% ({r['GBps']:.0f} GB/s)" if r else "n/a"
        lines.append(f"  triton fwd, B*T={big:.0e}, D={D}: {frac} of copy bandwidth (target >= 70%)")
    m = {(r["N"], r["mode"], r["backend"]): r for r in mmd_rows if "ms" in r}
    t, ref = m.get((8192, "fwd+bwd", "triton")), m.get((8192, "fwd+bwd", "reference"))
    lines.append(f"  laplace_mmd fwd+bwd N=M=8192: triton {ref['ms'] / t['ms']:.1f}x reference (target >= 10x)"
                 if t and ref else "  laplace_mmd fwd+bwd N=M=8192: n/a")
    big = max((r["N"] for r in mmd_rows if "ms" in r and r["backend"] == "triton"), default=None)
    if big:
        t, k = m.get((big, "fwd+bwd", "triton")), m.get((big, "fwd+bwd", "keops"))
        line = f"  laplace_mmd fwd+bwd N=M={big:.0e}: triton {t['evals_per_s']:.3g} evals/s, peak {t.get('peak_MB', 0):.0f} MB" if t else ""
        line += f"; keops {k['evals_per_s']:.3g} evals/s" if k else "; keops n/a"
        lines.append(line)
    return "\n".join(lines)


def write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--test-timeout", type=int, default=150)
    ap.add_argument("--bench-budget", type=float, default=150.0, help="seconds for the local_linear_step sweep")
    ap.add_argument("--quick", action="store_true", help="smaller sweep (sizes up to 1e6)")
    ap.add_argument("--dry-run", action="store_true", help="rehearse on CPU: tiny sizes, no tests, no triton")
    ap.add_argument("--mmd-budget", type=float, default=100.0, help="seconds for the laplace_mmd sweep")
    ap.add_argument("--keops-wheels", default=None, help="folder of pykeops/keopscore wheels to install first")
    args = ap.parse_args(argv)
    if args.dry_run:
        device, do_bench = "cpu", cpu_do_bench
        meta = {"device": "CPU (dry run)", "torch": torch.__version__, "triton": "-",
                "tests": {"returncode": "not run", "seconds": 0, "tail": []}}
        sizes, dims, backends = [10 ** 3, 10 ** 4], (5, 16), ("torch", "reference")
        mmd_sizes, mmd_backends = [1000, 2000], ("torch", "reference")
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: nothing to do (use --dry-run to rehearse on CPU)")
            return 2
        import triton
        from triton.testing import do_bench

        device = "cuda"
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
        meta["tests"] = run_tests(args.test_timeout)
        print("tests:", meta["tests"]["returncode"], *meta["tests"]["tail"][-3:], sep="\n  ")
        sizes = [10 ** k for k in range(3, 7 if args.quick else 8)]
        dims, backends = (5, 16, 64), ("triton", "torch", "reference")
        mmd_sizes = [1000, 8192, 10 ** 5] + ([] if args.quick else [10 ** 6])
        if args.keops_wheels:
            subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links",
                            args.keops_wheels, "pykeops"], check=False)
        try:
            import pykeops  # noqa: F401

            mmd_backends = ("triton", "torch", "reference", "keops")
        except ImportError:
            mmd_backends = ("triton", "torch", "reference")
    os.makedirs(args.out, exist_ok=True)
    copy_bw = copy_bandwidth(do_bench, device)
    meta["copy_GBps"] = copy_bw / 1e9
    rows = bench_step(do_bench, sizes, dims, backends, args.bench_budget, device)
    rows = summarise(rows, copy_bw)
    mmd_rows = bench_mmd(do_bench, mmd_sizes, mmd_backends, args.mmd_budget, device)
    write_atomic(os.path.join(args.out, "gpu_bench.json"),
                 json.dumps({"meta": meta, "rows": rows, "mmd_rows": mmd_rows}, indent=1))
    md = markdown(meta, rows) + markdown_mmd(mmd_rows)
    summary = short_summary(meta, rows, mmd_rows)
    write_atomic(os.path.join(args.out, "gpu_bench.md"), md + "\n```\n" + summary + "\n```\n")
    print(md)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
