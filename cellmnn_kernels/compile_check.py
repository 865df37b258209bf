"""Ahead-of-time compile of the Triton kernels for NVIDIA GPUs, on a machine without one.

The interpreter used by the CPU tests accepts code that the GPU compiler rejects, so CI compiles
the kernels for sm_80 and sm_90 and reports registers and spills from ``ptxas -v``.  The kernels
are those of every kernel family (``variants``: ``ops.variant.KernelVariant`` objects of every
op); each family lists its configurations, and a configuration's constexprs are picked by the
kernel's own ``tl.constexpr`` parameters (``ops.variant.launch_kwargs``, as the launchers do).
By default every configuration the launchers can choose; ``--representative``: only the
configurations that stand for each family and kernel (``KernelVariant.representative``).

    python -m cellmnn_kernels.compile_check [--arch 80 90] [--jobs N] [--representative] [--reg-d D ...]

Compiles go through Triton's cache (``TRITON_CACHE_DIR``, default ~/.triton/cache), which
``sass_cost`` shares; processes compiling the same kernel at the same time wait for each other
(a lock per kernel and arch), so that the second one finds it in the cache.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib
import inspect
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget

from .ops.fused_mlp import triton_impl as fmlp
from .ops.laplace_mmd import triton_impl as mmd
from .ops.laplace_mmd_loss import triton_impl as mmd_loss
from .ops.local_linear_sde import triton_impl as sde
from .ops.local_linear_step import triton_impl as llstep
from .ops.sample_cells import triton_impl as sampler
from .ops.variant import launch_kwargs

try:
    from triton.backends.nvidia.compiler import get_ptxas
except ImportError:  # older Triton layouts
    get_ptxas = None

DTYPE_TAGS = {torch.float32: "fp32", torch.float64: "fp64"}


@dataclass(frozen=True)
class KernelSpec:
    """One kernel in one configuration, as ``compile_one`` compiles it (picklable)."""
    name: str
    kernel: str  # "module:attribute" so that specs pickle across processes
    signature: tuple  # ((argument, type), ...) in order
    constexprs: tuple  # ((name, value), ...)
    num_warps: int
    num_stages: int | None = None  # Triton's default where None


def variants() -> tuple:
    """Every Triton kernel family of every op."""
    return llstep.VARIANTS + mmd.VARIANTS + mmd_loss.VARIANTS + sde.VARIANTS + fmlp.VARIANTS + sampler.VARIANTS


def _signature(kernel, dtype_tag: str, constexprs: dict, pointer_types: dict) -> tuple:
    """The kernel's own run-time arguments, in order, typed by name: ``*_ptr`` arguments point to
    the op's dtype (unless ``pointer_types`` says otherwise), ``theta``/``nu_max`` are fp32 scalars
    and the rest i32 (sizes and strides)."""
    fn = getattr(kernel, "fn", kernel)  # an interpreted kernel wraps the Python function
    sig = []
    for name in getattr(kernel, "arg_names", None) or list(inspect.signature(fn).parameters):
        if name in constexprs:
            continue
        if name.endswith("_ptr"):
            sig.append((name, pointer_types.get(name, "*" + dtype_tag)))
        elif name in ("theta", "nu_max"):
            sig.append((name, "fp32"))
        else:
            sig.append((name, "i32"))
    return tuple(sig)


def spec_of(variant, kind: str, dtype: torch.dtype, cfg: dict) -> KernelSpec:
    """The ``KernelSpec`` of ``variant``'s kernel ``kind`` in configuration ``cfg``, named
    <family>_<kind>_<dtype>_<integer constexprs>."""
    kernel = variant.kernels[kind]
    kw = launch_kwargs(kernel, cfg)
    num_warps = kw.pop("num_warps")
    num_stages = kw.pop("num_stages", None)
    tag = DTYPE_TAGS[dtype]
    sizes = "_".join(f"{k}{v}" for k, v in kw.items() if not isinstance(v, bool))
    fn = getattr(kernel, "fn", kernel)
    return KernelSpec(f"{variant.name}_{kind}_{tag}_{sizes}", f"{fn.__module__}:{fn.__name__}",
                      _signature(kernel, tag, kw, variant.pointer_types), tuple(kw.items()), num_warps, num_stages)


def kernel_specs(every: bool = True, with_meta: bool = False, only_d=None, arch: int | None = None) -> list:
    """The (kernel, configuration) pairs to compile: every one the launchers of all ops can choose
    (``every``), or each family's representative ones (for ``arch``, when an entry names one);
    ``only_d``: only configurations for these D (families unrolled over D at compile time, whose
    configuration names D).  With ``with_meta``: (spec, {"variant", "kind", "dtype", "cfg"}) pairs."""
    out = []
    for v in variants():
        for kind in v.kernels:
            for dtype, tag in DTYPE_TAGS.items():
                if every:
                    cfgs = v.configs(kind, dtype, arch)
                else:
                    cfgs = [v.config_for(kind, r[1], dtype, 16, arch) for r in v.representative if r[0] == kind and
                            r[2] == dtype and (len(r) < 4 or arch is None or r[3] == arch)]
                for cfg in cfgs:
                    if only_d is not None and "D" in launch_kwargs(v.kernels[kind], cfg) and cfg["D"] not in only_d:
                        continue
                    out.append((spec_of(v, kind, dtype, cfg), dict(variant=v.name, kind=kind, dtype=tag, cfg=cfg)))
    return out if with_meta else [s for s, _ in out]


def cuda_tool(name: str) -> str:
    """A CUDA binary that Triton ships (ptxas, cuobjdump, nvdisasm)."""
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _ptxas(arch: int) -> str:
    """The ptxas that Triton itself uses for ``arch`` (its PTX version must match)."""
    try:
        return get_ptxas(arch).path
    except (AttributeError, TypeError):  # older Triton layouts (get_ptxas None or another signature)
        return cuda_tool("ptxas")


@contextmanager
def _compile_lock(spec: KernelSpec, arch: int):
    """Held while ``spec`` compiles for ``arch``: a second process compiling the same kernel (a
    parallel test, ``sass_cost``) waits, then finds it in Triton's cache."""
    key = repr((spec, arch, sys.prefix, os.environ.get("TRITON_CACHE_DIR", ""), os.path.expanduser("~")))
    path = os.path.join(tempfile.gettempdir(), f"cellmnn-compile-{hashlib.sha256(key.encode()).hexdigest()[:24]}.lock")
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def compile_one(spec: KernelSpec, arch: int, keep_cubin: bool = False) -> dict:
    """Compile ``spec`` for sm_<arch>; return registers/spills (and the cubin), or the error text."""
    with _compile_lock(spec, arch):
        return _compile(spec, arch, keep_cubin)


def _compile(spec: KernelSpec, arch: int, keep_cubin: bool) -> dict:
    """``compile_one`` without the lock."""
    mod_name, attr = spec.kernel.split(":")
    fn = getattr(importlib.import_module(mod_name), attr)
    constexprs = dict(spec.constexprs)
    signature = dict(spec.signature)
    signature.update({k: "constexpr" for k in constexprs})
    out = {"name": spec.name, "arch": arch, "num_warps": spec.num_warps}
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.num_warps,
                                           **({} if spec.num_stages is None else {"num_stages": spec.num_stages})})
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


def compile_all(archs=(80, 90), jobs: int | None = None, every: bool = True, only_d=None) -> list[dict]:
    """Compile ``kernel_specs(every, only_d=only_d, arch=a)`` for every arch ``a`` in ``jobs`` processes."""
    work = [(s, a) for a in archs for s in kernel_specs(every, only_d=only_d, arch=a)]
    jobs = jobs or max(1, os.cpu_count() or 1)
    if jobs == 1:
        return [compile_one(s, a) for s, a in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_one, *zip(*work)))


def format_table(results: list[dict]) -> str:
    """One line per compile: kernel, arch, warps, registers and spills (or the error)."""
    lines = [f"{'kernel':<56} {'arch':>5} {'warps':>5} {'regs':>5} {'spill st/ld (B)':>16}"]
    for r in results:
        if r["ok"]:
            lines.append(f"{r['name']:<56} {'sm_' + str(r['arch']):>5} {r['num_warps']:>5} {r['registers']:>5} "
                         f"{str(r['spill_stores']) + '/' + str(r['spill_loads']):>16}")
        else:
            lines.append(f"{r['name']:<56} {'sm_' + str(r['arch']):>5} FAILED: {r['error'][:200]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Command line: compile, print the table, exit 1 if any kernel failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--representative", action="store_true",
                        help="only each family's representative configurations (default: every configuration)")
    parser.add_argument("--reg-d", type=int, nargs="+", default=None,
                        help="kernels unrolled over D (one compile per D): only these D (default: every D they serve)")
    args = parser.parse_args(argv)
    results = compile_all(tuple(args.arch), args.jobs, not args.representative, args.reg_d)
    print(format_table(results))
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)}/{len(results)} kernels compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
