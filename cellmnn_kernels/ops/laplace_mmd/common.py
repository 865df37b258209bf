"""What the backends of ``laplace_mmd`` share: input checks, the plan of a grouped call, the
autograd Function over row reductions, and the combination of pair sums into MMD^2.

Every MMD^2 term is built from weighted pair sums S(P, Q) = sum_i sum_j wp_i wq_j k(p_i, q_j):
    MMD^2(X, Y) = S(X, X) / Wx^2 + S(Y, Y) / Wy^2 - 2 S(X, Y) / (Wx Wy).
A backend only provides a *row reduction*: for query rows q_i of a job and the job's keys,
    r_i = sum_j wk_j k_ij            G_i = sum_j wk_j k_ij [unclamped] sign(q_i - k_j)   (a D-vector)
so that S = sum_i wq_i r_i, dS/dq_i = -wq_i G_i / (sigma D) and dS/dwq_i = r_i.  Gradients are
formed in the same pass as the values (the exponential is evaluated once per pair); the key side
of a cross sum S(X, Y) is the query side of S(Y, X), which is run only when y or its weights
need gradients.  Symmetric sums S(X, X) count their rows twice.

A plan (which sums, which launches) depends only on host values: the offsets, the terms, the
gradient flags, sigma, D, the dtype and term weights given as plain numbers.  It is the one cache
of this op: ``cached_plan`` memoises plans (``PLAN_CACHE`` of them), and each plan keeps what the
backends derive from it per device (``Plan.derived``: its index tensors, the term weights, the
torch path's gather batches, the Triton launch tables), so that a training loop repeating its
offsets and terms builds and uploads nothing per call.
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..utils import check_same_dtype_device, check_tensor, count_nonfinite, first_order_only

SECOND_ORDER = ("laplace_mmd: the torch and triton backends have first derivatives only (second derivatives of "
                "the Laplace MMD are not supported)")

CLAMP = 1e-8


# ----------------------------------------------------------------------------- input checks

def check_sigma(sigma) -> float:
    """sigma as a float; TypeError or ValueError unless it is a positive finite real number."""
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise TypeError(f"sigma must be a positive real number, got {type(sigma).__name__}")
    sigma = float(sigma)
    if not (sigma > 0 and sigma < float("inf")):
        raise ValueError(f"sigma must be positive and finite, got {sigma}")
    return sigma


def check_points(x, y):
    """x (N, D) and y (M, D): tensors of one supported dtype and device, D >= 1, N, M >= 1."""
    check_tensor("x", x, 2, "(N, D)")
    check_tensor("y", y, 2, "(M, D)")
    check_same_dtype_device(x=x, y=y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension D; got x {tuple(x.shape)} and y {tuple(y.shape)}")
    if x.shape[1] == 0:
        raise ValueError("x and y must have D >= 1")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError(f"x and y must be non-empty; got {x.shape[0]} and {y.shape[0]} points")


def check_weights(name, w, n, like):
    """Optional point weights ``w``: None, or a (n,) tensor of ``like``'s dtype and device."""
    if w is None:
        return None
    check_tensor(name, w, 1, f"({n},)")
    check_same_dtype_device(**{"x" if name.startswith("x") else "y": like, name: w})
    if w.shape[0] != n:
        raise ValueError(f"{name} must have one weight per point: shape ({n},), got {tuple(w.shape)}")
    return w


def host_ints(name, v) -> list[int]:
    """A 1-D integer sequence that lives on the host (list, tuple or CPU tensor)."""
    if isinstance(v, torch.Tensor):
        if v.device.type != "cpu":
            raise ValueError(f"{name} must be on the host (a list or a CPU tensor) so that no device "
                             f"synchronisation is needed; got a tensor on {v.device}")
        if v.dtype.is_floating_point or v.dtype.is_complex or v.dtype == torch.bool or v.dim() != 1:
            raise TypeError(f"{name} must be a 1-D integer tensor; got {v.dtype} of shape {tuple(v.shape)}")
        return [int(i) for i in v.tolist()]
    try:
        out = [int(i) for i in v]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a 1-D sequence of integers") from None
    if any(isinstance(i, bool) or (not isinstance(i, numbers.Integral) and i != int(i)) for i in v):
        raise TypeError(f"{name} must contain integers")
    return out


def check_offsets(name, offsets, n) -> list[int]:
    """Segment offsets as host integers: non-decreasing, from 0 to the number of points n."""
    off = host_ints(name, offsets)
    if len(off) < 2 or off[0] != 0 or off[-1] != n:
        raise ValueError(f"{name} must start at 0 and end at the number of points ({n}); got {off[:3]}...{off[-2:]}")
    if any(b < a for a, b in zip(off, off[1:])):
        raise ValueError(f"{name} must be non-decreasing")
    return off


def check_term_weights(term_weights, n_terms: int, device):
    """The terms' weights: None (all 1), a tuple of plain numbers (the plan keeps their device
    tensor, ``Plan.weights``: no upload per call), or an (n_terms,) float64 tensor (differentiable
    if given as such)."""
    if term_weights is None:
        return None
    if isinstance(term_weights, (list, tuple)) and all(type(v) in (int, float) for v in term_weights):
        if len(term_weights) != n_terms:
            raise ValueError(f"term_weights must have one weight per term ({n_terms}); got shape "
                             f"({len(term_weights)},)")
        return tuple(term_weights)
    try:
        w = torch.as_tensor(term_weights, dtype=torch.float64, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"term_weights must be numbers, one per term; got {term_weights!r}") from None
    if w.shape != (n_terms,):
        raise ValueError(f"term_weights must have one weight per term ({n_terms}); got shape {tuple(w.shape)}")
    return w


def check_y_self(y_self, n_segments: int, y, y_weights):
    """Given self terms: None, or an (n_segments,) tensor of y's dtype and device, with y and its
    weights constant (the given values carry no gradient, so none may be expected through them)."""
    if y_self is None:
        return None
    check_tensor("y_self", y_self, 1, f"({n_segments},)")
    check_same_dtype_device(y=y, y_self=y_self)
    if y_self.shape[0] != n_segments:
        raise ValueError(f"y_self must have one value per y segment: shape ({n_segments},), got {tuple(y_self.shape)}")
    if y.requires_grad or (y_weights is not None and y_weights.requires_grad):
        raise ValueError("y_self replaces the y-y kernel means, which then carry no gradient: y and y_weights "
                         "must not require gradients")
    return y_self


def check_terms(name: str, terms: list, off: list) -> None:
    """Term segment indices ``terms`` (host integers) inside the segments of ``off`` and none empty."""
    bad = [s for s in terms if not 0 <= s < len(off) - 1]
    if bad:
        raise ValueError(f"{name} has segment indices out of range [0, {len(off) - 1}): {bad[:5]}")
    empty = sorted({s for s in terms if off[s + 1] == off[s]})
    if empty:
        raise ValueError(f"{name} refers to empty segment(s) {empty[:5]}")


def row_pairs(x_rows, x_off: list) -> tuple:
    """``x_rows`` as a tuple of (start, end) host integers, one pair per x segment, inside it."""
    try:
        rows = tuple((int(a), int(b)) for a, b in x_rows)
    except (TypeError, ValueError):
        raise TypeError("x_rows must be one (start, end) pair of integers per x segment") from None
    if len(rows) != len(x_off) - 1:
        raise ValueError(f"x_rows must have one (start, end) pair per x segment ({len(x_off) - 1}); got {len(rows)}")
    bad = [s for s, (a, b) in enumerate(rows) if not x_off[s] <= a <= b <= x_off[s + 1]]
    if bad:
        raise ValueError(f"x_rows of segment(s) {bad[:5]} are not inside the segment (x_offsets[s] <= start <= end "
                         f"<= x_offsets[s + 1])")
    return rows


def check_x_rows(x_rows, x_off: list, x_weights, y_self, group):
    """The query rows of each x segment (``laplace_mmd_grouped``'s ``x_rows``): None, or one
    (start, end) pair of host integers per x segment, inside it; with them y_self (checked by
    ``check_y_self``, which keeps y and its weights constant) and constant x weights.  Returns a
    tuple of pairs or None."""
    if x_rows is None:
        if group is not None:
            raise ValueError("group sums the pair sums of every process's x_rows over the processes; give x_rows")
        return None
    rows = row_pairs(x_rows, x_off)
    if y_self is None or (x_weights is not None and x_weights.requires_grad):
        raise ValueError("x_rows computes the sums over x's query rows only: it needs y_self (the y-y means) and "
                         "x_weights without gradient")
    return rows


def check_values(x, y, x_weights, y_weights, segments, term_weights=None, y_self=None) -> None:
    """NaN/Inf, negative weights and zero-weight segments (one host synchronisation)."""
    tensors = {"x": x, "y": y}
    if term_weights is not None:
        tensors["term_weights"] = term_weights
    if y_self is not None:
        tensors["y_self"] = y_self
    if x_weights is not None:
        tensors["x_weights"] = x_weights
    if y_weights is not None:
        tensors["y_weights"] = y_weights
    numbers_ = {n: v for n, v in tensors.items() if isinstance(v, tuple)}  # plain term weights
    counts = count_nonfinite(**{n: v for n, v in tensors.items() if n not in numbers_})
    counts.update({n: sum(not math.isfinite(w) for w in v) for n, v in numbers_.items()})
    for name in tensors:
        if counts[name]:
            total = len(tensors[name]) if name in numbers_ else tensors[name].numel()
            raise ValueError(f"{name} has {counts[name]} non-finite entries (NaN or Inf) out of {total}")
    for name, w, offs, used in (("x_weights", x_weights, *segments[0]), ("y_weights", y_weights, *segments[1])):
        if w is None:
            continue
        if bool((w < 0).any()):
            raise ValueError(f"{name} must be non-negative; it has {int((w < 0).sum())} negative entries")
        sums = torch.stack([w[offs[s]:offs[s + 1]].sum() for s in used]).tolist()
        zero = [s for s, v in zip(used, sums) if v == 0]
        if zero:
            raise ValueError(f"{name} sum to zero over segment(s) {zero[:5]}: a weighted mean is undefined")


# ----------------------------------------------------------------------------- the plan

@dataclass
class Launch:
    """One row-reduction launch: queries from side q (0 = x, 1 = y), keys from side k; its jobs
    (query range, key range), and per job the S slot, the S index whose upstream gradient scales
    it and its factor."""
    q_side: int
    k_side: int
    compute_g: bool
    jobs: list = field(default_factory=list)  # (q0, q1, k0, k1) point ranges
    job_s: list = field(default_factory=list)  # index into S (or -1: auxiliary, not summed)
    job_grad_of: list = field(default_factory=list)  # S index whose upstream scales these rows
    job_factor: list = field(default_factory=list)  # 2 for symmetric sums, else 1

    @property
    def out_starts(self):
        """Per job, its first output row (rows of all jobs, concatenated)."""
        starts, n = [], 0
        for q0, q1, _, _ in self.jobs:
            starts.append(n)
            n += q1 - q0
        return starts

    @property
    def n_rows(self):
        """Output rows of the launch: every job's query rows."""
        return sum(q1 - q0 for q0, q1, _, _ in self.jobs)


@dataclass
class Plan:
    """Which pair sums a grouped call computes (``n_sums``), in which launches, and how the terms
    combine them; the call's sigma, D, dtype and plain term weights; and, per device and backend,
    what was derived from it (``derived``)."""
    launches: list
    n_sums: int
    term_xx: list
    term_yy: list
    term_xy: list
    x_segments: list  # (start, end) per used x segment, in the order of seg_index_x
    y_segments: list
    term_sx: list  # per term: position of its x segment in x_segments
    term_sy: list
    sigma: float = 1.0
    D: int = 0
    dtype: torch.dtype = torch.float32
    term_weights: tuple | None = None  # plain-number term weights (None: all 1, or given as a tensor)
    _derived: dict = field(default_factory=dict, repr=False, compare=False)

    def derived(self, key: tuple, build):
        """``build()``, kept with the plan under ``key`` (what, device, ...): everything the
        backends derive from the plan is built once per plan and key.  Built as normal tensors
        even under inference_mode, since later calls that record autograd graphs reuse them."""
        out = self._derived.get(key)
        if out is None:
            with torch.inference_mode(False):
                out = self._derived[key] = build()
        return out

    def tensors(self, device) -> "PlanTensors":
        """The plan's index tensors on ``device``."""
        return self.derived(("index", device), lambda: PlanTensors.build(self, device))

    def weights(self, device) -> torch.Tensor:
        """The plain-number term weights as an (n_terms,) float64 tensor on ``device``."""
        return self.derived(("term_weights", device),
                            lambda: torch.tensor(self.term_weights, dtype=torch.float64, device=device))


def build_plan(x_off, y_off, terms_x, terms_y, grad_x, grad_y, grad_wy, sigma=1.0, D=0, dtype=torch.float32,
               term_weights=None, self_y=True, x_rows=None) -> Plan:
    """Which pair sums a grouped call computes, grouped into at most four launches.  Without
    ``self_y`` the S(Y, Y) sums are not computed (the caller gives the y-y means): ``term_yy``
    then holds each term's y segment.  ``x_rows``: per x segment the (start, end) of the rows
    that are queries of its S(X, X) and S(X, Y) (default: all of them)."""
    xs, ys = sorted(set(terms_x)), sorted(set(terms_y))
    pos_x = {s: i for i, s in enumerate(xs)}
    pos_y = {s: i for i, s in enumerate(ys)}
    xx = Launch(0, 0, grad_x)
    yy = Launch(1, 1, grad_y)
    xy = Launch(0, 1, grad_x)
    yx = Launch(1, 0, grad_y)
    n = 0
    sum_xx, sum_yy = {}, {}
    q = (lambda s: x_rows[s]) if x_rows is not None else (lambda s: (x_off[s], x_off[s + 1]))  # noqa: E731
    for s in xs:
        a, b = x_off[s], x_off[s + 1]
        xx.jobs.append((*q(s), a, b)), xx.job_s.append(n), xx.job_grad_of.append(n), xx.job_factor.append(2.0)
        sum_xx[s] = n
        n += 1
    for s in ys if self_y else ():
        a, b = y_off[s], y_off[s + 1]
        yy.jobs.append((a, b, a, b)), yy.job_s.append(n), yy.job_grad_of.append(n), yy.job_factor.append(2.0)
        sum_yy[s] = n
        n += 1
    term_xy = []
    for sx, sy in zip(terms_x, terms_y):
        xa, xb, ya, yb = x_off[sx], x_off[sx + 1], y_off[sy], y_off[sy + 1]
        xy.jobs.append((*q(sx), ya, yb)), xy.job_s.append(n), xy.job_grad_of.append(n), xy.job_factor.append(1.0)
        if grad_y or grad_wy:
            yx.jobs.append((ya, yb, xa, xb)), yx.job_s.append(-1), yx.job_grad_of.append(n), yx.job_factor.append(1.0)
        term_xy.append(n)
        n += 1
    launches = [lc for lc in (xx, yy, xy, yx) if lc.jobs]
    return Plan(launches, n, [sum_xx[s] for s in terms_x], [sum_yy[s] if self_y else s for s in terms_y], term_xy,
                [(x_off[s], x_off[s + 1]) for s in xs], [(y_off[s], y_off[s + 1]) for s in ys],
                [pos_x[s] for s in terms_x], [pos_y[s] for s in terms_y], sigma, D, dtype, term_weights)


PLAN_CACHE = 128  # plans (with everything derived from them) kept by ``cached_plan``: the op's one cache


@functools.lru_cache(maxsize=PLAN_CACHE)
def cached_plan(x_off: tuple, y_off: tuple, terms_x: tuple, terms_y: tuple, grad_x: bool, grad_y: bool,
                grad_wy: bool, sigma: float, D: int, dtype: torch.dtype, term_weights: tuple | None,
                self_y: bool = True, x_rows: tuple | None = None) -> Plan:
    """``build_plan`` memoised on its (hashable) inputs: a training loop that repeats its call
    reuses one plan and what was derived from it.  Plans are never modified (but for the store
    of ``Plan.derived``)."""
    return build_plan(x_off, y_off, terms_x, terms_y, grad_x, grad_y, grad_wy, sigma, D, dtype, term_weights, self_y,
                      x_rows)


@dataclass
class LaunchTensors:
    """Per output row of a launch: its query point, its S slot (n_sums for auxiliary rows), the S
    index whose upstream gradient scales it and its factor (2 for symmetric sums)."""
    point: torch.Tensor
    slot: torch.Tensor
    grad_of: torch.Tensor
    factor: torch.Tensor  # float64


@dataclass
class PlanTensors:
    """Device index tensors of a plan (built once per plan and device, see ``Plan.tensors``)."""
    launches: list  # LaunchTensors per launch
    x_a: torch.Tensor  # per term: start and end of its x segment
    x_b: torch.Tensor
    y_a: torch.Tensor
    y_b: torch.Tensor
    term_xx: torch.Tensor
    term_yy: torch.Tensor
    term_xy: torch.Tensor
    x_len: torch.Tensor  # per term: its segments' lengths (float64), their weight sums without weights
    y_len: torch.Tensor
    # Without weights MMD^2 = S_xx / |x|^2 - 2 S_xy / (|x| |y|) + S_yy / |y|^2 per term: the sums' slots
    # (n_terms, 2: xx, xy) and coefficients, and S_yy's coefficient, so that the finish is one gather
    pair_idx: torch.Tensor
    pair_coef: torch.Tensor
    yy_coef: torch.Tensor

    @staticmethod
    def build(plan: Plan, device) -> "PlanTensors":
        """Built on the host, then moved in one copy each (``Plan.tensors`` keeps them)."""
        host = lambda v, dtype=torch.int64: torch.tensor(v, dtype=dtype)  # noqa: E731
        launches = []
        for lc in plan.launches:
            n = lc.n_rows
            job = torch.repeat_interleave(torch.arange(len(lc.jobs)), host([q1 - q0 for q0, q1, _, _ in lc.jobs]),
                                          output_size=n)
            point = host([j[0] for j in lc.jobs])[job] + torch.arange(n) - host(lc.out_starts)[job]
            slot = host([s if s >= 0 else plan.n_sums for s in lc.job_s])[job]
            launches.append(LaunchTensors(point.to(device), slot.to(device), host(lc.job_grad_of)[job].to(device),
                                          host(lc.job_factor, torch.float64)[job].to(device)))
        xs, ys = [plan.x_segments[i] for i in plan.term_sx], [plan.y_segments[i] for i in plan.term_sy]
        dev = lambda v, dtype=torch.int64: host(v, dtype).to(device)  # noqa: E731
        nx = host([b - a for a, b in xs], torch.float64)
        ny = host([b - a for a, b in ys], torch.float64)
        return PlanTensors(launches, dev([a for a, _ in xs]), dev([b for _, b in xs]), dev([a for a, _ in ys]),
                           dev([b for _, b in ys]), dev(plan.term_xx), dev(plan.term_yy), dev(plan.term_xy),
                           nx.to(device), ny.to(device),
                           torch.stack([host(plan.term_xx), host(plan.term_xy)], 1).to(device),
                           torch.stack([1.0 / nx ** 2, -2.0 / (nx * ny)], 1).to(device), (1.0 / ny ** 2).to(device))


# ----------------------------------------------------------------------------- autograd

class PairSums(torch.autograd.Function):
    """S (n_sums,) float64 from points and weights (wx, wy None: unit weights, no products by
    ones); one row reduction per launch of the plan.

    ``reducer(Q, K, WK, plan, i)`` -> (r, G or None) for launch i of the plan (a backend's
    ``reduce_rows_*``)."""

    @staticmethod
    def forward(ctx, x, y, wx, wy, plan: Plan, reducer, group=None):
        """S: the plan's pair sums, one ``reducer`` call per launch, summed over the processes of
        ``group`` if one is given; rows saved for backward."""
        pts, wts = (x, y), (wx, wy)
        S = torch.zeros(plan.n_sums + 1, dtype=torch.float64, device=x.device)
        saved = []
        for i, (lc, lt) in enumerate(zip(plan.launches, plan.tensors(x.device).launches)):
            Q, K, WQ, WK = pts[lc.q_side], pts[lc.k_side], wts[lc.q_side], wts[lc.k_side]
            r, G = reducer(Q, K, WK, plan, i)
            S.index_add_(0, lt.slot, (r if WQ is None else WQ[lt.point] * r).double())
            saved += [r, G]
        if group is not None:  # each process summed its own query rows; dL/dS is the same for all
            dist.all_reduce(S, group=group)
        ctx.plan = plan
        # Everything backward reads goes through save_for_backward, so that a second backward
        # (retain_graph=True) finds it again.
        ctx.save_for_backward(x, y, wx, wy, *saved)
        ctx.shapes = (x.shape, y.shape, x.dtype)
        return S[: plan.n_sums]

    @staticmethod
    def backward(ctx, gS):
        """Gradients in x, y and the point weights from the saved rows (first derivatives only)."""
        x, y, wx, wy, *saved = ctx.saved_tensors
        rows = [tuple(saved[i:i + 2]) for i in range(0, len(saved), 2)]
        with torch.no_grad():
            grads = PairSums._backward(ctx, gS, wx, wy, rows)
        return (*first_order_only(SECOND_ORDER, grads, (x, y, wx, wy)), None, None, None)

    @staticmethod
    def _backward(ctx, gS, wx, wy, rows):
        plan = ctx.plan
        sigma, D = plan.sigma, plan.D
        xshape, yshape, dtype = ctx.shapes
        need = ctx.needs_input_grad
        grads = [torch.zeros(xshape, dtype=dtype, device=gS.device) if need[0] else None,
                 torch.zeros(yshape, dtype=dtype, device=gS.device) if need[1] else None,
                 torch.zeros_like(wx) if need[2] and wx is not None else None,
                 torch.zeros_like(wy) if need[3] and wy is not None else None]
        wts = (wx, wy)
        for lc, lt, (r, G) in zip(plan.launches, plan.tensors(gS.device).launches, rows):
            point = lt.point
            coef = (gS[lt.grad_of] * lt.factor).to(dtype)  # per row
            if grads[lc.q_side] is not None and G is not None:
                wq = wts[lc.q_side]
                scale = (coef if wq is None else coef * wq[point]) * (-1.0 / (sigma * D))
                grads[lc.q_side].index_add_(0, point, scale[:, None] * G)
            if grads[2 + lc.q_side] is not None:
                grads[2 + lc.q_side].index_add_(0, point, coef * r)
        return tuple(grads)


def grouped_mmd(x, x_off, y, y_off, terms_x, terms_y, term_weights, sigma, wx, wy, reducer, y_self=None,
                x_rows=None, group=None):
    """(sum_t w_t MMD^2_t, per-term MMD^2) through ``reducer`` (``PairSums``); inputs validated,
    ``term_weights`` as ``check_term_weights`` returns them; ``y_self``: the y-y kernel mean of
    every y segment, used instead of computing S(Y, Y); ``x_rows`` and ``group``: the query
    rows of each x segment, and the processes whose sums are added up."""
    unweighted = wx is None, wy is None  # unit weights: None all the way down (no products by ones)
    # Weight gradients come from the row sums every launch computes, except those of y, which
    # need the S(Y, X) launch.
    plain = term_weights if isinstance(term_weights, tuple) else None
    wy_grad = wy is not None and wy.requires_grad
    plan = cached_plan(tuple(x_off), tuple(y_off), tuple(terms_x), tuple(terms_y), x.requires_grad,
                       y.requires_grad, wy_grad, sigma, x.shape[1], x.dtype, plain, y_self is None, x_rows)
    if plain is not None:
        term_weights = plan.weights(x.device)
    S = PairSums.apply(x, y, wx, wy, plan, reducer, group)
    t = plan.tensors(x.device)

    def seg_sums(w, a, b):
        """Per term, the sum of the weights w[a:b] of its segment (float64)."""
        c = torch.cat([w.new_zeros(1, dtype=torch.float64), torch.cumsum(w.double(), 0)])
        return c[b] - c[a]

    if unweighted[0] and unweighted[1]:  # coefficients kept with the plan: one gather of the sums
        yy = S[t.term_yy] * t.yy_coef if y_self is None else y_self.double()[t.term_yy]
        values = (S[t.pair_idx] * t.pair_coef).sum(1) + yy
    else:
        Wx = t.x_len if unweighted[0] else seg_sums(wx, t.x_a, t.x_b)
        Wy = t.y_len if unweighted[1] else seg_sums(wy, t.y_a, t.y_b)
        yy = S[t.term_yy] / Wy ** 2 if y_self is None else y_self.double()[t.term_yy]
        values = S[t.term_xx] / Wx ** 2 + yy - 2 * S[t.term_xy] / (Wx * Wy)
    total = values.sum() if term_weights is None else (term_weights * values).sum()  # (n_terms,) float64, checked
    return total.to(x.dtype), values.to(x.dtype)
