"""Operations per training step: how many device kernels one step of ``cellmnn.train`` would launch.

    python bench/bench_step_ops.py [--E 1 9 64] [--json bench/results/step_ops_cpu.json]
    TRITON_INTERPRET=1 python bench/bench_step_ops.py --path gpu [--json bench/results/step_ops_gpu_path.json]

One step of the ensemble trainer (EMT 3-d, holdouts rotating over members, defaults) is recorded
by ``torch.profiler`` on the CPU after three warm-up steps.  Counted: the ATen operations that do
work, i.e. those with no such operation inside them (the leaves of the call tree, forward, backward
and optimizer), leaving out views and metadata (view, reshape, expand, slice, select, empty, ...): on
a GPU each of them is one kernel launch.  Host synchronisations are counted as the
``_local_scalar_dense`` calls inside the step (what ``item()``, ``int()`` and ``bool()`` of a
tensor call), with the operation that made each.  Printed per E: the total, the 12 most frequent
operations and what calls the copies.

``--path cpu`` (default; batch 200): the CPU path, the torch backends.  ``--path gpu``: the path a
CUDA device takes, the Triton kernels (``backend="triton"``, the operator network through
``fused_mlp``'s kernels as "auto" picks them on CUDA), interpreted on the CPU, as a CUDA graph
captures it (the default on CUDA: the step's backward sizes its scratch without a host read,
``triton_impl.capturing``); every kernel launch counts one, and the ATen operations the interpreter
makes inside a launch are not counted.  The
count does not depend on the batch size, so this path uses batches of 16 cells (the interpreter is
slow).  One difference from a GPU remains: on the CPU torch's fused AdamW reads its step count on
the host (one synchronisation that a CUDA device does not make).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cellmnn  # noqa: E402
from cellmnn.files import check_output, json_kind  # noqa: E402
from record import write_record  # noqa: E402  (bench/record.py, beside this script)
from cellmnn.train import HParams, Member  # noqa: E402
from cellmnn.train.layout import Setup  # noqa: E402
from cellmnn.train import step as train_step  # noqa: E402
from cellmnn.train.step import Runner  # noqa: E402
from cellmnn_kernels import fused_mlp  # noqa: E402

FORMAT = "cellmnn-step-ops"
JSON_KIND = json_kind(FORMAT)
NO_WORK = {"view", "reshape", "expand", "as_strided", "t", "transpose", "permute", "unsqueeze", "squeeze",
           "select", "slice", "empty", "empty_like", "empty_strided", "alias", "detach", "lift_fresh",
           "resolve_conj", "resolve_neg", "_unsafe_view", "narrow", "unbind", "split", "split_with_sizes",
           "chunk", "view_as", "contiguous", "result_type", "_reshape_alias", "movedim", "expand_as",
           "diagonal", "is_nonzero", "_has_compatible_shallow_copy_type", "set_", "as_strided_",
           "new_empty", "new_empty_strided", "to"}  # "to" with no ATen child is a no-op (a copy's child counts)
SYNCS = {"item", "_local_scalar_dense"}


def _work(name: str) -> bool:
    return name.startswith("aten::") and name[6:] not in NO_WORK and name[6:] not in SYNCS


LAUNCH = "triton kernel launch"  # the profiler range around each interpreted launch


@contextlib.contextmanager
def gpu_path():
    """The step as a CUDA device captures it, on the CPU: the operator network through fused_mlp's
    Triton kernels, the step's backward as under capture, and every Triton launch recorded as one
    ``LAUNCH`` range (counted by kernel)."""
    import triton.runtime.interpreter as interpreter  # noqa: PLC0415 - only this path needs triton
    from cellmnn_kernels.ops.local_linear_step import triton_impl as llstep_triton  # noqa: PLC0415 - as above

    launches = collections.Counter()
    run, mlp = interpreter.InterpretedFunction.run, train_step.stacked_mlp

    def counted(fn, *args, **kwargs):
        launches[fn.fn.__name__] += 1
        with torch.profiler.record_function(LAUNCH):
            return run(fn, *args, **kwargs)

    interpreter.InterpretedFunction.run = counted
    train_step.stacked_mlp = lambda flat, shapes, x, backend: fused_mlp(flat, shapes, x, backend="triton")
    capturing, llstep_triton.capturing = llstep_triton.capturing, lambda device: True
    try:
        yield launches
    finally:
        interpreter.InterpretedFunction.run, train_step.stacked_mlp = run, mlp
        llstep_triton.capturing = capturing


def _work_below(e) -> bool:
    """Whether an operation that does work runs anywhere inside event e (then e itself is not counted)."""
    return any(_work(c.name) or _work_below(c) for c in e.cpu_children)


def _in_launch(e) -> bool:
    p = e.cpu_parent
    while p is not None:
        if p.name == LAUNCH:
            return True
        p = p.cpu_parent
    return False


def count(E: int, batch: int = 200, path: str = "cpu") -> dict:
    """Kernel-launching operations and host synchronisations of one step with E members."""
    m = cellmnn.load_marginals(None)
    hp = HParams(batch_size=batch, verbose=False, backend="triton" if path == "gpu" else "auto")
    s = Setup(m, [Member(1 + e % 3, e, hp) for e in range(E)], torch.device("cpu"))
    with gpu_path() if path == "gpu" else contextlib.nullcontext(collections.Counter()) as launches:
        runner = Runner(s, s.flat0, False)
        for _ in range(3):
            runner.step()
        launches.clear()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            runner.step()
    ops, copies, syncs = collections.Counter(), collections.Counter(), collections.Counter()
    for e in prof.events():
        if _in_launch(e):
            continue
        if e.name == "aten::_local_scalar_dense":  # what item(), int() and bool() of a tensor call
            caller = e.cpu_parent.cpu_parent if e.cpu_parent is not None else None
            syncs[caller.name if caller is not None else "a tensor read in Python"] += 1
        if not _work(e.name) or _work_below(e):
            continue
        ops[e.name] += 1
        if e.name == "aten::copy_":
            parent = e.cpu_parent
            copies[parent.name if parent is not None else "(top)"] += 1
    n_launch = sum(launches.values())
    return dict(E=E, batch=batch, path=path, ops=sum(ops.values()), kernel_launches=n_launch,
                launches=sum(ops.values()) + n_launch, host_syncs=sum(syncs.values()), syncs_from=syncs.most_common(),
                most=ops.most_common(12), kernels=dict(launches), copies_from=copies.most_common(6))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--E", type=int, nargs="+", default=[1, 9, 64])
    ap.add_argument("--path", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.json:
        check_output(args.json, JSON_KIND, "--json")
    if args.path == "gpu" and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--path gpu runs the Triton kernels on the CPU: set TRITON_INTERPRET=1 before running")
    torch.set_num_threads(1)
    rows = []
    for E in args.E:
        r = count(E, 16 if args.path == "gpu" else 200, args.path)
        rows.append(r)
        print(f"E = {E:3d}: {r['launches']} launches per step ({r['ops']} tensor operations, {r['kernel_launches']} "
              f"Triton kernels), {r['host_syncs']} host synchronisations", flush=True)
        print("   most: " + ", ".join(f"{n[6:]} {k}" for n, k in r["most"]))
        if r["kernels"]:
            print("   kernels: " + ", ".join(f"{n} {k}" for n, k in r["kernels"].items()))
        print("   synchronisations from: " + ", ".join(f"{n} {k}" for n, k in r["syncs_from"]))
        print("   copies from: " + ", ".join(f"{n} {k}" for n, k in r["copies_from"]))
    if args.json:
        write_record(args.json, FORMAT, JSON_KIND, torch=torch.__version__, rows=rows)


if __name__ == "__main__":
    main()
