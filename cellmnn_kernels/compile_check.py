"""Ahead-of-time compile of every Triton kernel for NVIDIA GPUs, on a machine without one.

The interpreter used by the CPU tests accepts code that the GPU compiler rejects, so CI compiles
each kernel for sm_80 and sm_90 in every constexpr configuration the launchers can choose, and
reports registers and spills from ``ptxas -v``.

    python -m cellmnn_kernels.compile_check [--arch 80 90] [--jobs N]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

_DTYPE_SIG = {torch.float32: "fp32", torch.float64: "fp64"}


@dataclass(frozen=True)
class KernelSpec:
    name: str
    kernel: str  # "module:attribute" so that specs pickle across processes
    signature: tuple  # ((argument, type), ...) in order
    constexprs: tuple  # ((name, value), ...)
    num_warps: int


def kernel_specs() -> list[KernelSpec]:
    """Every (kernel, configuration) the launchers of all ops can choose."""
    from .ops.local_linear_step.triton_impl import CAP, all_configs
    from .ops.local_linear_step.common import TAYLOR
    from .ops.utils import next_power_of_2

    specs = []
    mod = "cellmnn_kernels.ops.local_linear_step.triton_impl"
    ints = ["B", "T", "D", "n_tblocks", "sAb", "sAi", "sAj", "sxb", "sxd", "stb", "stt"]
    for dtype, (_, m) in TAYLOR.items():
        f = _DTYPE_SIG[dtype]
        for cfg in all_configs(dtype):
            common = [(n, "i32") for n in ints] + [("theta", "fp32"), ("nu_max", "fp32")]
            fwd_sig = [(p, "*" + f) for p in ("A_ptr", "x0_ptr", "dt_ptr", "X_ptr", "V_ptr")] + common
            bwd_sig = [(p, "*" + f) for p in ("A_ptr", "x0_ptr", "dt_ptr", "gX_ptr", "gV_ptr",
                                              "dA_ptr", "dx0_ptr", "ddt_ptr")] + common
            tag = f"{f}_DP{cfg['DP']}_BT{cfg['BT']}"
            specs.append(KernelSpec(f"llstep_fwd_{tag}_BB{cfg['BB']}", f"{mod}:_llstep_fwd_kernel",
                                    tuple(fwd_sig),
                                    (("DP", cfg["DP"]), ("BB", cfg["BB"]), ("BT", cfg["BT"]), ("M", m)),
                                    cfg["num_warps"]))
            specs.append(KernelSpec(f"llstep_bwd_{tag}_BB{cfg['BB_BWD']}", f"{mod}:_llstep_bwd_kernel",
                                    tuple(bwd_sig),
                                    (("DP", cfg["DP"]), ("BB", cfg["BB_BWD"]), ("BT", cfg["BT"]), ("M", m),
                                     ("MP", next_power_of_2(m + 2)), ("CAP", CAP)),
                                    cfg["num_warps"]))
    mod = "cellmnn_kernels.ops.laplace_mmd.triton_impl"
    from .ops.laplace_mmd.triton_impl import all_configs as mmd_configs

    for dtype, f in _DTYPE_SIG.items():
        for cfg in mmd_configs(dtype):
            for g in (False, True):
                sig = [(p, "*" + f) for p in ("Q_ptr", "K_ptr", "WK_ptr")] + [("items_ptr", "*i64"), ("params_ptr", "*" + f)] \
                    + [(p, "*" + f) for p in ("R_ptr", "G_ptr")] + [(n, "i32") for n in ("n_out", "D", "sq", "sk", "n_splits")]
                specs.append(KernelSpec(f"laplace_rows_{f}_DP{cfg['DP']}_BM{cfg['BM']}_BN{cfg['BN']}{'_G' if g else ''}",
                                        f"{mod}:_laplace_rows_kernel", tuple(sig),
                                        (("DP", cfg["DP"]), ("BM", cfg["BM"]), ("BN", cfg["BN"]), ("COMPUTE_G", g)),
                                        cfg["num_warps"]))
    return specs


def _ptxas(arch: int) -> str:
    """The ptxas that Triton itself uses for ``arch`` (its PTX version must match)."""
    import triton

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError, TypeError):  # older Triton layouts
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_one(spec: KernelSpec, arch: int) -> dict:
    """Compile ``spec`` for sm_<arch>; return registers/spills, or the error text."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    mod_name, attr = spec.kernel.split(":")
    fn = getattr(importlib.import_module(mod_name), attr)
    constexprs = dict(spec.constexprs)
    signature = dict(spec.signature)
    signature.update({k: "constexpr" for k in constexprs})
    out = {"name": spec.name, "arch": arch, "num_warps": spec.num_warps}
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.num_warps})
        ptx = compiled.asm["ptx"]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.ptx")
            with open(path, "w") as fh:
                fh.write(ptx)
            res = subprocess.run([_ptxas(arch), "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}",
                                  path, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(res.stderr.strip())
        info = res.stderr
        regs = re.search(r"Used (\d+) registers", info)
        spill_st = re.search(r"(\d+) bytes spill stores", info)
        spill_ld = re.search(r"(\d+) bytes spill loads", info)
        out.update(ok=True, registers=int(regs.group(1)) if regs else None,
                   spill_stores=int(spill_st.group(1)) if spill_st else 0,
                   spill_loads=int(spill_ld.group(1)) if spill_ld else 0)
    except Exception as exc:  # reported, and failed on, by the caller
        out.update(ok=False, error=f"{type(exc).__name__}: {exc}")
    return out


def compile_all(archs=(80, 90), jobs: int | None = None) -> list[dict]:
    specs = kernel_specs()
    work = [(s, a) for a in archs for s in specs]
    jobs = jobs or max(1, os.cpu_count() or 1)
    if jobs == 1:
        return [compile_one(s, a) for s, a in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_one, *zip(*work)))


def format_table(results: list[dict]) -> str:
    lines = [f"{'kernel':<40} {'arch':>5} {'warps':>5} {'regs':>5} {'spill st/ld (B)':>16}"]
    for r in results:
        if r["ok"]:
            lines.append(f"{r['name']:<40} {'sm_' + str(r['arch']):>5} {r['num_warps']:>5} {r['registers']:>5} "
                         f"{str(r['spill_stores']) + '/' + str(r['spill_loads']):>16}")
        else:
            lines.append(f"{r['name']:<40} {'sm_' + str(r['arch']):>5} FAILED: {r['error'][:200]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args(argv)
    results = compile_all(tuple(args.arch), args.jobs)
    print(format_table(results))
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)}/{len(results)} kernels compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
