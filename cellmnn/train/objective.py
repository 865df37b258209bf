"""The Cell-MNN objective: the one builder of the loss terms, for training steps and validation.

For one time course ("member") with kept timepoints k_0 < k_1 < ..., every source cell (of a
kept timepoint but the last) is decoded to every kept time; the loss is

    sum over sources s and later kept timepoints f of gamma^(r-1) MMD^2(cells of s decoded to t_f,
    cells observed at t_f)  +  velocity_weight * kinetic  +  the mean eigen penalty,

r the rank of f after s, MMD with the Laplace kernel of bandwidth sigma.  Kinetic forms, on the
velocity V in units of ``time_unit`` (so the term does not depend on the unit of time):
"kept_times" (the authors' objective), the mean of V^2 over cells x every kept time (earlier
ones decoded backwards, the cell's own included) x coordinates; "future", the mean over cells x
later kept times of ||V||^2 (summed over coordinates: D times heavier); "grid", the mean of V^2
over a grid of step ``GRID_STEP`` time units from the first to the last timepoint.

``Objective`` evaluates E members at once: a training step (every member of an ensemble, on its
sampled batch) and a validation score (one member, on its validation cells) are the same call.
The whole loss, every member's, is one ``laplace_mmd_loss`` call (MMD terms, kinetic term and
penalty, with its own backward; its plan is built once here); members with different sigmas have
their points scaled by 1/sigma (MMD with sigma on points p equals MMD with sigma 1 on p / sigma).
Data-parallel steps, whose processes each sum over their own cells, take the composition
instead: all MMD terms in one ``laplace_mmd_grouped`` call (the same scaling), then the
per-member sums.

A training step draws its observed cells afresh, so their own term mean k(Y, Y) of each MMD^2 does
not depend on the weights.  The step passes its expectation over the draw (``expected_self_term``,
computed once per pool) instead of computing it: the gradients are the same, the step's loss is
an unbiased estimate of the batch loss, and the largest block of kernel values (B^2 per target
and member) is never formed.  Validation scores compute every term.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cellmnn_kernels import laplace_mmd_grouped
from cellmnn_kernels.ops.laplace_mmd.naive import CLAMP, laplace_kernel_dense
from cellmnn_kernels.ops.laplace_mmd_loss import LossPlan, laplace_mmd_loss

KINETIC = ("kept_times", "future", "grid")
GRID_STEP = 0.1  # the "grid" kinetic form: decode points every 0.1 time units (the authors' older grid)
SELF_TERM_CELLS = 2048  # pools up to this size: ``expected_self_term`` over all pairs; larger: over
SELF_TERM_PAIRS = 1 << 18  # this many random pairs


def kinetic_grid(times, kinetic: str, unit: float) -> np.ndarray:
    """The extra decode times of the "grid" kinetic form (empty for the others): every
    ``GRID_STEP`` time units (of ``unit``) from the first to the last of ``times``."""
    if kinetic != "grid":
        return np.zeros(0)
    lo, hi = min(times), max(times)
    n = int(math.floor((hi - lo) / (GRID_STEP * unit) + 1e-9)) + 1
    return lo + GRID_STEP * unit * np.arange(n, dtype=np.float64)


def expected_self_term(cells: torch.Tensor, draws: int, sigma: float) -> float:
    """E[mean k(Y, Y)] for Y = ``draws`` cells drawn independently and uniformly from ``cells``
    (N, D), Laplace kernel of bandwidth ``sigma`` (as ``laplace_mmd``): the diagonal gives
    k(0) / draws, every other pair the mean of k over all N^2 ordered pairs of cells.  That mean
    is exact up to ``SELF_TERM_CELLS`` cells; above, the mean over distinct pairs is estimated on
    ``SELF_TERM_PAIRS`` pairs drawn at random (seeded; unbiased, standard error below 2e-3 for
    kernel values in (0, 1]).  Kernel values in the cells' dtype, summed in float64."""
    N, D = cells.shape
    k0 = math.exp(-CLAMP / sigma)  # the kernel at distance 0 (the op clamps distances at CLAMP)
    if N <= SELF_TERM_CELLS:
        total = sum(float(laplace_kernel_dense(cells[i:i + 256], cells, sigma).sum(dtype=torch.float64))
                    for i in range(0, N, 256))
        pair_mean = total / N ** 2
    else:
        g = torch.Generator().manual_seed(0)
        a = torch.randint(N, (SELF_TERM_PAIRS,), generator=g)
        b = (a + torch.randint(1, N, (SELF_TERM_PAIRS,), generator=g)) % N  # another cell, uniformly
        a, b, total = a.to(cells.device), b.to(cells.device), 0.0
        for k in range(0, SELF_TERM_PAIRS, 1 << 16):
            dist = (cells[a[k:k + (1 << 16)]] - cells[b[k:k + (1 << 16)]]).abs().sum(1) / D
            total += float(torch.exp(-dist.clamp_min(CLAMP) / sigma).sum(dtype=torch.float64))
        pair_mean = k0 / N + (1 - 1 / N) * total / SELF_TERM_PAIRS
    return k0 / draws + (1 - 1 / draws) * pair_mean


@dataclass(frozen=True)
class Course:
    """One member's part of the objective: ``kept`` timepoints (indices into the objective's
    ``times``, ascending), ``n_src`` cells decoded from each source (``kept[:-1]``), ``n_obs``
    observed cells at each target (``kept[1:]``), and its weights."""
    kept: tuple
    n_src: tuple
    n_obs: tuple
    gamma: float
    sigma: float
    velocity_weight: float


class Objective:
    """Loss and MMD part, per member, of decoded and observed cells laid out member after member.

    Layout: the decoded X, V are (N, T, D), N = the members' source cells (member after member,
    source after source), T = ``kmax`` kept-time columns (a member's j-th is its kept[j]; columns
    past its own kept times are padding, decoded but unused) + the kinetic grid.  The observed
    cells ``ys`` are (M, D), member after member, target after target.  ``offsets(e)`` gives
    member e's decode offsets and ``source_times(e)`` the time of each of its source cells.
    """

    def __init__(self, courses: list, times, D: int, kinetic: str, unit: float, backend: str, device,
                 dtype=torch.float32, grid=None):
        self.courses, self.times, self.D = list(courses), [float(t) for t in times], D
        self.kinetic, self.unit, self.backend = kinetic, float(unit), backend
        self.grid = kinetic_grid(self.times, kinetic, unit) if grid is None else np.asarray(grid)
        self.E = E = len(self.courses)
        self.kmax = max(len(c.kept) for c in self.courses)
        self.T = T = self.kmax + len(self.grid)
        self.n_rows = [sum(c.n_src) for c in self.courses]
        L = lambda v, dt=torch.int64: torch.as_tensor(np.asarray(v), dtype=dt, device=device)  # noqa: E731
        rows, x_off, terms_y, term_w, term_member, y_off = [], [0], [], [], [], [0]
        self.term_src = []  # per term: its source's first cell among the member's cells, and its count
        row0, y_seg = 0, 0
        for e, c in enumerate(self.courses):
            j = row0
            for col, n in enumerate(c.n_src):
                for r in range(1, len(c.kept) - col):
                    rows.append((j + np.arange(n)) * T + col + r)
                    x_off.append(x_off[-1] + n)
                    terms_y.append(y_seg + col + r - 1)
                    term_w.append(c.gamma ** (r - 1))
                    term_member.append(e)
                    self.term_src.append((j - row0, n))
                j += n
            for m in c.n_obs:
                y_off.append(y_off[-1] + m)
            y_seg += len(c.n_obs)
            row0 = j
        self.term_rows = L(np.concatenate(rows))
        self.x_off, self.y_off = x_off, y_off
        self.terms_x, self.terms_y = list(range(len(terms_y))), terms_y
        self.term_w, self.term_member = L(term_w, dtype), L(term_member)
        sigmas = [c.sigma for c in self.courses]
        self.sigma = sigmas[0] if len(set(sigmas)) == 1 else 1.0
        self.x_scale = self.y_scale = None
        if len(set(sigmas)) > 1:
            self.x_scale = L(self._point_scale(x_off, term_member, sigmas), dtype)[:, None]
            self.y_scale = L(np.repeat(1.0 / np.asarray(sigmas), [sum(c.n_obs) for c in self.courses]), dtype)[:, None]
        self.vw = L([c.velocity_weight for c in self.courses], dtype)
        self.row_member = L(np.repeat(np.arange(E), self.n_rows))
        self.inv_rows = L(1.0 / np.asarray(self.n_rows, dtype=np.float64), dtype)
        self._kinetic_weights(L, dtype)
        self.plan = self._loss_plan(np.concatenate(rows), term_w)

    def _loss_plan(self, rows, term_w) -> LossPlan:
        """The whole loss as one ``laplace_mmd_loss`` plan: per decoded point (cell x column) the
        kinetic weight of its velocity (velocity_weight * unit^2 * the form's weight), per source
        cell the penalty's 1 / (member's cells)."""
        T, vw = self.T, np.array([c.velocity_weight for c in self.courses]) * self.unit ** 2
        member = np.repeat(np.arange(self.E), self.n_rows)
        kin = self.kin_w.cpu().double().numpy() if self.kinetic != "future" else None
        energy = np.zeros((len(member), T))
        if self.kinetic == "kept_times":
            energy[:, :self.kmax] = kin
        elif self.kinetic == "grid":
            energy[:, self.kmax:] = kin[:, None]
        else:
            counts = np.bincount(self.term_member.cpu().numpy(), weights=np.diff(self.x_off), minlength=self.E)
            energy.reshape(-1)[rows] = np.repeat(1.0 / counts[self.term_member.cpu().numpy()], np.diff(self.x_off))
        energy *= vw[member][:, None]
        return LossPlan(rows, self.x_off, self.y_off, self.terms_x, self.terms_y, list(term_w),
                        self.term_member.cpu().tolist(), self.E, len(member) * T, np.repeat(member, T),
                        [c.sigma for c in self.courses], energy.reshape(-1), member,
                        1.0 / np.asarray(self.n_rows, dtype=np.float64)[member])

    @staticmethod
    def _point_scale(x_off, term_member, sigmas) -> np.ndarray:
        """1/sigma of the member of every packed prediction point."""
        return np.repeat(1.0 / np.asarray(sigmas)[term_member], np.diff(x_off))

    def _kinetic_weights(self, L, dtype):
        """Per-row weights of the kinetic mean, so that every form is one weighted sum per member."""
        D, n = self.D, np.asarray(self.n_rows, dtype=np.float64)
        if self.kinetic == "kept_times":  # mean of V^2 over cells x every kept time x coordinates
            w = np.zeros((sum(self.n_rows), self.kmax))
            r = 0
            for e, c in enumerate(self.courses):
                w[r:r + self.n_rows[e], :len(c.kept)] = 1.0 / (n[e] * len(c.kept) * D)
                r += self.n_rows[e]
            self.kin_w = L(w, dtype)
        elif self.kinetic == "grid":
            self.kin_w = L(np.repeat(1.0 / (n * max(len(self.grid), 1) * D), self.n_rows), dtype)
        else:  # "future": mean over cells x later kept times of ||V||^2
            counts = np.bincount(self.term_member.cpu().numpy(), weights=np.diff(self.x_off), minlength=self.E)
            self.point_member = L(np.repeat(self.term_member.cpu().numpy(), np.diff(self.x_off)))
            self.inv_points = L(1.0 / counts, dtype)

    def query_rows(self, lo: int, hi: int) -> list:
        """Per MMD term, the (start, end) rows of its x segment that come from each member's source
        cells lo..hi-1 (in the member's order): one process's share under data parallelism
        (``laplace_mmd_grouped``'s ``x_rows``)."""
        return [(a + min(max(lo - o, 0), n), a + min(max(hi - o, 0), n))
                for a, (o, n) in zip(self.x_off, self.term_src)]

    def offsets(self, e: int) -> np.ndarray:
        """Member e's decode offsets (n_rows[e], T), float64: every kept time and grid time minus the
        source cell's time; its padding columns 0 (decoded but unused)."""
        c = self.courses[e]
        cols = np.concatenate([[self.times[i] for i in c.kept], np.zeros(self.kmax - len(c.kept)), self.grid])
        d = cols[None, :] - self.source_times(e)[:, None]
        d[:, len(c.kept):self.kmax] = 0.0
        return d

    def source_times(self, e: int) -> np.ndarray:
        """The time of each of member e's source cells (float64, (n_rows[e],))."""
        c = self.courses[e]
        return np.repeat([self.times[i] for i in c.kept[:-1]], c.n_src)

    def __call__(self, X: torch.Tensor, V: torch.Tensor, ys: torch.Tensor, penalty=None, check: bool = False,
                 y_self=None, x_rows=None, group=None):
        """Loss and MMD part (E,) of decoded X, V (N, T, D), observed ``ys`` (M, D) and the per-cell
        eigen penalty (N,) or None.  ``check``: validate the MMD inputs (a host synchronisation).
        ``y_self``: per target segment (member after member) the mean k(Y, Y) to use instead of
        computing it from ``ys`` (``expected_self_term``).  ``x_rows``, ``group``: this process's
        query rows of every term (``query_rows``) and the processes that share the MMD sums."""
        E, D = self.E, self.D
        if x_rows is None:  # the whole loss in one op
            return laplace_mmd_loss(self.plan, X.reshape(-1, D), ys, y_self, V.reshape(-1, D), penalty,
                                    backend=self.backend, check_finite=check)
        xs = X.reshape(-1, D).index_select(0, self.term_rows)
        if self.x_scale is not None:
            xs, ys = xs * self.x_scale, ys * self.y_scale
        _, per_term = laplace_mmd_grouped(xs, self.x_off, ys, self.y_off, self.terms_x, self.terms_y, None,
                                          self.sigma, backend=self.backend, check_finite=check, y_self=y_self,
                                          x_rows=x_rows, group=group)
        mmd = X.new_zeros(E).index_add(0, self.term_member, per_term * self.term_w)
        if self.kinetic == "future":
            vs = V.reshape(-1, D).index_select(0, self.term_rows)
            kin = X.new_zeros(E).index_add(0, self.point_member, (vs * self.unit).pow(2).sum(-1)) * self.inv_points
        elif self.kinetic == "kept_times":
            v2 = (V[:, :self.kmax] * self.unit).pow(2).sum(-1)
            kin = X.new_zeros(E).index_add(0, self.row_member, (v2 * self.kin_w).sum(1))
        else:
            v2 = (V[:, self.kmax:] * self.unit).pow(2).sum((1, 2))
            kin = X.new_zeros(E).index_add(0, self.row_member, v2 * self.kin_w)
        loss = mmd + self.vw * kin
        if penalty is not None:  # the mean over each member's cells
            loss = loss + X.new_zeros(E).index_add(0, self.row_member, penalty) * self.inv_rows
        return loss, mmd
