"""The GPU-free cost model: its SASS parsing on a fixed listing, and the register kernels' targets
read from their sm_90 code (compiled ahead of time in a subprocess, no GPU needed).  The kernels
compiled here for sm_90 (register D = 5, lane-group D = 6) are among test_compile_sm's representative ones,
in the same configurations: within one run (and across runs) they come from Triton's cache."""
import json
import os
import subprocess
import sys

import pytest

from cellmnn_kernels.ops.utils import HAS_TRITON
from cellmnn_kernels.sass_cost import count, find_loops, parse_sass, top_level

SNIPPET = """
        code for sm_90a
                Function : k
        /*0000*/                   LDC R1, c[0x0][0x28] ;                    /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R0, SR_TID.X ;                        /* 0x0000000000007919 */
        /*0020*/                   LDG.E R2, desc[UR6][R4.64] ;              /* 0x0000000604027981 */
        /*0030*/                   FFMA R3, R2, R2, R3 ;                     /* 0x0000000202037223 */
        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;             /* 0x0000000000007b1d */
        /*0050*/                   STS [R0], R3 ;                            /* 0x0000000300007388 */
        /*0060*/                   LDS R5, [R0+0x4] ;                        /* 0x0000040000057984 */
        /*0070*/                   FMUL R6, R5, R3 ;                         /* 0x0000000305067220 */
        /*0080*/                   MUFU.EX2 R7, R6 ;                         /* 0x0000000600077308 */
        /*0090*/              @!P0 BRA 0x70 ;                                /* 0xfffffffc00008947 */
        /*00a0*/                   SHFL.BFLY PT, R8, R7, 0x1, 0x1f ;         /* 0x0c201f0007087f89 */
        /*00b0*/               @P1 BRA 0x30 ;                                /* 0xfffffffc00001947 */
        /*00c0*/                   STG.E desc[UR6][R4.64], R8 ;              /* 0x0000000804007986 */
        /*00d0*/                   EXIT ;                                    /* 0x000000000000794d */
        /*00e0*/                   BRA 0xe0;                                 /* 0xfffffffc00fc7947 */
        /*00f0*/                   NOP;                                      /* 0x0000000000007918 */
"""


def test_sass_parsing_counts_and_loops_on_a_fixed_listing():
    ins = parse_sass(SNIPPET)
    assert [i.addr for i in ins] == list(range(0, 0xF0, 0x10))  # NOP dropped
    assert ins[9].op == "BRA" and ins[9].pred == "@!P0" and ins[8].op == "MUFU.EX2"
    c = count(ins)
    assert (c["instructions"], c["fp32"], c["bar_sync"], c["lds"], c["sts"], c["shfl"], c["mufu"],
            c["ldg"], c["stg"]) == (15, 2, 1, 1, 1, 1, 1, 1, 1)
    loops = find_loops(ins)  # 0x30..0xb0 holds 0x70..0x90; the final self-branch is no loop
    assert [(l.start, l.end, l.depth) for l in loops] == [(0x30, 0xB0, 0), (0x70, 0x90, 1)]
    outer, inner = loops
    assert inner.own["instructions"] == 3 and inner.own["fp32"] == 1 and inner.own["mufu"] == 1
    assert outer.total["instructions"] == 9 and outer.own["instructions"] == 6
    assert outer.own["bar_sync"] == 1 and outer.own["shfl"] == 1 and outer.own["lds"] == 1
    assert top_level(ins, loops)["instructions"] == 6


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_register_kernels_meet_the_cost_model_targets(tmp_path, capsys):
    # D = 5 float32, the configuration of the targets; a fresh interpreter without
    # TRITON_INTERPRET, so that kernels are real JIT functions.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "cost.json"
    res = subprocess.run([sys.executable, "-m", "cellmnn_kernels.sass_cost", "--d", "5", "--dtype", "fp32",
                          "--no-tiled", "--no-mmd", "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=1500)
    with capsys.disabled():
        print("\n" + res.stdout.strip())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    kernels = {k["kind"]: k for k in json.loads(out.read_text())["kernels"] if k["variant"] == "llstep_reg"}
    fwd, bwd = kernels["fwd"], kernels["bwd"]
    for k in (fwd, bwd):
        assert k["counts"]["bar_sync"] == 0 and k["counts"]["lds"] == 0 and k["counts"]["sts"] == 0
        assert k["estimate"]["bar_sync_in_anchor_loops"] == 0
    f = fwd["estimate"]["thread_instructions_per_pair"]
    b = bwd["estimate"]["thread_instructions_per_pair"]
    assert f <= 600, f"forward: {f:.0f} thread-instructions per pair (target 600)"
    assert b <= 3 * f, f"backward: {b:.0f} thread-instructions per pair, {b / f:.1f}x the forward (target 3x)"


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_lane_group_kernels_have_no_barrier_or_shared_memory(tmp_path):
    # float32 5 < D <= 16: the lane-group forward and backward; D = 6 here, the representative of
    # the compile test, in the same layout as every D <= 8 (D = 16 compiles for minutes; its counts
    # are in bench/results/sass_cost_*.json).  Their only cross-lane traffic is shuffles.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "cost.json"
    res = subprocess.run([sys.executable, "-m", "cellmnn_kernels.sass_cost", "--d", "6", "--dtype", "fp32",
                          "--no-tiled", "--no-mmd", "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    kernels = {k["kind"]: k for k in json.loads(out.read_text())["kernels"] if k["variant"] == "llstep_group"}
    assert sorted(kernels) == ["bwd", "fwd"]
    for kind, k in kernels.items():
        assert k["ok"], k
        assert k["counts"]["bar_sync"] == 0 and k["counts"]["lds"] == 0 and k["counts"]["sts"] == 0, k["name"]
        assert k["counts"]["shfl"] > 0, k["name"]  # the gathers are there, as shuffles
    assert kernels["fwd"]["spill_stores"] == 0


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_fused_mlp_kernels_fit_and_the_forward_meets_the_flop_target(tmp_path, capsys):
    # The operator network's kernels for the default network (width 96, D = 5): no spills, and the
    # forward's estimated time per cell within 2x of the FLOP limit of its float32 arithmetic on an
    # H100 (``mlp_estimate``).  The loop model is checked by the tensor-core work it implies: the
    # forward's executed multiply-adds are exactly three products of the padded layers.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "cost.json"
    res = subprocess.run([sys.executable, "-m", "cellmnn_kernels.sass_cost", "--family", "fused_mlp",
                          "--dtype", "fp32", "--json", str(out)], capture_output=True, text=True, env=env, timeout=900)
    with capsys.disabled():
        print("\n" + res.stdout.strip())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    kernels = json.loads(out.read_text())["kernels"]
    assert len(kernels) == 4 and all(k["ok"] and k["spill_stores"] == 0 for k in kernels), kernels
    est = {k["kind"]: k["estimate"] for k in kernels if "estimate" in k}
    assert sorted(est) == ["bwd", "fwd"]
    assert est["fwd"]["tensor_macs_per_cell"] == 3 * (16 * 96 + 3 * 96 * 96 + 96 * 32)
    # backward: the recomputed activations (4 first layers, 6 hidden ones), both products of every
    # layer, three tf32 products each; measured within 3% (the input gradient's narrow product runs
    # in both warp groups)
    padded = 3 * (4 * 16 * 96 + 6 * 96 * 96 + 2 * 96 * 32 + 3 * 2 * 96 * 96 + 2 * 16 * 96)
    assert abs(est["bwd"]["tensor_macs_per_cell"] / padded - 1) < 0.03
    assert est["fwd"]["over_fp32_limit"] <= 2.0, est["fwd"]
