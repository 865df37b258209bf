"""Triton row reduction for ``laplace_mmd``: an online reduction that never forms N x M.

One program owns a block of BM query rows of one job (their points stay in registers) and
streams the job's keys in tiles of BN, accumulating r_i and, when gradients are wanted, the
D-vector G_i (common.py) in registers.  Two kernel families (``ops.variant.KernelVariant``):

* ``REG`` (D <= REG_MAX_D = 8, ``_laplace_rows_reg_kernel``): every coordinate is its own
  tensor, unrolled at compile time: distances, the kernel value (one ``exp`` per query-key pair)
  and the gradient terms all live on the (BM, BN) tile, so nothing is re-laid out or recomputed;
* ``TILED`` (wider points, ``_laplace_rows_tiled_kernel``): the (BM, BN, DP) tile.

Work items (job, row block) come from a small table built on the host from host-known segment
lengths, once per plan and device (``common.Plan.derived``); a second grid axis splits each job's
keys into n_splits chunks so that small problems still fill the GPU (partials are summed after).
"""
from __future__ import annotations

import torch

from ..utils import HAS_TRITON, next_power_of_2, tl, triton, triton_interpreted
from ..variant import KernelVariant, launch_kwargs
from .common import CLAMP

MAX_D = 128
REG_MAX_D = 8


def config(kind: str, D: int, dtype: torch.dtype, T=None) -> dict:
    """Compile-time configuration of a row reduction without (kind "rows") or with ("grad") the
    gradient term G.  D <= REG_MAX_D: (BM, BN) tiles of 32 x 32 (32 x 16 in float64) over 4
    warps, so each thread holds 8 (4) values of each accumulator and of each coordinate's
    difference; wider: (BM, BN, DP) tiles of 4096 values (2048 in float64).  (T: unused.)"""
    if D <= REG_MAX_D:
        wide = 2 if dtype == torch.float64 else 1
        return dict(D=D, BM=32, BN=32 // wide, num_warps=4, COMPUTE_G=kind == "grad")
    DP = max(2, next_power_of_2(D))
    BM = 64 if DP <= 8 else 32 if DP <= 32 else 16
    budget = 2048 if dtype == torch.float64 else 4096
    BN = max(1, min(32, budget // (BM * DP)))
    return dict(DP=DP, BM=BM, BN=BN, num_warps=4, COMPUTE_G=kind == "grad")


if HAS_TRITON:

    @triton.jit
    def _work_item(items_ptr, n_out, n_splits, BM: tl.constexpr):
        """This program's query rows (and mask), its share [kb, ke) of the job's keys, and the rows'
        output positions, from the work item (q_start, q_end, k_start, k_end, out_start)."""
        item = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1).to(tl.int64)
        q_start = tl.load(items_ptr + item * 5)
        q_end = tl.load(items_ptr + item * 5 + 1)
        k0 = tl.load(items_ptr + item * 5 + 2)
        k1 = tl.load(items_ptr + item * 5 + 3)
        o_start = tl.load(items_ptr + item * 5 + 4)
        rows = q_start + tl.arange(0, BM)
        chunk = (k1 - k0 + n_splits - 1) // n_splits
        kb = k0 + split * chunk
        return rows, rows < q_end, kb, tl.minimum(kb + chunk, k1), split * n_out + o_start + (rows - q_start)

    @triton.jit
    def _laplace_rows_tiled_kernel(Q_ptr, K_ptr, WK_ptr, items_ptr, params_ptr, R_ptr, G_ptr, n_out, D, sq, sk,
                                   n_splits, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                                   COMPUTE_G: tl.constexpr):
        """As ``_laplace_rows_reg_kernel``, on (BM, BN, DP) tiles: D at run time, padded to DP."""
        # 1 / (sigma D) and the clamp 1e-8 D come in the data's dtype (a float argument would
        # arrive as float32 and cost float64 its accuracy).
        scale = tl.load(params_ptr)
        clamp_d = tl.load(params_ptr + 1)
        rows, rmask, kb, ke, orow = _work_item(items_ptr, n_out, n_splits, BM)
        d = tl.arange(0, DP)
        dmask = d < D
        q = tl.load(Q_ptr + rows[:, None] * sq + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        r = tl.zeros((BM,), dtype=q.dtype)
        G = tl.zeros((BM, DP), dtype=q.dtype)
        for kt in range(kb, ke, BN):
            cols = kt + tl.arange(0, BN)
            cmask = cols < ke
            kk = tl.load(K_ptr + cols[:, None] * sk + d[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
            wk = tl.load(WK_ptr + cols, mask=cmask, other=0.0)
            diff = q[:, None, :] - kk[None, :, :]
            dist = tl.sum(tl.abs(diff), axis=2)
            kv = tl.exp(-tl.maximum(dist, clamp_d) * scale) * wk[None, :]
            r += tl.sum(kv, axis=1)
            if COMPUTE_G:
                c = tl.where(dist > clamp_d, kv, 0.0)  # no gradient where the clamp is active
                sgn = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
                G += tl.sum(c[:, :, None] * sgn, axis=1)
        tl.store(R_ptr + orow, r, mask=rmask)
        if COMPUTE_G:
            tl.store(G_ptr + orow[:, None] * D + d[None, :], G, mask=rmask[:, None] & dmask[None, :])

    @triton.jit
    def _laplace_rows_reg_kernel(Q_ptr, K_ptr, WK_ptr, items_ptr, params_ptr, R_ptr, G_ptr, n_out, sq, sk,
                                 n_splits, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                                 COMPUTE_G: tl.constexpr):
        """r (n_splits, n_out) and G (n_splits, n_out, D) partial row reductions (common.py) for
        the work items (q_start, q_end, k_start, k_end, out_start) in items_ptr (int64, 5 each)."""
        scale = tl.load(params_ptr)  # 1 / (sigma D), and the clamp 1e-8 D, in the data's dtype
        clamp_d = tl.load(params_ptr + 1)
        rows, rmask, kb, ke, orow = _work_item(items_ptr, n_out, n_splits, BM)
        q = ()
        for d in tl.static_range(D):
            q = q + (tl.load(Q_ptr + rows * sq + d, mask=rmask, other=0.0),)
        # Accumulated on the (BM, BN) tile and reduced over keys once at the end: the loop has no
        # cross-lane traffic.
        r_t = tl.zeros((BM, BN), dtype=q[0].dtype)
        G_t = ()
        for d in tl.static_range(D):
            G_t = G_t + (tl.zeros((BM, BN), dtype=q[0].dtype),)
        for kt in range(kb, ke, BN):
            cols = kt + tl.arange(0, BN)
            cmask = cols < ke
            wk = tl.load(WK_ptr + cols, mask=cmask, other=0.0)
            diff = ()
            dist = tl.zeros((BM, BN), dtype=q[0].dtype)
            for d in tl.static_range(D):
                df = q[d][:, None] - tl.load(K_ptr + cols * sk + d, mask=cmask, other=0.0)[None, :]
                dist += tl.abs(df)
                diff = diff + (df,)
            kv = tl.exp(-tl.maximum(dist, clamp_d) * scale) * wk[None, :]  # the one exp per pair
            r_t += kv
            if COMPUTE_G:
                c = tl.where(dist > clamp_d, kv, 0.0)  # no gradient where the clamp is active
                Gn = ()
                for d in tl.static_range(D):
                    Gn = Gn + (G_t[d] + tl.where(diff[d] > 0, c, tl.where(diff[d] < 0, -c, 0.0)),)
                G_t = Gn
        r = tl.sum(r_t, axis=1)
        tl.store(R_ptr + orow, r, mask=rmask)
        if COMPUTE_G:
            for d in tl.static_range(D):
                tl.store(G_ptr + orow * D + d, tl.sum(G_t[d], axis=1), mask=rmask)


def _n_splits(n_items: int, max_keys: int, cfg, device) -> int:
    """Key splits per job: enough programs for about four per SM (1 off the GPU)."""
    if device.type != "cuda" or triton_interpreted():
        return 1
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-target // max(1, n_items)), max_keys // (cfg["BN"] * 16)))


def _launch_tables(jobs, out_starts, BM, sigma, D, dtype, device):
    """The work items (query start, query end, key start, key end, output row) of a launch and its
    parameters, on the device.  Kept with the plan (``reduce_rows_triton``), so that a repeated
    call (every training step) uploads nothing from the host and can be captured in a CUDA graph."""
    items = []
    for (q0, q1, k0, k1), o in zip(jobs, out_starts):
        for a in range(q0, q1, BM):
            items.append((a, q1, k0, k1, o + a - q0))
    table = torch.tensor(items, dtype=torch.int64).to(device)
    params = torch.tensor([1.0 / (sigma * D), CLAMP * D], dtype=dtype).to(device)
    return table, params


def _rows_launch(kernel, Q, K, WK, table, params, R, G, n_splits, compute_g):
    """(kernel, grid, keyword arguments) of a row reduction: the work items of ``table``, each
    job's keys in n_splits parts; r into R (n_splits, n_out), G (n_splits, n_out, D) if
    ``compute_g`` (else G is not written)."""
    cfg = config("grad" if compute_g else "rows", Q.shape[1], Q.dtype)
    kw = dict(Q_ptr=Q, K_ptr=K, WK_ptr=WK, items_ptr=table, params_ptr=params, R_ptr=R, G_ptr=G, n_out=R.shape[1],
              D=Q.shape[1], sq=Q.stride(0), sk=K.stride(0), n_splits=n_splits)
    return kernel, (table.shape[0], n_splits), {**kw, **launch_kwargs(kernel, cfg)}


def reg_launch(Q, K, WK, table, params, R, G, n_splits, compute_g):
    """``_rows_launch`` of the register kernel (D <= REG_MAX_D)."""
    return _rows_launch(_laplace_rows_reg_kernel, Q, K, WK, table, params, R, G, n_splits, compute_g)


def tiled_launch(Q, K, WK, table, params, R, G, n_splits, compute_g):
    """``_rows_launch`` of the tiled kernel (REG_MAX_D < D <= MAX_D)."""
    return _rows_launch(_laplace_rows_tiled_kernel, Q, K, WK, table, params, R, G, n_splits, compute_g)


if HAS_TRITON:
    _BOTH = (torch.float32, torch.float64)
    REG = KernelVariant(
        name="laplace_reg", dims={dt: range(1, REG_MAX_D + 1) for dt in _BOTH},
        kernels={"rows": _laplace_rows_reg_kernel, "grad": _laplace_rows_reg_kernel}, config=config,
        representative=(("grad", 5, torch.float32),), forward_launch=reg_launch, pointer_types={"items_ptr": "*i64"})
    TILED = KernelVariant(
        name="laplace_tiled", dims={dt: range(REG_MAX_D + 1, MAX_D + 1) for dt in _BOTH},
        kernels={"rows": _laplace_rows_tiled_kernel, "grad": _laplace_rows_tiled_kernel}, config=config,
        representative=(("grad", 16, torch.float32),), forward_launch=tiled_launch,
        pointer_types={"items_ptr": "*i64"})
    VARIANTS = (REG, TILED)


def row_partials_triton(Q, K, WK, plan, i):
    """R (splits, n_rows) and G (splits, n_rows, D) or None: launch i of ``plan`` in one kernel
    launch, the partial rows of its key splits not yet added (WK None: unit key weights)."""
    lc = plan.launches[i]
    D = Q.shape[1]
    variant = REG if D <= REG_MAX_D else TILED
    cfg = variant.config("grad" if lc.compute_g else "rows", D, Q.dtype)
    table, params = plan.derived(("triton", i, Q.device), lambda: _launch_tables(
        lc.jobs, lc.out_starts, cfg["BM"], plan.sigma, D, Q.dtype, Q.device))
    max_keys = max(k1 - k0 for _, _, k0, k1 in lc.jobs)
    splits = _n_splits(table.shape[0], max_keys, cfg, Q.device)
    if WK is None:  # unit key weights: a ones vector kept with the plan
        WK = plan.derived(("ones", K.shape[0], K.dtype, K.device), lambda: K.new_ones(K.shape[0]))
    Q, K, WK = Q.contiguous(), K.contiguous(), WK.contiguous()
    R = torch.empty((splits, lc.n_rows), dtype=Q.dtype, device=Q.device)
    G = torch.empty((splits, lc.n_rows, D), dtype=Q.dtype, device=Q.device) if lc.compute_g else R
    kernel, grid, kw = variant.forward_launch(Q, K, WK, table, params, R, G, splits, lc.compute_g)
    kernel[grid](**kw)
    return R, (G if lc.compute_g else None)


def reduce_rows_triton(Q, K, WK, plan, i):
    """r (n_rows,) and G (n_rows, D) or None for launch i of ``plan``, as ``reduce_rows_torch``
    (WK None: unit key weights): ``row_partials_triton`` with its key splits added."""
    R, G = row_partials_triton(Q, K, WK, plan, i)
    r = R[0] if R.shape[0] == 1 else R.sum(0)
    return r, None if G is None else (G[0] if G.shape[0] == 1 else G.sum(0))
