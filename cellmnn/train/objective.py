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
Under data parallelism each process computes the MMD sums of its own cells and an equal share of
the rest, and the op adds the processes' parts up.

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
import torch.distributed as dist

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

    def __init__(self, courses: list, times, D: int, kinetic: str, unit: float, backend: str, grid=None):
        self.courses, self.times, self.D = list(courses), [float(t) for t in times], D
        self.kinetic, self.unit, self.backend = kinetic, float(unit), backend
        self.grid = kinetic_grid(self.times, kinetic, unit) if grid is None else np.asarray(grid)
        self.E = len(self.courses)
        self.kmax = max(len(c.kept) for c in self.courses)
        self.T = T = self.kmax + len(self.grid)
        self.n_rows = [sum(c.n_src) for c in self.courses]
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
        self.x_off, self.y_off = x_off, y_off
        self.terms_x, self.terms_y = list(range(len(terms_y))), terms_y
        self.rows, self.term_w, self.term_member = np.concatenate(rows), term_w, term_member
        self.member = np.repeat(np.arange(self.E), self.n_rows)  # each source cell's member
        self.energy = self._energy()
        self.plan = self._loss_plan()
        self._shares = {}  # data-parallel plans, by (query rows, share)

    def _energy(self) -> np.ndarray:
        """(N * T,) weight of each decoded point's squared velocity in the kinetic term:
        velocity_weight * unit^2 * the form's weight (module docstring), 0 where it does not count."""
        D, n, member = self.D, np.asarray(self.n_rows, dtype=np.float64), self.member
        w = np.zeros((len(member), self.T))
        if self.kinetic == "kept_times":  # mean of V^2 over cells x every kept time x coordinates
            for e, c in enumerate(self.courses):
                w[member == e, :len(c.kept)] = 1.0 / (n[e] * len(c.kept) * D)
        elif self.kinetic == "grid":  # mean of V^2 over cells x grid times x coordinates
            w[:, self.kmax:] = (1.0 / (n * max(len(self.grid), 1) * D))[member][:, None]
        else:  # "future": mean over cells x later kept times of ||V||^2
            points = np.diff(self.x_off)
            counts = np.bincount(self.term_member, weights=points, minlength=self.E)
            w.reshape(-1)[self.rows] = np.repeat(1.0 / counts[self.term_member], points)
        vw = np.array([c.velocity_weight for c in self.courses]) * self.unit ** 2
        return (w * vw[member][:, None]).reshape(-1)

    def _loss_plan(self, x_rows=None, share: float = 1.0) -> LossPlan:
        """The whole loss as one ``laplace_mmd_loss`` plan: MMD terms, kinetic weights (``_energy``),
        the penalty's 1 / (member's cells); ``x_rows`` and ``share``: a process's part under data
        parallelism."""
        member = self.member
        return LossPlan(self.rows, self.x_off, self.y_off, self.terms_x, self.terms_y, self.term_w, self.term_member,
                        self.E, len(member) * self.T, np.repeat(member, self.T), [c.sigma for c in self.courses],
                        self.energy, member, 1.0 / np.asarray(self.n_rows, dtype=np.float64)[member], x_rows, share)

    def query_rows(self, lo: int, hi: int) -> list:
        """Per MMD term, the (start, end) rows of its x segment that come from each member's source
        cells lo..hi-1 (in the member's order): one process's share under data parallelism
        (``LossPlan``'s ``x_rows``)."""
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
        plan = self.plan
        if x_rows is not None:  # this process's query rows; the rest of the loss in equal shares
            share = 1.0 / (dist.get_world_size(group) if group is not None else 1)
            key = (tuple(tuple(r) for r in x_rows), share)
            if key not in self._shares:
                self._shares[key] = self._loss_plan(x_rows, share)
            plan = self._shares[key]
        return laplace_mmd_loss(plan, X.reshape(-1, self.D), ys, y_self, V.reshape(-1, self.D), penalty,
                                backend=self.backend, check_finite=check, group=group)
