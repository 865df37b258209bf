"""Fast pure-PyTorch backend of ``local_linear_step`` (the default for CPU tensors).

The anchored Taylor scheme of ``common.py`` in batched-GEMM form:

1. anchor states: per lane (cell, direction of time) the step matrix P = p(step * A)
   (Paterson-Stockmeyer) and the states y_l = P^l x0 for every anchor level l the lane needs,
   one batched product per level; lanes are sorted by the number of levels they need, so one
   outlier does not make all lanes march;
2. every pair from its nearest anchor state (|r| <= h / 2): X = p(r A) y, p of degree
   ``FINISH``, by Horner on vectors, V = A X, with an analytic backward: for D <= ``LANES_MAX_D``
   as broadcast products with the cells in the last dimension (``_PairHornerLanes``), above it in
   batched GEMMs (``_PairHorner``).

Cost per pair O(m D^2), against O(D^3 log ||dt A||) plus a 2D x 2D exponential in the backward
for the dense reference.  Autograd differentiates step 1; the anchor layout is piecewise
constant and carries no gradient.
"""
from __future__ import annotations

import math

import torch

from ..utils import LANES_MAX_D, first_order_only
from .common import FINISH, NU_MAX, SECOND_ORDER, empty_result, operator_norm1, taylor_params


@torch.no_grad()
def _anchor_layout(A: torch.Tensor, dt: torch.Tensor, theta: float):
    """Where every pair sits.  A lane is a (cell, direction of time) couple; there are 2B.

    Returns, with lanes sorted by the number of anchor levels they need (descending): the cell
    and signed step of each lane, how many lanes are active at each level, and per pair its
    lane rank, its level and its anchor time.
    """
    B, T = dt.shape
    dev = dt.device
    nrm = operator_norm1(A)
    h = theta / nrm.clamp_min(torch.finfo(A.dtype).tiny)
    neg = dt < 0
    nu = dt.abs() * nrm[:, None]
    ok = nu <= NU_MAX  # false for NaN/Inf and out-of-range pairs, which become NaN outputs
    level = torch.where(ok, torch.floor(nu / theta + 0.5), 0.0)  # the nearest anchor: |remainder| <= h / 2
    t_anchor = torch.where(neg, -level, level) * h[:, None]
    level = level.long()

    lane = torch.arange(B, device=dev)[:, None] + B * neg.long()
    need = torch.zeros(2 * B, dtype=torch.long, device=dev)
    need.scatter_reduce_(0, lane.reshape(-1), (level + 1).reshape(-1), reduce="amax")
    order = torch.argsort(need, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(2 * B, device=dev)
    ascending = need[order].flip(0)
    n_levels = int(ascending[-1])
    active = 2 * B - torch.searchsorted(ascending, torch.arange(n_levels, device=dev), right=True)

    lane_cell = order % B
    lane_step = torch.where(order >= B, -h[lane_cell], h[lane_cell])
    return lane_cell, lane_step, active.tolist(), rank[lane], level, t_anchor, ok


def _anchor_states(P: torch.Tensor, y0: torch.Tensor, active: list[int], rank, level):
    """States y_l = P^l y0 for every active (lane, level), gathered per pair -> (B, T, D).

    P (n1, D, D) for the lanes that march, y0 (n0, D), lanes in sorted order.  The march is one
    step per level (each rounding error is relative to the state it is made on).
    """
    if len(active) == 1:
        return _gather_rows(y0, rank)
    with torch.no_grad():
        sizes = torch.tensor(active, device=level.device)
        first_row = torch.cumsum(sizes, 0) - sizes
        row = first_row[level] + rank
    return _March.apply(P, y0, active, row.reshape(-1)).view(*row.shape, y0.shape[1])


class _March(torch.autograd.Function):
    """The anchor march and the gather of its states, with an analytic backward: forward
    y_l = P[:n_l] y_{l-1}[:n_l] (n_l = active[l]) and out = table[row], table the states stacked
    level after level; backward runs the march in reverse, one transposed product and one outer
    product per level (autograd would add two slices, their zero-filled gradients and a GEMM
    backward per level).  States are (D, n) columns (cells last) for D <= ``LANES_MAX_D``."""

    @staticmethod
    def forward(ctx, P, y0, active, row):
        """The gathered states (len(row), D); P (n1, D, D), y0 (n0, D)."""
        lanes = P.shape[-1] <= LANES_MAX_D
        Pm = P.permute(1, 2, 0).contiguous() if lanes else P
        y = y0.t().contiguous() if lanes else y0
        states = [y]
        for n in active[1:]:
            y = (Pm[:, :, :n] * y[None, :, :n]).sum(1) if lanes else torch.bmm(P[:n], y[:n, :, None])[..., 0]
            states.append(y)
        table = torch.cat(states, 1).t().contiguous() if lanes else torch.cat(states)
        ctx.active, ctx.lanes, ctx.inputs = active, lanes, (P, y0)  # inputs: a second derivative's error
        ctx.save_for_backward(Pm, table, row)
        return table.index_select(0, row)

    @staticmethod
    def backward(ctx, g):
        """Gradients in P and y0 (first derivatives only)."""
        Pm, table, row = ctx.saved_tensors
        with torch.no_grad():
            gP, gy0 = _March._backward(ctx.active, ctx.lanes, Pm, table, row, g)
        return (*first_order_only(SECOND_ORDER, (gP, gy0), ctx.inputs), None, None)

    @staticmethod
    def _backward(active, lanes, Pm, table, row, g):
        acc = torch.zeros_like(table).index_add_(0, row, g)  # d out / d state, level after level
        gPm = torch.zeros_like(Pm)
        starts = [0]
        for n in active[:-1]:
            starts.append(starts[-1] + n)
        for lv in range(len(active) - 1, 0, -1):  # y_l = P[:n] y_{l-1}[:n], from the last level back
            n, a, b = active[lv], starts[lv], starts[lv - 1]
            gl, prev = acc[a:a + n], table[b:b + n]
            if lanes:  # Pm[i, k, c] = P[c, i, k]
                gPm[:, :, :n] += gl.t()[:, None, :] * prev.t()[None, :, :]
                acc[b:b + n] += (Pm[:, :, :n] * gl.t()[:, None, :]).sum(0).t()
            else:
                gPm[:n] += gl[:, :, None] * prev[:, None, :]
                acc[b:b + n] += torch.bmm(Pm[:n].transpose(1, 2), gl[:, :, None])[..., 0]
        return (gPm.permute(2, 0, 1).contiguous() if lanes else gPm), acc[:active[0]]


def _gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for a (rows, D) table; index_select's backward (index_add) is much faster on
    CPU than advanced indexing's (index_put with accumulation)."""
    return table.index_select(0, index.reshape(-1)).view(*index.shape, table.shape[-1])


def _taylor_matrix(Z: torch.Tensor, m: int) -> torch.Tensor:
    """sum_{k<=m} Z^k / k! for a batch (n, D, D), Paterson-Stockmeyer: about 2 sqrt(m) products
    instead of m (Higham, Functions of Matrices, 2008, sec. 4.4.3)."""
    s = max(1, math.isqrt(m))
    eye = torch.eye(Z.shape[-1], dtype=Z.dtype, device=Z.device).expand_as(Z)
    powers = [eye, Z]
    for _ in range(s - 1):
        powers.append(torch.bmm(powers[-1], Z))

    def block(lo):
        """sum_{k=lo}^{min(lo+s-1, m)} Z^(k-lo) / k!"""
        return sum(powers[k - lo] / math.factorial(k) for k in range(lo, min(lo + s, m + 1)))

    starts = list(range(0, m + 1, s))
    P = block(starts[-1])
    for lo in reversed(starts[:-1]):
        P = block(lo) + torch.bmm(powers[s], P)
    return P


def local_linear_step_torch(A: torch.Tensor, x0: torch.Tensor, dt: torch.Tensor):
    """X[b,k] = expm(dt[b,k] A[b]) x0[b], V = A X; A (B,D,D), x0 (B,D), dt (B,T) -> (B,T,D) twice.

    Inputs are assumed validated (``common.validate_inputs``); differentiable in A, x0 and dt.
    """
    B, T = dt.shape
    if B == 0 or T == 0:
        return empty_result(A, x0, dt)
    theta, m = taylor_params(A.dtype)
    lane_cell, lane_step, active, rank, level, t_anchor, ok = _anchor_layout(A, dt, theta)

    n0 = active[0]
    P = None
    if len(active) > 1:  # anchor step p(step * A) of the lanes that march
        n1 = active[1]
        P = _taylor_matrix(lane_step[:n1, None, None] * A.index_select(0, lane_cell[:n1]), m)
    y = _anchor_states(P, x0.index_select(0, lane_cell[:n0]), active, rank, level)
    horner = _PairHornerLanes if A.shape[-1] <= LANES_MAX_D else _PairHorner
    X, V = horner.apply(A, y, dt - t_anchor, FINISH[A.dtype])
    if not bool(ok.all()):
        X = torch.where(ok[:, :, None], X, float("nan"))
        V = torch.where(ok[:, :, None], V, float("nan"))
    return X, V


class _PairHorner(torch.autograd.Function):
    """X = p(r A) y by Horner on vectors, V = A X, for every pair; analytic backward.

    A (B,D,D), y (B,T,D) anchor states, r (B,T) remainders -> X, V (B,T,D).
    Horner: h_m = y, h_{j-1} = y + (r/j) A h_j, X = h_0.  Internally vectors are the columns
    of (B, D, T) blocks, the layout in which batched GEMM is fastest for small D.
    """

    @staticmethod
    def forward(ctx, A, y, r, m):
        """X = p_m(r A) y and V = A X per pair, by Horner; the Horner states kept for backward."""
        B, T, D = y.shape
        # hs[i] = h_{m-i} (hs[0] = y, hs[m] = X) and Ahs[i] = A h_{m-i}.
        # Two allocations rather than one: blocks under glibc's 32 MB mmap ceiling are reused
        # between calls instead of being faulted in afresh.
        hs = torch.empty(m + 1, B, D, T, dtype=y.dtype, device=y.device)
        Ahs = torch.empty_like(hs)
        hs[0].copy_(y.transpose(1, 2))
        rD = r.unsqueeze(1).expand(B, D, T).contiguous()  # same-shape operands take the fast path
        for i, j in enumerate(range(m, 0, -1)):
            torch.bmm(A, hs[i], out=Ahs[i])
            torch.addcmul(hs[0], Ahs[i], rD, value=1.0 / j, out=hs[i + 1])
        torch.bmm(A, hs[m], out=Ahs[m])
        ctx.m, ctx.y, ctx.r = m, y, r  # y and r only tie a second derivative to its error
        ctx.save_for_backward(A, rD, hs, Ahs)
        return hs[m].transpose(1, 2).contiguous(), Ahs[m].transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, gX, gV):
        """Gradients in A, y and r (first derivatives only)."""
        A, rD, hs, Ahs = ctx.saved_tensors
        with torch.no_grad():
            grads = _PairHorner._backward(ctx.m, A, rD, hs, Ahs, gX, gV)
        return (*first_order_only(SECOND_ORDER, grads, (A, ctx.y, ctx.r)), None)

    @staticmethod
    def _backward(m, A, rD, hs, Ahs, gX, gV):
        X = hs[-1]
        At = A.transpose(1, 2)
        gbar = torch.zeros_like(X) if gX is None else gX.transpose(1, 2).contiguous()
        dA = torch.zeros_like(A)
        if gV is not None:
            gV = gV.transpose(1, 2).contiguous()
            gbar = torch.baddbmm(gbar, At, gV)
            dA = torch.bmm(gV, X.transpose(1, 2))
        hbar, ybar, rsum = gbar, gbar.clone(), torch.zeros_like(gbar)
        for j in range(1, m + 1):  # undo h_{j-1} = y + (r/j) A h_j; 1/j folded into alpha
            rsum.addcmul_(hbar, Ahs[m - j], value=1.0 / j)
            left = hbar * rD
            dA.baddbmm_(left, hs[m - j].transpose(1, 2), alpha=1.0 / j)
            hbar = torch.baddbmm(hbar, At, left, beta=0.0, alpha=1.0 / j)
            ybar += hbar
        return dA, ybar.transpose(1, 2), rsum.sum(1)


class _PairHornerLanes(torch.autograd.Function):
    """``_PairHorner`` with the cells in the last dimension: A as (D, D, B), vectors as (D, T, B),
    and every matrix-vector product a broadcast multiply into a (D, D, T, B) scratch and a sum
    over one of its dimensions (for small D far cheaper than B tiny GEMMs).  Same recurrences,
    same analytic backward."""

    @staticmethod
    def forward(ctx, A, y, r, m):
        """X = p_m(r A) y and V = A X per pair, by Horner; the Horner states kept for backward."""
        B, T, D = y.shape
        Al = A.permute(1, 2, 0).contiguous()  # Al[i, k, b] = A[b, i, k]
        hs = torch.empty(m + 1, D, T, B, dtype=y.dtype, device=y.device)
        Ahs = torch.empty_like(hs)
        hs[0].copy_(y.permute(2, 1, 0))
        rl = r.t().unsqueeze(0).expand(D, T, B).contiguous()
        work = y.new_empty(D, D, T, B)
        for i, j in enumerate(range(m, 0, -1)):
            _mv(Al, hs[i], work, Ahs[i])
            torch.addcmul(hs[0], Ahs[i], rl, value=1.0 / j, out=hs[i + 1])
        _mv(Al, hs[m], work, Ahs[m])
        ctx.m, ctx.A, ctx.y, ctx.r = m, A, y, r  # A, y and r only tie a second derivative to its error
        ctx.save_for_backward(Al, rl, hs, Ahs)
        return hs[m].permute(2, 1, 0).contiguous(), Ahs[m].permute(2, 1, 0).contiguous()

    @staticmethod
    def backward(ctx, gX, gV):
        """Gradients in A, y and r (first derivatives only)."""
        Al, rl, hs, Ahs = ctx.saved_tensors
        with torch.no_grad():
            grads = _PairHornerLanes._backward(ctx.m, Al, rl, hs, Ahs, gX, gV)
        return (*first_order_only(SECOND_ORDER, grads, (ctx.A, ctx.y, ctx.r)), None)

    @staticmethod
    def _backward(m, Al, rl, hs, Ahs, gX, gV):
        D, T, B = hs.shape[1:]
        X = hs[-1]
        work = X.new_empty(D, D, T, B)
        gbar = torch.zeros_like(X) if gX is None else gX.permute(2, 1, 0).contiguous()
        dA = torch.zeros_like(Al)
        if gV is not None:
            gV = gV.permute(2, 1, 0).contiguous()
            gbar += _mtv(Al, gV, work)
            dA += _outer(gV, X, work)
        hbar, ybar, rsum = gbar, gbar.clone(), torch.zeros_like(gbar)
        for j in range(1, m + 1):  # undo h_{j-1} = y + (r/j) A h_j
            rsum.addcmul_(hbar, Ahs[m - j], value=1.0 / j)
            left = hbar * rl
            dA.add_(_outer(left, hs[m - j], work), alpha=1.0 / j)
            hbar = _mtv(Al, left, work).mul_(1.0 / j)
            ybar += hbar
        return dA.permute(2, 0, 1), ybar.permute(2, 1, 0), rsum.sum(0).t()


def _mv(Al, h, work, out):
    """out[i, t, b] = sum_k A[b, i, k] h[k, t, b], for Al (D, D, B) and h (D, T, B)."""
    torch.mul(Al[:, :, None, :], h[None], out=work)
    torch.sum(work, 1, out=out)


def _mtv(Al, g, work):
    """(A^T g)[k, t, b] = sum_i A[b, i, k] g[i, t, b]."""
    torch.mul(Al[:, :, None, :], g[:, None], out=work)
    return work.sum(0)


def _outer(left, h, work):
    """sum_t left[i, t, b] h[k, t, b] -> (D, D, B): the pairs' contribution to dA[b, i, k]."""
    torch.mul(left[:, None], h[None], out=work)
    return work.sum(2)
