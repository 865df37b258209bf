"""Operations per training step: how many device kernels one step of ``cellmnn.train`` would launch.

    python bench/bench_step_ops.py [--E 1 9 64] [--json bench/results/step_ops_cpu.json]

One step of the ensemble trainer (EMT 3-d, batch 200, holdouts rotating over members, defaults) is
recorded by ``torch.profiler`` on the CPU after three warm-up steps.  Counted: the ATen operations
that do work, i.e. those without an ATen child (the leaves of the call tree, forward, backward and
optimizer), leaving out views and metadata (view, reshape, expand, slice, select, empty, ...): on
a GPU each of them is one kernel launch.  Host synchronisations are counted as the
``_local_scalar_dense`` calls inside the step (what ``item()``, ``int()`` and ``bool()`` of a
tensor call).  Printed per E: the total, the 12 most frequent operations and what calls the
copies.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cellmnn  # noqa: E402
from cellmnn.files import check_output, json_kind  # noqa: E402
from record import write_record  # noqa: E402  (bench/record.py, beside this script)
from cellmnn.train import HParams, Member  # noqa: E402
from cellmnn.train.layout import Setup  # noqa: E402
from cellmnn.train.step import Runner  # noqa: E402

FORMAT = "cellmnn-step-ops"
JSON_KIND = json_kind(FORMAT)
NO_WORK = {"view", "reshape", "expand", "as_strided", "t", "transpose", "permute", "unsqueeze", "squeeze",
           "select", "slice", "empty", "empty_like", "empty_strided", "alias", "detach", "lift_fresh",
           "resolve_conj", "resolve_neg", "_unsafe_view", "narrow", "unbind", "split", "split_with_sizes",
           "chunk", "view_as", "contiguous", "result_type", "_reshape_alias", "movedim", "expand_as",
           "diagonal", "is_nonzero", "_has_compatible_shallow_copy_type", "set_", "as_strided_"}
SYNCS = {"item", "_local_scalar_dense"}


def _work(name: str) -> bool:
    return name.startswith("aten::") and name[6:] not in NO_WORK and name[6:] not in SYNCS


def count(E: int, batch: int = 200) -> dict:
    """Kernel-launching operations and host synchronisations of one step with E members."""
    m = cellmnn.load_marginals(None)
    hp = HParams(batch_size=batch, verbose=False)
    s = Setup(m, [Member(1 + e % 3, e, hp) for e in range(E)], torch.device("cpu"))
    runner = Runner(s, s.flat0, False)
    for _ in range(3):
        runner.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        runner.step()
    ops, copies, syncs = collections.Counter(), collections.Counter(), 0
    for e in prof.events():
        if e.name == "aten::_local_scalar_dense":  # what item(), int() and bool() of a tensor call
            syncs += 1
        if not _work(e.name) or any(_work(c.name) for c in e.cpu_children):
            continue
        ops[e.name] += 1
        if e.name == "aten::copy_":
            parent = e.cpu_parent
            copies[parent.name if parent is not None else "(top)"] += 1
    return dict(E=E, batch=batch, ops=sum(ops.values()), host_syncs=syncs, most=ops.most_common(12),
                copies_from=copies.most_common(6))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--E", type=int, nargs="+", default=[1, 9, 64])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.json:
        check_output(args.json, JSON_KIND, "--json")
    torch.set_num_threads(1)
    rows = []
    for E in args.E:
        r = count(E)
        rows.append(r)
        print(f"E = {E:3d}: {r['ops']} operations per step, {r['host_syncs']} host synchronisations", flush=True)
        print("   most: " + ", ".join(f"{n[6:]} {k}" for n, k in r["most"]))
        print("   copies from: " + ", ".join(f"{n} {k}" for n, k in r["copies_from"]))
    if args.json:
        write_record(args.json, FORMAT, JSON_KIND, torch=torch.__version__, rows=rows)


if __name__ == "__main__":
    main()
