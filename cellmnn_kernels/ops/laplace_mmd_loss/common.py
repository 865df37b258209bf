"""The plan of a ``laplace_mmd_loss`` call: host layout checked once, device tables built once.

Per group g (a member of an ensemble) the loss is

    loss_g = sum_{t in g} w_t MMD^2_t  +  sum_{i in g} e_i ||V_i||^2  +  sum_{j in g} p_j pen_j,

MMD^2_t between the prediction points X[rows[x segment of t]] and the y segment of t (unit point
weights).  The MMD part is laplace_mmd's pair sums (its plan and row reductions): without point
weights every row of a row reduction enters the loss with one coefficient per job, c = w_t / n_x^2
(S(X, X)), -2 w_t / (n_x n_y) (S(X, Y)) or w_t / n_y^2 (S(Y, Y)), and its gradient row with
c * factor * (-1 / (sigma D)) (factor 2 for the symmetric sums).  So a group's MMD is one weighted
sum over its rows, and X's gradient one product per row: ``finish`` and ``backward`` of each
backend.

Layout rules (checked when the plan is built, so a step checks nothing): X's rows of one group are
contiguous and groups come in order (``row_group`` non-decreasing), and so do the terms, the x and
y segments (in index order) and the penalty rows; a segment belongs to the terms of one group;
``rows`` are distinct and every x segment's rows lie in its terms' group.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch

from ..laplace_mmd.common import cached_plan, check_offsets, check_sigma, check_terms, host_ints, row_pairs


def _host_floats(name: str, v, n: int) -> np.ndarray:
    """(n,) finite float64 from a host sequence; errors name the argument."""
    if isinstance(v, torch.Tensor):
        if v.device.type != "cpu":
            raise ValueError(f"{name} must be on the host (a list, array or CPU tensor); got a tensor on {v.device}")
        v = v.detach().double().numpy()
    try:
        a = np.asarray(v, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a 1-D sequence of real numbers") from None
    if a.shape != (n,):
        raise ValueError(f"{name} must have {n} entries; got {a.shape[0]}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has {int((~np.isfinite(a)).sum())} non-finite entries")
    return a


def _groups(name: str, v, n: int, n_groups: int) -> np.ndarray:
    """(n,) group indices in [0, n_groups), non-decreasing."""
    a = np.asarray(host_ints(name, v), dtype=np.int64)
    if a.shape != (n,):
        raise ValueError(f"{name} must have {n} entries; got {a.shape[0]}")
    if n and (a.min() < 0 or a.max() >= n_groups):
        raise ValueError(f"{name} must lie in [0, n_groups = {n_groups})")
    if (np.diff(a) < 0).any():
        raise ValueError(f"{name} must be non-decreasing: the rows of a group are contiguous and groups come in order")
    return a


def _starts(groups: np.ndarray, n_groups: int) -> list:
    """(n_groups + 1,) offsets of each group's rows in non-decreasing ``groups``."""
    return [0] + np.cumsum(np.bincount(groups, minlength=n_groups)).tolist()


@dataclass
class Built:
    """A plan's device tables for one (self_y, D, dtype, device): the laplace_mmd plan ``inner``;
    per row-reduction launch, the rows' forward coefficient ``c`` and gradient coefficient ``cg``
    (float64), the offsets of each group's rows ``lo`` (int64, n_groups + 1), each row's group
    ``grp`` and X row ``xrow`` (int64; ``xrow`` for launches with queries in X), and ``inv`` (int64,
    (n_points,): the launch row whose query is X's row, -1 for none; launches with gradients)."""
    inner: object
    c: list
    cg: list
    lo: list
    grp: list
    xrow: list
    inv: list
    rows: torch.Tensor
    row_group: torch.Tensor
    x_lo: torch.Tensor
    term_w: torch.Tensor
    term_group: torch.Tensor
    term_y: torch.Tensor
    term_lo: torch.Tensor
    energy: torch.Tensor | None
    pen_group: torch.Tensor | None
    pen_w: torch.Tensor | None
    pen_lo: torch.Tensor | None
    xscale: torch.Tensor | None = None  # (P, 1), (M, 1): per-group sigma's point scales (else None)
    yscale: torch.Tensor | None = None
    share: torch.Tensor | None = None  # (1,) float64: the plan's share of the loss beyond its MMD rows
    share_f: float = 1.0  # the same on the host


class LossPlan:
    """The host layout of a ``laplace_mmd_loss`` call, checked once (errors name the argument).

    Args:
        rows: (P,) distinct rows of X, the prediction points packed segment after segment.
        x_offsets, y_offsets: segment offsets over the P packed points and the M observed points.
        terms_x, terms_y, term_weights: per term its x segment, y segment and weight (numbers).
        term_group: per term its group; ``n_groups`` groups.
        n_points: X's rows (N); ``row_group`` (N,) their groups.
        sigma: the kernel bandwidth, or one per group: then each group's points (its terms' x and
            y segments) are scaled by 1 / sigma and compared with bandwidth 1, as MMD with
            bandwidth sigma on points p equals MMD with bandwidth 1 on p / sigma (the clamp applies
            to the scaled distance).
        energy_weight: optional (N,) e_i of the velocity term (no velocity term without it).
        penalty_group, penalty_weight: optional (Np,) group and weight p_j of each penalty entry.
        x_rows, share: the data-parallel form.  ``x_rows``: per x segment the (start, end) packed
            points whose MMD sums this plan computes (its queries; the keys are the whole
            segment); the rest of the loss (y-y means, energy, penalty) enters times ``share``, so
            that processes whose x_rows split every segment, each with share 1 / (processes), add
            up to the whole loss (``laplace_mmd_loss``'s ``group`` adds them).  Gradients: X's on
            the plan's query rows, V's and the penalty's those of the whole loss.
    """

    def __init__(self, rows, x_offsets, y_offsets, terms_x, terms_y, term_weights, term_group, n_groups: int,
                 n_points: int, row_group, sigma=1.0, energy_weight=None, penalty_group=None, penalty_weight=None,
                 x_rows=None, share: float = 1.0):
        if isinstance(n_groups, bool) or not isinstance(n_groups, numbers.Integral) or n_groups < 1:
            raise ValueError(f"n_groups must be a positive integer; got {n_groups!r}")
        self.G, self.N = int(n_groups), int(n_points)
        if isinstance(sigma, (list, tuple, np.ndarray, torch.Tensor)):
            sig = [check_sigma(float(v)) for v in _host_floats("sigma", sigma, self.G)]
        else:
            sig = [check_sigma(sigma)] * self.G
        self.group_sigma = np.asarray(sig)
        self.sigma = sig[0] if len(set(sig)) == 1 else None  # None: per-group scaling
        self.rows = np.asarray(host_ints("rows", rows), dtype=np.int64)
        P = self.rows.shape[0]
        if P and (self.rows.min() < 0 or self.rows.max() >= self.N):
            raise ValueError(f"rows must be rows of X, in [0, n_points = {self.N})")
        if np.unique(self.rows).shape[0] != P:
            raise ValueError("rows must be distinct (each row of X enters at most one term)")
        self.x_off = check_offsets("x_offsets", x_offsets, P)
        y_off = host_ints("y_offsets", y_offsets)
        self.y_off = check_offsets("y_offsets", y_off, y_off[-1] if y_off else 0)
        self.tx, self.ty = host_ints("terms_x", terms_x), host_ints("terms_y", terms_y)
        n_terms = len(self.tx)
        if len(self.ty) != n_terms or not n_terms:
            raise ValueError(f"terms_x and terms_y must have the same non-zero length; got {n_terms} and "
                             f"{len(self.ty)}")
        self.w = _host_floats("term_weights", term_weights, n_terms)
        self.term_group = _groups("term_group", term_group, n_terms, self.G)
        self.row_group = _groups("row_group", row_group, self.N, self.G)
        self.energy = None if energy_weight is None else _host_floats("energy_weight", energy_weight, self.N)
        if (penalty_group is None) != (penalty_weight is None):
            raise ValueError("penalty_group and penalty_weight come together (or neither)")
        self.pen_group = self.pen_w = None
        if penalty_group is not None:
            n_pen = len(host_ints("penalty_group", penalty_group))
            self.pen_group = _groups("penalty_group", penalty_group, n_pen, self.G)
            self.pen_w = _host_floats("penalty_weight", penalty_weight, n_pen)
        self._check_segments()
        self.x_rows = None if x_rows is None else row_pairs(x_rows, self.x_off)
        self.share = float(share)
        if not 0 < self.share <= 1:
            raise ValueError(f"share must lie in (0, 1]; got {share!r}")
        self._built = {}

    def _check_segments(self):
        """Every segment used by one group's terms, in group order, and x segments' rows in that group."""
        for name, terms, off in (("terms_x", self.tx, self.x_off), ("terms_y", self.ty, self.y_off)):
            check_terms(name, terms, off)
            owner = {}
            for s, g in zip(terms, self.term_group.tolist()):
                if owner.setdefault(s, g) != g:
                    raise ValueError(f"{name}: segment {s} is used by terms of groups {owner[s]} and {g}; a segment "
                                     f"belongs to one group")
            order = [owner[s] for s in sorted(owner)]
            if any(b < a for a, b in zip(order, order[1:])):
                raise ValueError(f"{name}: the segments' groups must be non-decreasing in segment order")
        for s, g in zip(self.tx, self.term_group.tolist()):
            got = self.row_group[self.rows[self.x_off[s]:self.x_off[s + 1]]]
            if (got != g).any():
                raise ValueError(f"rows of x segment {s} lie in group(s) {sorted(set(got.tolist()) - {g})[:3]}, not "
                                 f"in its terms' group {g}")

    def point_scales(self):
        """(x scales (P,), y scales (M,)) of the packed and observed points, 1 / their group's
        sigma, float64; (None, None) with one sigma for every group."""
        if self.sigma is not None:
            return None, None
        inv = 1.0 / self.group_sigma
        xs, ys = np.ones(self.rows.shape[0]), np.ones(self.y_off[-1])
        for sx, sy, g in zip(self.tx, self.ty, self.term_group.tolist()):
            xs[self.x_off[sx]:self.x_off[sx + 1]] = inv[g]
            ys[self.y_off[sy]:self.y_off[sy + 1]] = inv[g]
        return xs, ys

    def built(self, self_y: bool, D: int, dtype: torch.dtype, device) -> Built:
        """The device tables for a call (built on first use, then kept; as normal tensors even under
        inference_mode, since later calls that record autograd graphs reuse them)."""
        key = (self_y, D, dtype, torch.device(device))
        if key not in self._built:
            with torch.inference_mode(False):
                self._built[key] = self._build(self_y, D, dtype, torch.device(device))
        return self._built[key]

    def _build(self, self_y, D, dtype, device) -> Built:
        inner = cached_plan(tuple(self.x_off), tuple(self.y_off), tuple(self.tx), tuple(self.ty), True, False, False,
                            self.sigma or 1.0, D, dtype, tuple(float(v) for v in self.w), self_y, self.x_rows)
        xscale, yscale = self.point_scales()
        nx = np.diff(self.x_off)[self.tx].astype(np.float64)
        ny = np.diff(self.y_off)[self.ty].astype(np.float64)
        coef, group = np.zeros(inner.n_sums), np.full(inner.n_sums, -1, dtype=np.int64)
        for t, g in enumerate(self.term_group.tolist()):
            pairs = [(inner.term_xx[t], self.w[t] / nx[t] ** 2), (inner.term_xy[t], -2 * self.w[t] / (nx[t] * ny[t]))]
            if self_y:
                pairs.append((inner.term_yy[t], self.w[t] / ny[t] ** 2))
            for s, c in pairs:
                coef[s] += c
                group[s] = g
        dev = lambda a, dt=torch.int64: torch.as_tensor(np.ascontiguousarray(a), dtype=dt).to(device)  # noqa: E731
        c, cg, lo, grp, xrow, inv = [], [], [], [], [], []
        for lc in inner.launches:
            slot = np.concatenate([np.full(q1 - q0, s) for (q0, q1, _, _), s in zip(lc.jobs, lc.job_s)])
            point = np.concatenate([np.arange(q0, q1) for q0, q1, _, _ in lc.jobs])
            factor = np.concatenate([np.full(q1 - q0, f) for (q0, q1, _, _), f in zip(lc.jobs, lc.job_factor)])
            g = group[slot]  # rows come job after job, jobs in group order (checked above)
            c.append(dev(coef[slot], torch.float64))
            # the gradient in X of a scaled point is its scale times that of the point
            scale = 1.0 if xscale is None or lc.q_side else xscale[point]
            cg.append(dev(coef[slot] * factor * scale * (-1.0 / ((self.sigma or 1.0) * D)), torch.float64))
            lo.append(dev(_starts(g, self.G)))
            grp.append(dev(g))
            on_x = lc.q_side == 0
            xrow.append(dev(self.rows[point]) if on_x else None)
            if on_x and lc.compute_g:
                a = np.full(self.N, -1, dtype=np.int64)
                a[self.rows[point]] = np.arange(point.shape[0])
                inv.append(dev(a))
            else:
                inv.append(None)
        fl = lambda a: None if a is None else dev(a, dtype)  # noqa: E731
        has_pen = self.pen_group is not None
        return Built(inner, c, cg, lo, grp, xrow, inv, dev(self.rows), dev(self.row_group),
                     dev(_starts(self.row_group, self.G)), dev(self.w, torch.float64), dev(self.term_group),
                     dev(self.ty), dev(_starts(self.term_group, self.G)), fl(self.energy),
                     dev(self.pen_group) if has_pen else None, fl(self.pen_w),
                     dev(_starts(self.pen_group, self.G)) if has_pen else None,
                     None if xscale is None else dev(xscale[:, None], dtype),
                     None if yscale is None else dev(yscale[:, None], dtype), dev([self.share], torch.float64),
                     self.share)


def check_call(plan: LossPlan, X, y, y_self, V, penalty):
    """Shapes, dtypes and devices of one call against its plan; errors name the argument."""
    if not isinstance(plan, LossPlan):
        raise TypeError(f"plan must be a LossPlan; got {type(plan).__name__}")
    for name, t, shape in (("X", X, (plan.N, None)), ("y", y, (plan.y_off[-1], None))):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be a float32 or float64 tensor of shape (n, D); got {type(t).__name__} "
                            f"{tuple(getattr(t, 'shape', ()))}")
        if t.shape[0] != shape[0]:
            raise ValueError(f"{name} must have {shape[0]} rows (the plan's); got {t.shape[0]}")
    D = X.shape[1]
    if y.shape[1] != D or y.dtype != X.dtype or y.device != X.device:
        raise ValueError(f"y must match X's dimension, dtype and device; got {tuple(y.shape)} {y.dtype} {y.device}")
    if y.requires_grad:
        raise ValueError("y must not require gradients (laplace_mmd_loss differentiates in X, V and penalty)")
    if plan.x_rows is not None and y_self is None:
        raise ValueError("a plan with x_rows needs y_self (its processes do not compute the y-y means)")
    if y_self is not None and (not isinstance(y_self, torch.Tensor) or y_self.shape != (len(plan.y_off) - 1,)
                               or y_self.dtype != X.dtype or y_self.device != X.device or y_self.requires_grad):
        raise ValueError(f"y_self must be a constant ({len(plan.y_off) - 1},) tensor of X's dtype and device")
    if (V is None) != (plan.energy is None):
        raise ValueError("V is given exactly when the plan has energy_weight")
    if V is not None and (not isinstance(V, torch.Tensor) or V.shape != X.shape or V.dtype != X.dtype
                          or V.device != X.device):
        raise ValueError(f"V must have X's shape {tuple(X.shape)}, dtype and device")
    if penalty is not None and plan.pen_group is None:
        raise ValueError("penalty needs a plan with penalty_group and penalty_weight")
    if penalty is not None and (not isinstance(penalty, torch.Tensor) or penalty.shape != (plan.pen_group.shape[0],)
                                or penalty.dtype != X.dtype or penalty.device != X.device):
        raise ValueError(f"penalty must be a ({plan.pen_group.shape[0]},) tensor of X's dtype and device")
    return D


def nonfinite(**tensors) -> None:
    """Reject NaN/Inf in the given tensors (one host synchronisation)."""
    for name, t in tensors.items():
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} has {int((~torch.isfinite(t)).sum())} non-finite entries (NaN or Inf) "
                             f"out of {t.numel()}")

