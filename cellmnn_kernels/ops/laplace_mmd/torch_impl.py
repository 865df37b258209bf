"""Batched and chunked pure-PyTorch row reduction for ``laplace_mmd`` (the CPU default).

Jobs of one launch that share a shape (q rows, k rows) are computed together: their query and
key rows are gathered into (D, J, nq) / (D, J, nk) blocks and reduced by batched tensor ops on
(J, nq, nk) blocks, so a grouped call of many small terms costs a few tensor operations per shape
and coordinate instead of per job.  A batch holds no more than ``CHUNK_ELEMS`` kernel values (two
blocks of that size are alive at once: the distances, turned into kernel values in place, and one
scratch block): a group is cut into sub-batches of at most CHUNK_ELEMS // (nq nk) jobs, and a job
larger than CHUNK_ELEMS on its own into pieces of CHUNK_ELEMS // nk rows (each its own batch):
memory O((N + M) D + chunk), never the N x M matrix.  The gather indices are built on the host
once per plan, launch and device and kept with the plan (``launch_batches``), so a repeated call
uploads nothing.
"""
from __future__ import annotations

import math

import torch

from .common import CLAMP

CHUNK_ELEMS = 1 << 22  # kernel values per chunk (16 MB in float32)
# Below this many kernel values a single call is cheaper in the dense form (measured on CPU:
# dense wins below about 500 x 500 points, is even up to 2000 and loses above).
DENSE_MAX_ELEMS = 1 << 18
LOG2E = math.log2(math.e)


def _rows(starts, n):
    """The point ranges [s, s + n) for s in ``starts``: an int start if they are consecutive (a
    view of the tensor does), else a flat int64 index (host)."""
    if all(b - a == n for a, b in zip(starts, starts[1:])):
        return starts[0]
    return (torch.tensor(starts, dtype=torch.int64)[:, None] + torch.arange(n)).reshape(-1)


def _batches(jobs, out_starts, chunk: int, device: torch.device) -> tuple:
    """How a launch is computed: ``(J, nq, nk, q, k, o, same)`` per batch of J jobs of one shape
    (q, k, o: the rows to gather and to write, each an int start where they are consecutive, else
    a flat device index; same: every job of the batch has its keys equal to its queries).  A batch
    holds at most ``chunk`` kernel values; a job bigger than that is first cut into pieces of
    chunk // nk rows, each its own batch."""
    groups: dict = {}
    for (q0, q1, k0, k1), o in zip(jobs, out_starts):
        nk = k1 - k0
        if q1 == q0:
            continue
        step = q1 - q0 if (q1 - q0) * nk <= chunk else max(1, chunk // max(1, nk))
        for a in range(q0, q1, step):
            b = min(q1, a + step)
            groups.setdefault((b - a, nk), []).append((a, b, k0, k1, o + a - q0))
    out = []
    for (nq, nk), members in groups.items():
        per = max(1, chunk // max(1, nq * nk))
        per = -(-len(members) // -(-len(members) // per))  # as many sub-batches, of even sizes
        for i in range(0, len(members), per):
            sub = members[i:i + per]
            sel = []
            for col, n in ((0, nq), (2, nk), (4, nq)):
                v = _rows([m[col] for m in sub], n)
                sel.append(v if isinstance(v, int) else v.to(device))
            same = all(m[0] == m[2] and m[1] == m[3] for m in sub)
            out.append((len(sub), nq, nk, *sel, same))
    return tuple(out)


def launch_batches(plan, i: int, device: torch.device) -> tuple:
    """``_batches`` of launch i of ``plan`` for the current ``CHUNK_ELEMS``, kept with the plan
    (built as normal tensors even under inference_mode, ``Plan.derived``)."""
    lc = plan.launches[i]
    return plan.derived(("torch", i, CHUNK_ELEMS, device),
                        lambda: _batches(lc.jobs, lc.out_starts, CHUNK_ELEMS, device))


def _gather_t(T, sel, J, n):
    """(D, J, n) coordinate-major block of the rows ``sel`` of T (N, D)."""
    if isinstance(sel, int):
        return T[sel:sel + J * n].t().contiguous().view(T.shape[1], J, n)
    return T.t().index_select(1, sel).view(T.shape[1], J, n)


def _gather_w(W, sel, J, n):
    """(J, 1, n) block of the weights ``sel`` of W (N,)."""
    if isinstance(sel, int):
        return W[sel:sel + J * n].view(J, 1, n)
    return W.index_select(0, sel).view(J, 1, n)


def _scatter(out, sel, block):
    """out[sel] = block, for ``sel`` an int start or a flat index."""
    if isinstance(sel, int):
        out[sel:sel + block.shape[0]] = block
    else:
        out.index_copy_(0, sel, block)


@torch.no_grad()
def reduce_rows_torch(Q, K, WK, plan, i):
    """r (n_rows,) and, if the launch computes gradients, G (n_rows, D) for every job
    (q0, q1, k0, k1) of launch i of ``plan``; see common.py.  WK None: unit key weights."""
    lc = plan.launches[i]
    D, compute_g = Q.shape[1], lc.compute_g
    r = Q.new_empty(lc.n_rows)
    G = Q.new_empty(lc.n_rows, D) if compute_g else None
    # k = exp(-max(dist, 1e-8 D) / (sigma D)) = 2^(-max(dist, 1e-8 D) log2(e) / (sigma D)): exp2 is
    # about 3x cheaper than exp on the CPU (measured, torch 2.13, AVX-512) and within 1e-6 of it.
    scale, clamp_d = LOG2E / (plan.sigma * D), CLAMP * D
    k_zero = 2.0 ** (-clamp_d * scale)  # the kernel at distance 0
    host = Q.device.type == "cpu"  # reading a value back costs nothing there
    for J, nq, nk, qs, ks, os_, same in launch_batches(plan, i, Q.device):
        # Coordinates first: Qt[d] (J, nq) and Kt[d] (J, nk) are contiguous, and the L1 distance is
        # a sum over d of |Qt[d] - Kt[d]| on the (J, nq, nk) block (cheaper than cdist at small D).
        Qt = _gather_t(Q, qs, J, nq)
        diag = same and K is Q  # every job's keys are its queries: the diagonal's distance is 0
        Kt = Qt if diag else _gather_t(K, ks, J, nk)
        dist = Q.new_empty(J, nq, nk)
        buf = torch.empty_like(dist)
        torch.sub(Qt[0, :, :, None], Kt[0, :, None, :], out=dist).abs_()
        for d in range(1, D):
            dist.add_(torch.sub(Qt[d, :, :, None], Kt[d, :, None, :], out=buf).abs_())
        if diag:  # taken out of the block (kernel value 0 there) and added to r below
            dist.diagonal(0, 1, 2).fill_(math.inf)
        # The clamp binds only where two points are closer than 1e-8 D: on the CPU that is checked
        # once per block, and the clamp and its mask are formed only where it does.
        clamped = not host or (dist.numel() > 0 and bool(dist.amin() <= clamp_d))
        if clamped and compute_g:
            keep = torch.gt(dist, clamp_d, out=buf)  # 1.0 / 0.0: no gradient where the clamp is active
        kv = (dist.clamp_min_(clamp_d) if clamped else dist).mul_(-scale).exp2_()
        wk = None if WK is None else _gather_w(WK, ks, J, nk)
        if wk is not None:
            kv.mul_(wk)
        rows = kv.sum(2)
        if diag and wk is None:  # each row's own key: k_zero times its weight
            rows.add_(k_zero)
        elif diag:
            rows.add_(wk.view(J, nk), alpha=k_zero)
        _scatter(r, os_, rows.view(-1))
        if compute_g:
            if clamped:
                kv.mul_(keep)
            Gt = Q.new_empty(D, J, nq)
            for d in range(D):
                torch.sub(Qt[d, :, :, None], Kt[d, :, None, :], out=buf).sign_().mul_(kv)
                torch.sum(buf, 2, out=Gt[d])
            _scatter(G, os_, Gt.view(D, J * nq).t())
        del dist, buf, kv
    return r, G
