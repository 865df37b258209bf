"""Ahead-of-time compile of every Triton kernel for NVIDIA GPUs, on a machine without one.

The interpreter used by the CPU tests accepts code that the GPU compiler rejects, so CI compiles
each kernel for sm_80 and sm_90 in every constexpr configuration the launchers can choose, and
reports registers and spills from ``ptxas -v``.

    python -m cellmnn_kernels.compile_check [--arch 80 90] [--jobs N] [--reg-d D ...]
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


def _signature(kernel, dtype_tag: str, constexprs: dict, pointer_types=None) -> tuple:
    """The kernel's own arguments, in order, typed by name: ``*_ptr`` arguments point to the op's
    dtype (unless ``pointer_types`` says otherwise), ``theta``/``nu_max`` are fp32 scalars and the
    rest i32 (sizes and strides)."""
    pointer_types = pointer_types or {}
    sig = []
    for name in _arg_names(kernel):
        if name in constexprs:
            continue
        if name.endswith("_ptr"):
            sig.append((name, pointer_types.get(name, "*" + dtype_tag)))
        elif name in ("theta", "nu_max"):
            sig.append((name, "fp32"))
        else:
            sig.append((name, "i32"))
    return tuple(sig)


def _arg_names(kernel) -> list:
    fn = getattr(kernel, "fn", kernel)  # an interpreted kernel wraps the Python function
    names = getattr(kernel, "arg_names", None)
    if names is None:
        import inspect

        names = list(inspect.signature(fn).parameters)
    return list(names)


def kernel_specs(with_meta: bool = False) -> list:
    """Every (kernel, configuration) the launchers of all ops can choose; signatures come from the
    kernels' own argument lists, constexpr values from the launchers' ``block_config``."""
    from .ops.local_linear_step import triton_impl as reg, triton_tiled as tiled
    from .ops.local_linear_step.common import TAYLOR
    from .ops.utils import next_power_of_2

    out = []

    def add(spec, **meta):
        out.append((spec, meta))

    mod = "cellmnn_kernels.ops.local_linear_step.triton_impl"
    for dtype in TAYLOR:
        f = _DTYPE_SIG[dtype]
        for cfg in reg.all_configs(dtype):
            fwd_c = {**{k: cfg[k] for k in ("D", "BB", "BT", "M", "MF")}, "SAVE_ANCHORS": False}
            bwd_c = {**{k: cfg[k] for k in ("D", "BB", "M", "MF")}, "SAVE_ANCHORS": False}
            tag = f"{f}_D{cfg['D']}"
            add(KernelSpec(f"llstep_fwd_{tag}_BT{cfg['BT']}", f"{mod}:_llstep_fwd_kernel",
                           _signature(reg._llstep_fwd_kernel, f, fwd_c), tuple(fwd_c.items()), cfg["num_warps"]),
                family="llstep_reg", kind="fwd", dtype=f, cfg=dict(cfg, BT=cfg["BT"]))
            add(KernelSpec(f"llstep_bwd_{tag}", f"{mod}:_llstep_bwd_kernel",
                           _signature(reg._llstep_bwd_kernel, f, bwd_c), tuple(bwd_c.items()), cfg["num_warps"]),
                family="llstep_reg", kind="bwd", dtype=f, cfg=cfg)
    from .ops.local_linear_step import triton_group as group

    mod = "cellmnn_kernels.ops.local_linear_step.triton_group"
    for dtype in TAYLOR:
        f = _DTYPE_SIG[dtype]
        for cfg in group.all_configs(dtype):
            c = {k: cfg[k] for k in ("D", "G", "R", "BT", "M", "MF")}
            add(KernelSpec(f"llstep_group_fwd_{f}_D{cfg['D']}_G{cfg['G']}_BT{cfg['BT']}",
                           f"{mod}:_llstep_fwd_group_kernel", _signature(group._llstep_fwd_group_kernel, f, c),
                           tuple(c.items()), cfg["num_warps"]),
                family="llstep_group", kind="fwd", dtype=f, cfg=cfg)
            cfg = group.block_config(cfg["D"], dtype, backward=True)
            c = {k: cfg[k] for k in ("D", "G", "R", "M", "MF")}
            add(KernelSpec(f"llstep_group_bwd_{f}_D{cfg['D']}_G{cfg['G']}",
                           f"{mod}:_llstep_bwd_group_kernel", _signature(group._llstep_bwd_group_kernel, f, c),
                           tuple(c.items()), cfg["num_warps"]),
                family="llstep_group", kind="bwd", dtype=f, cfg=cfg)
    mod = "cellmnn_kernels.ops.local_linear_step.triton_tiled"
    for dtype, (_, m) in TAYLOR.items():
        f = _DTYPE_SIG[dtype]
        # The D the register and lane-group kernels serve never reach the tiled ones.
        min_d = max([1] + [c["D"] + 1 for c in reg.all_configs(dtype) + group.all_configs(dtype)])
        for cfg in tiled.all_configs(dtype, min_d=min_d):
            tag = f"{f}_DP{cfg['DP']}_BT{cfg['BT']}"
            fwd_c = {"DP": cfg["DP"], "BB": cfg["BB"], "BT": cfg["BT"], "M": m}
            bwd_c = {"DP": cfg["DP"], "BB": cfg["BB_BWD"], "BT": cfg["BT"], "M": m,
                     "MP": next_power_of_2(m + 2), "CAP": tiled.CAP}
            add(KernelSpec(f"llstep_tiled_fwd_{tag}_BB{cfg['BB']}", f"{mod}:_llstep_fwd_kernel",
                           _signature(tiled._llstep_fwd_kernel, f, fwd_c), tuple(fwd_c.items()), cfg["num_warps"]),
                family="llstep_tiled", kind="fwd", dtype=f, cfg=cfg)
            add(KernelSpec(f"llstep_tiled_bwd_{tag}_BB{cfg['BB_BWD']}", f"{mod}:_llstep_bwd_kernel",
                           _signature(tiled._llstep_bwd_kernel, f, bwd_c), tuple(bwd_c.items()), cfg["num_warps"]),
                family="llstep_tiled", kind="bwd", dtype=f, cfg=cfg)
    mod = "cellmnn_kernels.ops.laplace_mmd.triton_impl"
    from .ops.laplace_mmd import triton_impl as mmd

    for dtype, f in _DTYPE_SIG.items():
        for cfg in mmd.all_configs(dtype):
            for g in (False, True):
                if cfg["reg"]:
                    kern, name = mmd._laplace_rows_reg_kernel, "_laplace_rows_reg_kernel"
                    c = {"D": cfg["D"], "BM": cfg["BM"], "BN": cfg["BN"], "COMPUTE_G": g}
                    tag = f"laplace_rows_reg_{f}_D{cfg['D']}_BM{cfg['BM']}_BN{cfg['BN']}"
                else:
                    kern, name = mmd._laplace_rows_kernel, "_laplace_rows_kernel"
                    c = {"DP": cfg["DP"], "BM": cfg["BM"], "BN": cfg["BN"], "COMPUTE_G": g}
                    tag = f"laplace_rows_{f}_DP{cfg['DP']}_BM{cfg['BM']}_BN{cfg['BN']}"
                add(KernelSpec(tag + ("_G" if g else ""), f"{mod}:{name}",
                               _signature(kern, f, c, {"items_ptr": "*i64"}), tuple(c.items()), cfg["num_warps"]),
                    family="laplace", kind="G" if g else "r", dtype=f, cfg=cfg)
    return out if with_meta else [s for s, _ in out]


def _tool(name: str) -> str:
    """A CUDA binary that Triton ships (ptxas, cuobjdump, nvdisasm)."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _ptxas(arch: int) -> str:
    """The ptxas that Triton itself uses for ``arch`` (its PTX version must match)."""
    import triton

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError, TypeError):  # older Triton layouts
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_one(spec: KernelSpec, arch: int, keep_cubin: bool = False) -> dict:
    """Compile ``spec`` for sm_<arch>; return registers/spills (and the cubin), or the error text."""
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
            if keep_cubin:
                with open(os.path.join(tmp, "k.cubin"), "rb") as fh:
                    out["cubin"] = fh.read()
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


def compile_all(archs=(80, 90), jobs: int | None = None, reg_d=None) -> list[dict]:
    specs = [s for s, m in kernel_specs(with_meta=True)
             if reg_d is None or not m["cfg"].get("reg", m["family"] in ("llstep_reg", "llstep_group"))
             or m["cfg"]["D"] in reg_d]
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
    parser.add_argument("--reg-d", type=int, nargs="+", default=None,
                        help="register kernels (unrolled over D, one compile per D): only these D "
                             "(default: every D they serve)")
    args = parser.parse_args(argv)
    results = compile_all(tuple(args.arch), args.jobs, args.reg_d)
    print(format_table(results))
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)}/{len(results)} kernels compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
