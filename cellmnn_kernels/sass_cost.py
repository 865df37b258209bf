"""GPU-free cost model of the Triton kernels, read from their sm_90 machine code.

Every kernel configuration the launchers can choose (``compile_check.kernel_specs``) is compiled
ahead of time for sm_90 (through ``compile_check``, so that both share Triton's cache) and
disassembled with the ``cuobjdump`` that Triton ships.  Per kernel:
registers and spills (ptxas), the instruction mix (FP32/FP64 arithmetic, ``BAR.SYNC``,
``LDS``/``STS``, ``SHFL``, ``MUFU``, global and local memory), and every loop (a backward branch
closes one) with the instructions of its own body.

For the register kernels of ``local_linear_step`` (family "llstep_reg") the loops are matched to the kernel's
source loops and multiplied by their trip counts on a stated benchmark input (A = randn / sqrt(D),
x0 = randn, dt ~ U[0, 4], T = 16, B = 32768, seed 0; trip counts computed from the same anchor
levels the kernel uses).  The result is an estimate of thread-instructions per (cell, time) pair
and, against the H100 SXM's issue rate and copy bandwidth (``ASSUMPTIONS``), the fraction of copy
bandwidth the instruction stream alone would allow.  The two anchor-step matrix blocks are
counted as the input runs them (E- never: no dt < 0); other straight-line code inside a branch is
counted as executed (an upper bound); loops the input skips are not.  The lane-group kernels
(float32, 5 < D <= 16), the tiled ones and the laplace_mmd row kernels get the counts only, no
trip-count model.  Each result names its kernel family ("variant"), "kind" and "dtype".

    python -m cellmnn_kernels.sass_cost [--json bench/results/sass_cost_<triton version>.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch
import triton

from .compile_check import compile_one, cuda_tool, kernel_specs
from .ops.local_linear_step.common import TAYLOR

ASSUMPTIONS = {
    "gpu": "NVIDIA H100 SXM",
    "sms": 132,
    "schedulers_per_sm": 4,
    "clock_hz": 1.7e9,
    "warp_instructions_per_scheduler_per_clock": 1,
    "threads_per_warp": 32,
    "copy_bandwidth_bytes_per_s": 3.35e12,
    # NVIDIA H100 Tensor Core GPU datasheet, SXM: FP32 67 TFLOPS, TF32 Tensor Core 989 TFLOPS with
    # sparsity (494.7 dense); the fused MLP's estimate (``mlp_estimate``) uses them.
    "fp32_flops_per_s": 66.9e12,
    "tf32_tensor_flops_per_s": 494.7e12,
    "note": ("issue-bound time = thread-instructions / (SMs x schedulers x clock x 32); memory time = "
             "compulsory bytes / copy bandwidth; ceiling = min(1, memory time / issue time). "
             "Latency, occupancy and cache behaviour are not modelled. Fused MLP: tensor time = the "
             "executed HGMMA/HMMA multiply-adds x 2 / the dense TF32 peak (mma.sync at the same peak: "
             "optimistic); estimate = max(issue time, tensor time)."),
}

BENCH_INPUT = {"B": 32768, "T": 16, "A": "randn / sqrt(D)", "x0": "randn", "dt": "U[0, 4]", "seed": 0}

CLASSES = {
    "fp32": re.compile(r"^(FFMA|FMUL|FADD|FMNMX|FSEL|FSETP|FSET)\b"),
    "fp64": re.compile(r"^(DFMA|DMUL|DADD|DSETP|DMNMX)\b"),
    "bar_sync": re.compile(r"^BAR\.SYNC\b|^BAR\b(?!\.ARV)"),
    "lds": re.compile(r"^LDS\b"),
    "sts": re.compile(r"^STS\b"),
    "shfl": re.compile(r"^SHFL\b"),
    "mufu": re.compile(r"^MUFU\b"),
    "ldg": re.compile(r"^LDG\b"),
    "stg": re.compile(r"^STG\b"),
    "local": re.compile(r"^(LDL|STL)\b"),
}

_LINE = re.compile(r"/\*([0-9a-f]+)\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


@dataclass
class Instr:
    """One SASS instruction."""
    addr: int
    op: str  # opcode with modifiers, e.g. "FFMA" or "BAR.SYNC.DEFER_BLOCKING"
    pred: str
    args: str


@dataclass
class Loop:
    """A loop of the machine code, with the counts of its body."""
    start: int  # address of the first instruction of the body (the branch target)
    end: int  # address of the backward branch
    depth: int = 0
    parent: int | None = None  # index into the loop list
    children: list = field(default_factory=list)
    own: dict = field(default_factory=dict)  # counts of the body without nested loops
    total: dict = field(default_factory=dict)  # counts of the body with nested loops


def parse_sass(text: str) -> list[Instr]:
    """Instructions of a ``cuobjdump -sass`` listing (NOP padding dropped)."""
    out = []
    for line in text.splitlines():
        m = _LINE.search(line)
        if not m:
            continue
        op = m.group(3)
        if op == "NOP":
            continue
        out.append(Instr(int(m.group(1), 16), op, (m.group(2) or "").strip(), m.group(4).strip()))
    return out


def classify(op: str) -> list[str]:
    """The ``CLASSES`` an opcode falls in."""
    return [name for name, rx in CLASSES.items() if rx.match(op)]


def count(instrs) -> dict:
    """Instructions, and instructions per class of ``CLASSES``."""
    c = {"instructions": 0, **{k: 0 for k in CLASSES}}
    for ins in instrs:
        c["instructions"] += 1
        for k in classify(ins.op):
            c[k] += 1
    return c


def branches(instrs):
    """(instruction, target address) of every branch with an explicit target."""
    for ins in instrs:
        if ins.op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", ins.args)
            if m:
                yield ins, int(m.group(1), 16)


def find_loops(instrs: list[Instr]) -> list[Loop]:
    """Loops closed by backward branches, nested by address range, sorted by start address.

    The self-branch that ends every kernel (``BRA`` to its own address) is not a loop."""
    loops = [Loop(target, ins.addr) for ins, target in branches(instrs) if target < ins.addr]
    loops.sort(key=lambda l: (l.start, -l.end))
    for i, lp in enumerate(loops):
        for j in range(i - 1, -1, -1):
            outer = loops[j]
            if outer.start <= lp.start and lp.end <= outer.end:
                lp.parent = j
                lp.depth = outer.depth + 1
                outer.children.append(i)
                break
    for lp in loops:
        body = [x for x in instrs if lp.start <= x.addr <= lp.end]
        lp.total = count(body)
        nested = [loops[c] for c in lp.children]
        lp.own = count([x for x in body if not any(n.start <= x.addr <= n.end for n in nested)])
    return loops


def top_level(instrs, loops) -> dict:
    """``count`` of the instructions outside every loop."""
    outer = [l for l in loops if l.parent is None]
    return count([x for x in instrs if not any(l.start <= x.addr <= l.end for l in outer)])


# ----------------------------------------------------------------------------- compiling

def compile_sass(spec, arch: int = 90) -> dict:
    """Compile one ``compile_check.KernelSpec``; registers, spills and the SASS text."""
    res = compile_one(spec, arch, keep_cubin=True)
    if not res["ok"]:
        return res
    cubin = res.pop("cubin")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        dis = subprocess.run([cuda_tool("cuobjdump"), "-sass", path], capture_output=True, text=True)
    if dis.returncode != 0:
        res.update(ok=False, error=dis.stderr.strip())
        return res
    res["sass"] = dis.stdout
    return res


# ----------------------------------------------------------------------------- trip counts

def benchmark_levels(D: int, B: int, T: int, seed: int, theta: float, BT: int, BB: int = 32):
    """Per program and time block, the highest anchor level of the benchmark input's pairs
    (every dt >= 0, so only the forward direction marches), as the kernels compute it."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, D, D, generator=g) / math.sqrt(D)
    dt = torch.rand(B, T, generator=g) * 4.0
    nrm = A.abs().sum(dim=1).amax(dim=1)
    lev = torch.floor(dt * nrm[:, None] / theta + 0.5).to(torch.int64)
    nb = -(-T // BT)
    lev = torch.nn.functional.pad(lev, (0, nb * BT - T))  # padded pairs sit at level 0
    per_block = lev.view(B // BB, BB, nb, BT).amax(dim=(1, 3))  # (programs, time blocks)
    return per_block, lev


def register_kernel_trips(kind: str, cfg: dict, T: int, per_block) -> dict:
    """Mean trips per program of each source loop of the register kernels (``per_block``: the
    program's top level per time block, one block of all T for the backward).

    A backward loop that the compiler unrolled by u appears as "name/u" (n // u trips for n
    iterations) and its remainder loop as "name%u" (n % u trips); both are listed for u <= 8."""
    nb = per_block.shape[1]
    L = per_block.double()
    if kind == "fwd":
        return {"levels": nb, "time": nb, "march+": float(L.sum(1).mean()), "march-": 0.0}
    # Backward, iterations per program of each loop, per direction where it runs per direction:
    # the march also stores level 0, so it runs top + 1 times (once for the unused direction); the
    # reverse march runs top times (never for the unused direction).
    top = L[:, 0]
    one = top * 0 + 1
    iters = {"levels": [T * one], "directions": [2 * one], "pairs": [T * one],
             "reverse directions": [2 * one], "march": [top + 1, one], "reverse": [top, 0 * one]}
    out = {}
    for name, ns in iters.items():
        out[name] = float(sum(ns).mean())
        for u in range(2, 9):
            out[f"{name}/{u}"] = float(sum((n / u).floor() for n in ns).mean())
            out[f"{name}%{u}"] = float(sum(n - (n / u).floor() * u for n in ns).mean())
    return out


def _unrolled(loops, idx: list, name: str) -> list:
    """Labels of the loops ``idx`` that compile one source loop: the loop itself, or a loop
    unrolled by u (about u times the instructions) and its remainder."""
    if len(idx) == 1:
        return [name]
    if len(idx) != 2:
        raise ValueError(f"{len(idx)} loops for the source loop {name!r}")
    a, b = (loops[i].own["instructions"] for i in idx)
    u = max(2, round(max(a, b) / max(1, min(a, b))))
    return [f"{name}/{u}", f"{name}%{u}"] if a >= b else [f"{name}%{u}", f"{name}/{u}"]


def label_register_loops(kind: str, loops: list[Loop], D: int) -> list[str]:
    """Name every SASS loop of a register kernel after its source loop.

    Forward, top level: the levels pre-pass (loads, no stores) and the time-block loop (stores),
    which holds the two marches (+ then -); the anchor-step matrices are straight-line code.
    Backward, top level in address order: the levels pre-pass (loads only), the loop over the two
    directions holding the march (which stores the states), the loop over the pairs, and the loop
    over the directions holding the reverse march; the step matrix and its gradient are blocks
    of the two direction loops.
    Raises if the structure differs: the model must then be updated with the kernel.
    """
    labels = [None] * len(loops)
    tops = [i for i, l in enumerate(loops) if l.parent is None]
    if kind == "bwd":
        # The levels pre-pass, and for small D the marches, may come unrolled (with a remainder loop).
        lv = []
        for i in tops:
            if loops[i].own["ldg"] and not loops[i].own["stg"] and not loops[i].children:
                lv.append(i)
            else:
                break
        rest = tops[len(lv):]
        shape = [(bool(loops[i].total["ldg"]), bool(loops[i].own["stg"]), len(loops[i].children)) for i in rest]
        names = ("directions", "pairs", "reverse directions")
        if not 1 <= len(lv) <= 2 or len(rest) != 3 or not (1 <= shape[0][2] <= 2 and shape[1][2] == 0
                                                            and 1 <= shape[2][2] <= 2):
            raise ValueError(f"unexpected loop structure for the backward kernel: {len(lv)} levels loops, then "
                             f"(loads, stores, children) {shape}, expected {list(names)}")
        for i, n in zip(lv, _unrolled(loops, lv, "levels")):
            labels[i] = n
        for i, n in zip(rest, names):
            labels[i] = n
        for parent, name in ((rest[0], "march"), (rest[2], "reverse")):
            kids = loops[parent].children
            for i, n in zip(kids, _unrolled(loops, kids, name)):
                labels[i] = n
        return labels
    for i in tops:
        t = loops[i].total
        labels[i] = "time" if t["stg"] else "levels" if t["ldg"] else None
    got = sorted(str(labels[i]) for i in tops)
    if got != ["levels", "time"]:
        raise ValueError(f"unexpected loop structure for the {kind} kernel: top-level loops {got}, "
                         "expected ['levels', 'time']")
    time = next(i for i in tops if labels[i] == "time")
    inner = list(loops[time].children)
    if len(inner) != 2 or any(loops[i].children for i in inner):
        raise ValueError(f"unexpected loop structure in the forward time loop: {len(inner)} loops")
    for i, n in zip(inner, ("march+", "march-")):
        labels[i] = n
    return labels


def branch_targets(instrs) -> set:
    """Addresses some branch jumps to."""
    return {target for _, target in branches(instrs)}


def basic_blocks(region, targets) -> list[list[Instr]]:
    """``region`` (instructions in address order) cut at ``targets`` (the branch targets of the
    whole listing), after branches, and at gaps."""
    blocks, cur = [], []
    for x in region:
        if cur and (x.addr in targets or x.addr != cur[-1].addr + 0x10):
            blocks.append(cur)
            cur = []
        cur.append(x)
        if x.op.startswith(("BRA", "EXIT", "RET")):
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)
    return blocks


def matrix_blocks(instrs, loops, D: int, kind: str, labels=None) -> list[tuple[int, int, dict]]:
    """The basic blocks with at least 3 D^3 floating-point instructions: the anchor-step matrices
    E+ and E- (forward: straight-line code outside every loop) or the step matrix and its
    gradient (backward: the largest block in each direction loop, ``labels`` from
    ``label_register_loops``).  (Basic blocks rather than branch shapes: ptxas lays an ``if`` out
    as a skipped block or as an if/else depending on its version.)  Raises unless two are found."""
    targets = branch_targets(instrs)

    def big(region):
        """(start, end, counts) of the region's basic blocks with at least 3 D^3 fp instructions."""
        blocks = basic_blocks(region, targets)
        out = [(b[0].addr, b[-1].addr, count(b)) for b in blocks]
        return [o for o in out if o[2]["fp32"] + o[2]["fp64"] >= 3 * D ** 3]

    def outside(x, lps):
        """Whether instruction x lies outside the loops lps."""
        return not any(l.start <= x.addr <= l.end for l in lps)

    if kind == "fwd":
        found = big([x for x in instrs if outside(x, loops)])
    else:
        found = []
        for name in ("directions", "reverse directions"):
            lp = loops[labels.index(name)]
            kids = [loops[c] for c in lp.children]
            # (the largest such block: at small D other blocks of the loop pass 3 D^3 too)
            found += sorted(big([x for x in instrs if lp.start <= x.addr <= lp.end and outside(x, kids)]),
                            key=lambda o: o[2]["fp32"] + o[2]["fp64"])[-1:]
    if len(found) != 2:
        raise ValueError(f"expected two matrix blocks in the {kind} kernel, found {len(found)}")
    return found


def warp_issue_rate() -> float:
    """Warp-instructions the GPU of ``ASSUMPTIONS`` issues per second."""
    a = ASSUMPTIONS
    return a["sms"] * a["schedulers_per_sm"] * a["clock_hz"] * a["warp_instructions_per_scheduler_per_clock"]


def pair_bytes(kind: str, D: int, T: int, itemsize: int) -> float:
    """Compulsory global-memory bytes per pair (per-cell tensors shared by the cell's T pairs)."""
    cell = (D * D + D) * itemsize
    if kind == "fwd":
        return itemsize + 2 * D * itemsize + cell / T
    return 2 * itemsize + 2 * D * itemsize + 2 * cell / T


def estimate(kind: str, cfg: dict, sass: str, dtype_name: str, bench=BENCH_INPUT) -> dict:
    """Thread-instructions per pair of a register kernel on the benchmark input."""
    dtype = {"fp32": torch.float32, "fp64": torch.float64}[dtype_name]
    theta = TAYLOR[dtype][0]
    instrs = parse_sass(sass)
    loops = find_loops(instrs)
    labels = label_register_loops(kind, loops, cfg["D"])
    bt = cfg["BT"] if kind == "fwd" else bench["T"]
    per_block, lev = benchmark_levels(cfg["D"], bench["B"], bench["T"], bench["seed"], theta, bt, cfg["BB"])
    trips = register_kernel_trips(kind, cfg, bench["T"], per_block)
    top = top_level(instrs, loops)
    warp_instr = top["instructions"]
    # The step matrices (and their gradients) run in the programs with a pair beyond level 0, and
    # only for dt >= 0 (the input has no dt < 0).  Forward: E+ and E- are straight-line code;
    # backward: one block in each direction loop, which runs twice.
    blocks = matrix_blocks(instrs, loops, cfg["D"], kind, labels)
    ran = float((per_block.amax(dim=1) > 0).double().mean())
    rows = []
    names = ("matrix+", "matrix-") if kind == "fwd" else ("matrix", "grad")
    for (_, _, c), name in zip(blocks, names):
        if kind == "fwd":
            n = ran if name.endswith("+") else 0.0
            warp_instr -= (1.0 - n) * c["instructions"]
            rows.append({"loop": name + " (straight line)", "body_instructions": c["instructions"],
                         "trips_per_program": n})
        else:
            warp_instr -= (2.0 - ran) * c["instructions"]  # counted below with its loop's 2 trips
            rows.append({"loop": name + " (block of a direction loop)", "body_instructions": c["instructions"],
                         "trips_per_program": ran})
    for lp, name in zip(loops, labels):
        n = trips[name]
        warp_instr += lp.own["instructions"] * n
        rows.append({"loop": name, "body_instructions": lp.own["instructions"], "trips_per_program": n,
                     **{k: lp.own[k] for k in ("fp32", "fp64", "bar_sync", "lds", "sts", "shfl", "mufu", "local")}})
    pairs = cfg["BB"] * bench["T"]
    per_pair = warp_instr * ASSUMPTIONS["threads_per_warp"] / pairs
    a = ASSUMPTIONS
    rate = warp_issue_rate() * a["threads_per_warp"]
    nbytes = pair_bytes(kind, cfg["D"], bench["T"], 4 if dtype_name == "fp32" else 8)
    t_issue = per_pair / rate
    t_mem = nbytes / a["copy_bandwidth_bytes_per_s"]
    mean_level = float(lev[:, :bench["T"]].double().mean())
    return {"thread_instructions_per_pair": per_pair, "straight_line_instructions": top["instructions"],
            "bar_sync_in_anchor_loops": sum(l.own["bar_sync"] for l, n in zip(loops, labels)
                                            if n.startswith(("march", "reverse"))),
            "loops": rows, "bytes_per_pair": nbytes, "ceiling_fraction_of_copy_bandwidth": min(1.0, t_mem / t_issue),
            "mean_pair_level": mean_level, "mean_program_level_per_time_block": float(per_block.double().mean()),
            "time_block": bt}


# ----------------------------------------------------------------------------- fused MLP

MLP_BENCH = {"D": 5, "width": 96, "depth": 4, "n_out": 25}  # the default network of a 5-d model
_MMA = re.compile(r"^(HGMMA)\.64x(\d+)x8|^(HMMA)\.1688")


def mlp_loop_executions(kind: str, n_mid: int, NC: int, n_oc: int) -> list:
    """How often each loop body of the fused MLP kernels runs (per program forward, per row
    block backward), in the order ``find_loops`` lists the machine code's loops: the source
    loops whose trip counts are not compile-time constants (the forward's tile products are
    unrolled; the backward's run-time loops are those of ``_col``, ``_mma3``, ``_grad_w_cols``,
    ``_add_t``)."""
    if kind == "fwd":
        return [n_mid, n_mid * NC, n_oc]
    L, rec = n_mid + 1, n_mid * (n_mid + 1) // 2  # layers walked; hidden layers recomputed per block
    return [1, L, L * NC, rec, rec * NC, rec * NC * NC, rec * NC * NC * 3,
            n_oc, n_oc * NC, n_oc * NC * 3, n_oc * NC, n_oc * NC * 3,
            n_mid * NC, n_mid * NC * NC, n_mid * NC * NC * 3, n_mid * NC * NC, n_mid * NC * NC * 3,
            NC, NC * 3, NC * 3]


def mlp_estimate(kind: str, cfg: dict, sass: str, net=MLP_BENCH) -> dict:
    """Time per cell of a fused MLP kernel on the network ``net`` (H100 SXM, ``ASSUMPTIONS``):
    executed warp-instructions (each loop body times ``mlp_loop_executions``) at the issue rate,
    and the executed tensor-core multiply-adds at the TF32 peak; against the FLOP limit of the
    useful arithmetic (forward 2 (in w + n_mid w^2 + w out) per cell, backward twice that) at the
    FP32 peak, and at a third of the TF32 peak (three tf32 products per product)."""
    a = ASSUMPTIONS
    n_in, w, n_mid, n_oc = net["D"] + 1, net["width"], net["depth"] - 1, -(-net["n_out"] // 32)
    instrs = parse_sass(sass)
    loops = find_loops(instrs)
    runs = mlp_loop_executions(kind, n_mid, cfg["NC"], n_oc)
    if len(runs) != len(loops):
        raise ValueError(f"fused MLP {kind}: {len(loops)} loops in the machine code, the model knows {len(runs)}")
    warps = cfg["num_warps"]

    def macs(ins):  # multiply-adds per program of these instructions, each run once
        total = 0
        for i in ins:
            m = _MMA.match(i.op + i.args)  # the opcode parse stops at the lower-case x of "64x32x8"
            if m and m.group(1):
                total += 64 * int(m.group(2)) * 8 * warps // 4  # one per warpgroup
            elif m:
                total += 16 * 8 * 8 * warps  # m16n8k8, one per warp
        return total
    roots = [lp for lp in loops if lp.parent is None]
    outside = [i for i in instrs if not any(lp.start <= i.addr <= lp.end for lp in roots)]
    warp_instr, mac = len(outside), macs(outside)
    for idx, (lp, n) in enumerate(zip(loops, runs)):
        kids = [k for k, c in enumerate(loops) if c.parent == idx]
        own = [i for i in instrs if lp.start <= i.addr <= lp.end
               and not any(loops[k].start <= i.addr <= loops[k].end for k in kids)]
        warp_instr += len(own) * n
        mac += macs(own) * n
    BM = cfg["BM"]
    per_cell = warp_instr * warps / BM
    t_issue = per_cell / warp_issue_rate()
    t_tensor = 2 * mac / BM / a["tf32_tensor_flops_per_s"]
    useful = 2 * (n_in * w + n_mid * w * w + w * net["n_out"]) * (1 if kind == "fwd" else 2)
    t_est = max(t_issue, t_tensor)
    return {"network": dict(net), "warp_instructions_per_cell": per_cell, "tensor_macs_per_cell": mac / BM,
            "useful_flops_per_cell": useful, "issue_ns_per_cell": 1e9 * t_issue, "tensor_ns_per_cell": 1e9 * t_tensor,
            "estimate_ns_per_cell": 1e9 * t_est, "fp32_limit_ns_per_cell": 1e9 * useful / a["fp32_flops_per_s"],
            "tf32x3_limit_ns_per_cell": 3e9 * useful / a["tf32_tensor_flops_per_s"],
            "over_fp32_limit": t_est * a["fp32_flops_per_s"] / useful,
            "over_tf32x3_limit": t_est * a["tf32_tensor_flops_per_s"] / (3 * useful)}


# ----------------------------------------------------------------------------- report

def _analyse(args):
    """Compile one work item for sm_90 and read its counts, loops and (register kernels) estimate."""
    spec, meta, est = args
    res = compile_sass(spec, 90)
    res.update({k: meta[k] for k in ("variant", "kind", "dtype")})
    if not res["ok"]:
        return res
    sass = res.pop("sass")
    instrs = parse_sass(sass)
    loops = find_loops(instrs)
    res["counts"] = count(instrs)
    res["loops"] = len(loops)
    res["in_loops"] = {k: sum(l.own[k] for l in loops) for k in ("bar_sync", "lds", "sts", "shfl", "local")}
    if est is not None:
        kind, cfg, dtype_name = est
        try:
            if meta["variant"] == "fused_mlp":
                res["estimate"] = mlp_estimate(kind, cfg, sass)
            else:
                res["estimate"] = estimate(kind, cfg, sass, dtype_name)
        except ValueError as exc:
            res["estimate_error"] = str(exc)
    return res


def work_items(only_d=None, dtypes=("fp32", "fp64"), tiled=True, mmd=True, family_only=None, every=True):
    """(spec, meta, estimate arguments or None) of every kernel to analyse: the register and
    lane-group step kernels (only D in ``only_d`` if given), the tiled step kernels (``tiled``),
    the laplace_mmd row kernels (``mmd``) and, when ``family_only`` names them, the SDE covariance
    kernels (counts only), in ``dtypes``;
    ``family_only``: one kernel family alone; ``every=False``: the representative configurations."""
    items = []
    for spec, meta in kernel_specs(every=every, with_meta=True, arch=90):
        family = meta["variant"]
        if meta["dtype"] not in dtypes or (family_only is not None and family != family_only):
            continue
        if family in ("llstep_reg", "llstep_group"):
            if only_d is not None and meta["cfg"]["D"] not in only_d:
                continue
            # Per-pair estimates for the register kernels; counts only for the lane-group ones.
            est = (meta["kind"], meta["cfg"], meta["dtype"]) if family == "llstep_reg" else None
            items.append((spec, meta, est))
        elif family == "fused_mlp" and (only_d is None or family_only == "fused_mlp"):
            # the estimate for the default network (inputs padded to 16 columns)
            est = (meta["kind"], meta["cfg"], meta["dtype"]) if meta["cfg"]["KI"] == 16 else None
            items.append((spec, meta, est))
        elif (family == "llstep_tiled" and tiled) or (family.startswith("laplace") and mmd) \
                or (family == "sde_cov" and family_only == "sde_cov"):
            items.append((spec, meta, None))
    return items


def run(only_d=None, dtypes=("fp32", "fp64"), tiled=True, mmd=True, jobs=None, family_only=None,
        every=True) -> list[dict]:
    """Analyse ``work_items(...)`` in ``jobs`` processes; one result dict per kernel."""
    items = work_items(only_d, dtypes, tiled, mmd, family_only, every)
    jobs = jobs or max(1, os.cpu_count() or 1)
    if jobs == 1:
        return [_analyse(i) for i in items]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_analyse, items))


def format_table(results) -> str:
    """One line per kernel: registers, spills, instruction counts, and the register kernels'
    per-pair estimate and bandwidth ceiling."""
    lines = [f"{'kernel':<52} {'regs':>4} {'spill':>5} {'instr':>6} {'BAR':>4} {'LDS/STS':>8} {'SHFL':>4} "
             f"{'MUFU':>4} {'loop BAR':>8} {'per pair':>9} {'ceiling':>8}"]
    for r in results:
        if not r["ok"]:
            lines.append(f"{r['name']:<52} FAILED: {r['error'][:150]}")
            continue
        c = r["counts"]
        est = r.get("estimate")
        pp = f"{est['thread_instructions_per_pair']:9.0f}" if est and "network" not in est else f"{'-':>9}"
        ceil = f"{100 * est['ceiling_fraction_of_copy_bandwidth']:7.0f}%" if est and "network" not in est \
            else f"{'-':>8}"
        lines.append(f"{r['name']:<52} {r['registers']:>4} {r['spill_stores']:>5} {c['instructions']:>6} "
                     f"{c['bar_sync']:>4} {str(c['lds']) + '/' + str(c['sts']):>8} {c['shfl']:>4} {c['mufu']:>4} "
                     f"{r['in_loops']['bar_sync']:>8} {pp} {ceil}")
        if est and "network" in est:
            lines.append(f"  {'':<50} per cell {est['estimate_ns_per_cell']:.3f} ns (issue "
                         f"{est['issue_ns_per_cell']:.3f}, tensor {est['tensor_ns_per_cell']:.3f}); FLOP limit fp32 "
                         f"{est['fp32_limit_ns_per_cell']:.3f} ns ({est['over_fp32_limit']:.2f}x), 3xtf32 "
                         f"{est['tf32x3_limit_ns_per_cell']:.3f} ns ({est['over_tf32x3_limit']:.2f}x)")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Command line: analyse, print the table, write the JSON report; exit 1 if a compile failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--d", type=int, nargs="+", default=None,
                        help="register and lane-group step kernels: only these D")
    parser.add_argument("--dtype", nargs="+", default=["fp32", "fp64"], choices=["fp32", "fp64"])
    parser.add_argument("--no-tiled", action="store_true", help="skip the lane-tiled step kernels")
    parser.add_argument("--no-mmd", action="store_true", help="skip the laplace_mmd kernels")
    parser.add_argument("--family", default=None, help="one kernel family only (e.g. sde_cov)")
    parser.add_argument("--representative", action="store_true", help="the representative configurations only")
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args(argv)
    results = run(args.d, tuple(args.dtype), not args.no_tiled, not args.no_mmd, args.jobs, args.family,
                  not args.representative)
    print(format_table(results))
    print("per pair: estimated thread-instructions per (cell, time) pair on the benchmark input "
          f"{BENCH_INPUT}; ceiling: the fraction of {ASSUMPTIONS['gpu']} copy bandwidth that issue "
          "rate allows (see ASSUMPTIONS)")
    if args.json:
        report = {"format": "cellmnn-sass-cost", "triton": triton.__version__, "arch": "sm_90",
                  "assumptions": ASSUMPTIONS, "benchmark_input": BENCH_INPUT, "kernels": results}
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(report, fh, indent=1)
        os.replace(tmp, args.json)
    failed = [r for r in results if not r["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
