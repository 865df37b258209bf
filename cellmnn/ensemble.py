"""Many Cell-MNN models trained at once, as one vectorised model.

Every fit of the package runs here (a single fit is an ensemble of one).  The members of an
ensemble share the data (one ``Marginals``) and the shape of the computation: the network (dim,
width, depth, parameterization, num_const_dims), batch_size, the kinetic form, backend, device
and check_every.  Each member has its own seed, held-out and excluded timepoints and every other
hyperparameter (lr, weight_decay, gamma, sigma, velocity_weight, init_scale, max_epochs,
patience, val_fraction, select_on_holdout).

A training step is, for all members together: the batch drawn on the device by a counter-based
hash of (member seed, step, slot); one stacked MLP (batched matmuls over members); one
``local_linear_step`` over every member's cells; one ``laplace_mmd_grouped`` for every MMD term
of every member (different sigmas by scaling each member's points by 1/sigma); one AdamW update
of all weights (one (members, parameters) tensor).  Losses stay on the device; they, the
validation scores and the early-stopping decisions are read back only at check epochs.  A member
that stops early keeps its best weights and leaves the ensemble (the others go on in a smaller
one).  A member's batches, initial weights and validation split depend only on its own seed and
hyperparameters, so the same member gives the same model alone or in any ensemble (up to float
rounding of the batched products).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from cellmnn_kernels import laplace_mmd, laplace_mmd_grouped, local_linear_step

from .model import CellMNN, outputs_to_operator

#: Hyperparameters every member of one ensemble must share (the shape of the computation).
SHARED = ("width", "depth", "parameterization", "num_const_dims", "batch_size", "kinetic", "backend", "device",
          "check_every", "cuda_graph")

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults


@dataclass(frozen=True)
class Member:
    """One training time course of an ensemble: dataset ``dataset`` (an index into the list of
    marginals) without timepoints ``holdout`` and ``exclude``, trained with ``seed`` and ``hp``.
    Members with the same ``joint`` key (not None) are one model trained on all their time
    courses (joint training: the loss is the sum of theirs); otherwise each member is a model."""
    holdout: int | None
    seed: int
    hp: dict = field(hash=False, compare=False)
    exclude: tuple = ()
    dataset: int = 0
    joint: object = None


# ----------------------------------------------------------------------------- sampling on the device

_M16, _M32 = 0xFFFF, 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2^32 for x in [0, 2^32), exact in int64 (partial products stay below 2^49)."""
    return ((x & _M16) * c + ((((x >> 16) * c) & _M16) << 16)) & _M32


def mix32(x):
    """A bijective 32-bit integer hash ("lowbias32": shifts 16, 15, 16 and multipliers 0x7feb352d,
    0x846ca68b, from C. Wellons' hash-prospector).  Works on Python ints and int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def member_key(seed: int) -> int:
    """A 32-bit stream key from a 63-bit seed."""
    return mix32((seed & _M32) ^ mix32(((seed >> 32) & _M32) ^ 0x9E3779B9))


def slot_hash(keys: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The per-slot part of the sampler, computed once per layout: mix32(key ^ mix32(slot))."""
    return mix32(keys ^ mix32(slots ^ 0x85EBCA6B))


def draw(u: torch.Tensor, step: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Uniform integers in [0, n) per slot for this step, with no host state: mix32 of the slot's
    hash ``u`` (``slot_hash``) plus the step times the golden-ratio constant (a Weyl sequence), so
    one mix per step; within a step distinct slots of a member give distinct hashes.

    u, n: (S,) int64; step: 0-d int64 tensor (on the device: capturable)."""
    h = mix32((u + step * 0x9E3779B9) & _M32)
    return (h * n) >> 32  # h < 2^32, n < 2^31: exact


# ----------------------------------------------------------------------------- the stacked network

def layer_shapes(dim: int, width: int, depth: int, n_out: int) -> list:
    shapes, n_in = [], dim + 1
    for _ in range(depth):
        shapes.append((n_in, width))
        n_in = width
    return shapes + [(n_in, n_out)]


def n_outputs(dim, parameterization, num_const_dims):
    return dim * dim + (dim - num_const_dims if parameterization == "eigen" else 0)


def _offsets(shapes):
    out, o = [], 0
    for n_in, n_out in shapes:
        out.append((o, o + n_in * n_out, o + n_in * n_out + n_out))
        o += n_in * n_out + n_out
    return out, o


def pack(model: CellMNN) -> torch.Tensor:
    """A model's MLP weights as one flat vector (layer by layer: W (in, out) row-major, then b)."""
    parts = []
    for m in model.mlp:
        if isinstance(m, torch.nn.Linear):
            parts += [m.weight.detach().t().reshape(-1), m.bias.detach().reshape(-1)]
    return torch.cat(parts)


def unpack(model: CellMNN, flat: torch.Tensor) -> CellMNN:
    """Load a flat vector written by ``pack`` into ``model``'s MLP."""
    linears = [m for m in model.mlp if isinstance(m, torch.nn.Linear)]
    offs, total = _offsets([(m.in_features, m.out_features) for m in linears])
    if flat.numel() != total:
        raise ValueError(f"flat weights have {flat.numel()} entries; the model needs {total}")
    with torch.no_grad():
        for m, (a, b, c) in zip(linears, offs):
            m.weight.copy_(flat[a:b].view(m.in_features, m.out_features).t())
            m.bias.copy_(flat[b:c])
    return model


def stacked_mlp(flat: torch.Tensor, shapes, x: torch.Tensor) -> torch.Tensor:
    """Every member's MLP at once: flat (E, P) weights, x (E, n, in) -> (E, n, out); LeakyReLU
    (slope 0.01, torch's default) between layers, as ``CellMNN.mlp``."""
    E = flat.shape[0]
    offs, _ = _offsets(shapes)
    h = x
    for k, ((n_in, n_out), (a, b, c)) in enumerate(zip(shapes, offs)):
        h = torch.baddbmm(flat[:, b:c].view(E, 1, n_out), h, flat[:, a:b].view(E, n_in, n_out))
        if k < len(shapes) - 1:
            h = torch.nn.functional.leaky_relu(h)
    return h


class AdamW:
    """torch.optim.AdamW's update (decoupled weight decay, bias-corrected moments; tested against
    it) on one (E, P) tensor, with a learning rate and a weight decay per member, in a fixed
    number of operations whatever E."""

    def __init__(self, param: torch.Tensor, lr: torch.Tensor, weight_decay: torch.Tensor):
        self.param, self.lr, self.wd = param, lr[:, None], weight_decay[:, None]
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)
        self.t = torch.zeros((), dtype=param.dtype, device=param.device)  # steps taken (a device tensor)

    @torch.no_grad()
    def step(self):
        b1, b2 = ADAM_BETAS
        g, p = self.param.grad, self.param
        self.t.add_(1)
        self.m.lerp_(g, 1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        p.mul_(1 - self.lr * self.wd)
        denom = (self.v.sqrt() / (1 - b2 ** self.t).sqrt()).add_(ADAM_EPS)
        p.sub_(self.lr / (1 - b1 ** self.t) * self.m / denom)

    def keep(self, idx: torch.Tensor):
        """Keep the state of members ``idx`` only (when members leave the ensemble)."""
        self.lr, self.wd = self.lr[idx], self.wd[idx]
        self.m, self.v = self.m[idx].contiguous(), self.v[idx].contiguous()


# ----------------------------------------------------------------------------- the ensemble's layout

class _Setup:
    """What does not change during training: the data on the device, every member's kept
    timepoints, training pool (indices into ``data``) and validation cells, the models (one per
    member, or one per ``joint`` key) and their initial weights.

    ``marginals`` is one ``Marginals`` or a list (joint training); timepoints are numbered
    globally, dataset after dataset (``tp_off``), so a member's kept list indexes ``times``."""

    def __init__(self, marginals, members: list, device: torch.device, embed: bool = False):
        from .train import time_unit

        sets = list(marginals) if isinstance(marginals, (list, tuple)) else [marginals]
        hp0 = members[0].hp
        self.members, self.device, self.sets = members, device, sets
        self.embed = len(sets) if embed else 0  # one-hot dataset inputs of the MLP
        self.dtype = torch.float32
        self.D = sets[0].dim
        self.B = hp0["batch_size"]
        self.tp_off = np.concatenate([[0], np.cumsum([len(m) for m in sets])]).tolist()
        self.times = [float(t) for m in sets for t in m.times]
        self.data_list = [d for m in sets for d in m.data]
        span = max(self.times) - min(self.times)
        self.unit = time_unit(sorted(set(self.times)))
        self.t_offset, self.t_scale = min(self.times), (span if span > 0 else 1.0)
        sizes = [len(d) for d in self.data_list]
        tp_start = np.concatenate([[0], np.cumsum(sizes)])
        self.data = torch.as_tensor(np.concatenate(self.data_list), dtype=self.dtype, device=device)
        self.kinetic, self.backend = hp0["kinetic"], hp0["backend"]
        self.shapes = layer_shapes(self.D + self.embed, hp0["width"], hp0["depth"],
                                   n_outputs(self.D, hp0["parameterization"], hp0["num_const_dims"]))
        self.grid = np.zeros(0)
        if self.kinetic == "grid":
            from .train import GRID_STEP

            n = int(math.floor(span / (GRID_STEP * self.unit) + 1e-9)) + 1
            self.grid = min(self.times) + GRID_STEP * self.unit * np.arange(n, dtype=np.float64)
        pools, self.kept, self.val, self.pool_at, kept_cells = [], [], [], [], []
        n_pool = 0
        for mem in members:
            hp, off = mem.hp, self.tp_off[mem.dataset]
            rng = np.random.default_rng(mem.seed if mem.dataset == 0 else [mem.seed, mem.dataset])
            kept = [off + i for i in range(len(sets[mem.dataset])) if i != mem.holdout and i not in mem.exclude]
            if len(kept) < 2:
                raise ValueError("training needs at least two kept timepoints")
            if self.B < len(kept) - 1:
                raise ValueError(f"batch_size must be at least the number of source timepoints ({len(kept) - 1}), "
                                 f"so that each gets a cell per step; got {self.B}")
            val, at = {}, {}
            for i in kept:  # each kept timepoint split into training and validation cells, fixed for the run
                perm = rng.permutation(sizes[i])
                n_val = int(round(hp["val_fraction"] * len(perm))) if len(perm) > 1 else 0
                if n_val >= len(perm):
                    raise ValueError(f"val_fraction={hp['val_fraction']} leaves no training cell at t = "
                                     f"{self.times[i]:g} ({len(perm)} cells); use a smaller val_fraction")
                val[i] = self.data_list[i][perm[:min(n_val, hp["max_val_cells"])]]  # held back; scored on a subsample
                pools.append(tp_start[i] + perm[n_val:])
                at[i] = (n_pool, len(perm) - n_val)
                n_pool += len(perm) - n_val
            self.kept.append(kept)
            self.val.append(val)
            self.pool_at.append(at)
            kept_cells.append(sum(sizes[i] for i in kept))
        self.pool = torch.as_tensor(np.concatenate(pools), dtype=torch.int64, device=device)
        # Models: one per member, or one per joint key (its members' losses are summed).
        keys = {}
        self.model_of = [keys.setdefault(("joint", m.joint) if m.joint is not None else ("member", e), len(keys))
                         for e, m in enumerate(members)]
        self.model_members = [[e for e, mi in enumerate(self.model_of) if mi == k] for k in range(len(keys))]
        flats, self.steps = [], []
        for mm in self.model_members:
            first = members[mm[0]]
            torch.manual_seed(first.seed)  # initial weights from the (first) member's seed
            flats.append(pack(self._new_model(first.hp)))
            # an epoch: as many steps as draw each kept cell once on average (B cells per member per step)
            self.steps.append(max(1, math.ceil(sum(kept_cells[e] for e in mm) / (len(mm) * self.B))))
        self.flat0 = torch.stack(flats).to(device)
        self.keys = [member_key(m.seed ^ (m.dataset << 48)) for m in members]

    def _new_model(self, hp: dict) -> CellMNN:
        return CellMNN(self.D, hp["width"], hp["depth"], hp["init_scale"], hp["parameterization"], hp["num_const_dims"],
                       hp["backend"], time_offset=self.t_offset, time_scale=self.t_scale, time_unit=self.unit,
                       n_datasets=self.embed)

    def model(self, mi: int, flat: torch.Tensor) -> CellMNN:
        """Model ``mi`` as a CellMNN with the weights ``flat`` (P,)."""
        hp = self.members[self.model_members[mi][0]].hp
        return unpack(self._new_model(hp).to(flat.device), flat.detach())

    def members_of(self, models: list) -> list:
        """The members of ``models``, model after model (the layout's order)."""
        return [e for mi in models for e in self.model_members[mi]]


class _Layout:
    """The index tensors of one training step for the members ``active`` (indices into the
    setup's members), built once and reused by every step until a member leaves."""

    def __init__(self, s: _Setup, active: list, rank: int = 0, world: int = 1):
        dev, B, f32 = s.device, s.B, s.dtype
        E = self.E = len(active)
        self.active = list(active)
        kmax = max(len(s.kept[e]) for e in active)
        self.kmax = kmax
        T = kmax + len(s.grid)
        keys, slots, starts, lens, t0, dt = [], [], [], [], [], []
        n_kept, vw, hp_sigma = [], [], []
        tkeys, tslots, tstarts, tlens = [], [], [], []
        term_rows, x_off, terms_y, term_w, term_member, x_scale, y_scale = [], [0], [], [], [], [], []
        y_seg = 0  # y segments: one per (member, target) of B observed cells, in the order of the target slots
        for el, e in enumerate(active):
            hp, kept = s.members[e].hp, s.kept[e]
            srcs = kept[:-1]
            n_src = len(srcs)
            per_src = [B // n_src + (k < B % n_src) for k in range(n_src)]
            times_k = np.array([s.times[i] for i in kept] + [s.times[kept[-1]]] * (kmax - len(kept)))
            j = 0
            for src, n in zip(srcs, per_src):
                col = kept.index(src)
                a, ln = s.pool_at[e][src]
                keys += [s.keys[e]] * n
                slots += list(range(j, j + n))
                starts += [a] * n
                lens += [ln] * n
                t0 += [s.times[src]] * n
                d = np.concatenate([times_k - s.times[src], s.grid - s.times[src]])
                d[len(kept):kmax] = 0.0  # padding columns: decoded but never used
                dt.append(np.broadcast_to(d, (n, T)))
                j += n
                for r, f in enumerate(kept[col + 1:], start=1):
                    rows = (el * B + (j - n) + np.arange(n)) * T + col + r
                    term_rows.append(rows)
                    x_off.append(x_off[-1] + n)
                    terms_y.append(y_seg + kept.index(f) - 1)
                    term_w.append(hp["gamma"] ** (r - 1))
                    term_member.append(el)
                    x_scale.append(np.full(n, 1.0 / hp["sigma"]))
            for r, f in enumerate(kept[1:]):
                a, ln = s.pool_at[e][f]
                tkeys += [s.keys[e]] * B
                tslots += list(range(B + r * B, B + (r + 1) * B))
                tstarts += [a] * B
                tlens += [ln] * B
                y_scale.append(np.full(B, 1.0 / hp["sigma"]))
            y_seg += len(kept) - 1
            n_kept.append(len(kept))
            vw.append(hp["velocity_weight"])
            hp_sigma.append(hp["sigma"])
        y_off = [B * k for k in range(y_seg + 1)]
        L = lambda v, dtype=torch.int64: torch.as_tensor(np.asarray(v), dtype=dtype, device=dev)  # noqa: E731
        # Data parallel: this rank decodes the slots [lo, hi) of every member's B source slots
        # (all of them in one process); the decoded points are gathered before the MMD.
        self.rank, self.world = rank, world
        self.counts = [(B * (r + 1)) // world - (B * r) // world for r in range(world)]
        lo = (B * rank) // world
        own = (np.arange(E)[:, None] * B + lo + np.arange(self.counts[rank])).ravel()
        sel = np.concatenate([own, E * B + np.arange(len(tkeys))])
        self.n_src = len(own)  # this rank's source cells; then every member's target cells
        self.u = slot_hash(L(np.asarray(keys + tkeys)[sel]), L(np.asarray(slots + tslots)[sel]))
        self.starts = L(np.asarray(starts + tstarts)[sel])
        self.lens = L(np.asarray(lens + tlens)[sel])
        t0 = np.asarray(t0)
        t_in = ((t0 - s.t_offset) / s.t_scale)[:, None]  # float64 first (offsets of large times stay exact)
        if s.embed:  # the one-hot code of each slot's dataset
            t_in = np.concatenate([t_in, np.eye(s.embed)[np.repeat([s.members[e].dataset for e in active], B)]], 1)
        self.t_in = L(t_in[own], f32)  # the MLP's inputs after x: (n_src, 1 + embed)
        self.models = list(dict.fromkeys(s.model_of[e] for e in active))  # the active models, in order
        self.shared = len(self.models) < E
        self.member_model = L([self.models.index(s.model_of[e]) for e in active])
        self.dt = L(np.concatenate(dt)[own], f32)
        self.T = T
        self.term_rows = L(np.concatenate(term_rows))
        self.x_off, self.y_off = x_off, y_off
        self.terms_x, self.terms_y = list(range(len(terms_y))), terms_y
        self.term_w = L(term_w, f32)
        self.term_member = L(term_member)
        same_sigma = len(set(hp_sigma)) == 1
        self.sigma = hp_sigma[0] if same_sigma else 1.0
        self.x_scale = None if same_sigma else L(np.concatenate(x_scale), f32)[:, None]
        self.y_scale = None if same_sigma else L(np.concatenate(y_scale), f32)[:, None]
        self.vw = L(vw, f32)
        mask = np.zeros((E, kmax))
        for el, nk in enumerate(n_kept):
            mask[el, :nk] = 1.0 / (B * nk * s.D)  # the kinetic mean over cells x kept times x coordinates
        self.kin_mask = L(mask, f32)
        counts = np.bincount(term_member, weights=np.diff(x_off), minlength=E)
        self.point_member = L(np.repeat(term_member, np.diff(x_off)))
        self.inv_points = L(1.0 / counts, f32)


# ----------------------------------------------------------------------------- the step

def step_losses(s: _Setup, L: _Layout, flat: torch.Tensor, step: torch.Tensor, check: bool = False):
    """Per-member loss and MMD part (E,) of the batch of ``step`` for the members of ``L``;
    ``flat``: (models, P) weights of ``L.models``.

    Everything stays on the device; ``check=True`` validates the decoded operators (a host
    synchronisation: used once, before training)."""
    E, B, D = L.E, s.B, s.D
    hp0 = s.members[L.active[0]].hp
    rows = s.pool.index_select(0, L.starts + draw(L.u, step, L.lens))
    cells = s.data.index_select(0, rows)
    x0, ys = cells[:L.n_src], cells[L.n_src:]
    if L.shared:  # members of one joint model use its weights
        flat = flat.index_select(0, L.member_model)
    h = stacked_mlp(flat, s.shapes, torch.cat([x0, L.t_in], 1).view(E, L.n_src // E, -1))
    A, pen = outputs_to_operator(h.reshape(L.n_src, -1), D, hp0["parameterization"], hp0["num_const_dims"], s.unit,
                                 check_errors=check)
    X, V = local_linear_step(A, x0, L.dt, backend=s.backend, check_finite=check)
    if L.world > 1:  # every rank evaluates the loss on all slots' decoded points
        X, V, pen = _gather_slots(X, V, pen, L)
    xs = X.reshape(-1, D).index_select(0, L.term_rows)
    if L.x_scale is not None:  # MMD with sigma on points p equals MMD with sigma 1 on p / sigma
        xs, ys = xs * L.x_scale, ys * L.y_scale
    _, per_term = laplace_mmd_grouped(xs, L.x_off, ys, L.y_off, L.terms_x, L.terms_y, None, L.sigma,
                                      backend=s.backend, check_finite=check)
    mmd = torch.zeros(E, dtype=s.dtype, device=s.device).index_add(0, L.term_member, per_term * L.term_w)
    if s.kinetic == "kept_times":  # mean of V^2 over cells x every kept time x coordinates
        v2 = (V[:, :L.kmax] * s.unit).pow(2).sum(-1).view(E, B, L.kmax).sum(1)
        kin = (v2 * L.kin_mask).sum(1)
    elif s.kinetic == "grid":
        kin = (V[:, L.kmax:] * s.unit).pow(2).reshape(E, -1).mean(1)
    else:  # "future": mean over cells x later kept times of ||V||^2
        vs = V.reshape(-1, D).index_select(0, L.term_rows)
        kin = torch.zeros(E, dtype=s.dtype, device=s.device).index_add(
            0, L.point_member, (vs * s.unit).pow(2).sum(-1)) * L.inv_points
    loss = mmd + L.vw * kin
    if pen is not None:
        loss = loss + pen.view(E, B).mean(1)
    return loss, mmd


# ----------------------------------------------------------------------------- data parallel

def world() -> tuple:
    """(rank, world size) of the default ``torch.distributed`` process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherSlots(torch.autograd.Function):
    """Gather every rank's (E, n_r, F) slots into (E, sum n_r, F), in rank order.

    Backward returns this rank's slice of the incoming gradient, with no communication: every
    rank computes the same loss from the gathered tensor, so that slice is the whole derivative
    with respect to this rank's input (the parameter gradients are then summed over ranks)."""

    @staticmethod
    def forward(ctx, x, counts):
        import torch.distributed as dist

        rank = dist.get_rank()
        E, n, F = x.shape
        buf = x.new_zeros(E, max(counts), F)
        buf[:, :n] = x
        parts = [torch.empty_like(buf) for _ in counts]
        dist.all_gather(parts, buf)
        ctx.lo, ctx.n = sum(counts[:rank]), n
        return torch.cat([p[:, :c] for p, c in zip(parts, counts)], 1)

    @staticmethod
    def backward(ctx, g):
        return g[:, ctx.lo:ctx.lo + ctx.n], None


def _gather_slots(X, V, pen, L: _Layout):
    """Decoded points X, V (E * n_r, T, D) and penalties (E * n_r,) of this rank's slots, gathered
    from every rank into the single-process layout (E * B, T, D), in one collective."""
    E, T, D = L.E, X.shape[1], X.shape[2]
    n = L.n_src // E
    parts = [X.reshape(E, n, T * D), V.reshape(E, n, T * D)] + ([] if pen is None else [pen.reshape(E, n, 1)])
    g = _AllGatherSlots.apply(torch.cat(parts, -1), L.counts)
    X, V = g[..., :T * D].reshape(-1, T, D), g[..., T * D:2 * T * D].reshape(-1, T, D)
    return X, V, None if pen is None else g[..., -1].reshape(-1)


class _Runner:
    """Training steps for the current members: eager, or replays of a captured CUDA graph.  In a
    ``torch.distributed`` process group the parameter gradients are summed over ranks (one
    all-reduce per step), so every rank takes the same AdamW step."""

    def __init__(self, s: _Setup, flat: torch.Tensor, use_graph: bool):
        self.rank, self.world = world()
        self.s, self.use_graph, self.graph, self.warm = s, use_graph, None, 0
        self.step_t = torch.zeros((), dtype=torch.int64, device=s.device)
        hps = [s.members[mm[0]].hp for mm in s.model_members]
        lr = torch.tensor([hp["lr"] for hp in hps], dtype=s.dtype, device=s.device)
        wd = torch.tensor([hp["weight_decay"] for hp in hps], dtype=s.dtype, device=s.device)
        self.flat = flat.detach().clone().requires_grad_(True)
        self.opt = AdamW(self.flat, lr, wd)
        self.layout = _Layout(s, s.members_of(range(len(hps))), self.rank, self.world)

    def _body(self):
        L = self.layout
        loss, _ = step_losses(self.s, L, self.flat, self.step_t)
        if L.shared:  # a joint model's loss: the sum of its members'
            loss = loss.new_zeros(len(L.models)).index_add(0, L.member_model, loss)
        loss.sum().backward()  # models are independent: each gets the gradient of its own loss
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(self.flat.grad)
        self.opt.step()
        self.step_t.add_(1)
        return loss.detach()

    def step(self) -> torch.Tensor:
        """One training step of every member; the (E,) losses, on the device.  In graph mode the
        first steps after a (re)layout run eagerly on a side stream (warm-up), then one step is
        captured and every step replays it."""
        if self.use_graph and self.graph is None:
            if self.warm < 3:
                self.warm += 1
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self.flat.grad = None
                    loss = self._body()
                torch.cuda.current_stream().wait_stream(side)
                return loss
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            return self.static_loss.clone()
        self.flat.grad = None
        return self._body()

    def _capture(self):
        """Capture one step in a CUDA graph; on failure, warn and train eagerly."""
        try:
            self.flat.grad = None
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.static_loss = self._body()
            self.graph = graph
        except Exception as exc:  # noqa: BLE001 - any capture failure: train eagerly instead
            warnings.warn(f"cellmnn: CUDA graph capture failed ({type(exc).__name__}: {exc}); training eagerly")
            self.use_graph, self.graph = False, None

    def keep(self, keep_local: list):
        """Go on with the models at local positions ``keep_local`` only."""
        idx = torch.as_tensor(keep_local, dtype=torch.int64, device=self.s.device)
        self.flat = self.flat.detach()[idx].clone().requires_grad_(True)
        self.opt.keep(idx)
        self.opt.param = self.flat
        models = [self.layout.models[k] for k in keep_local]
        self.layout = _Layout(self.s, self.s.members_of(models), self.rank, self.world)
        self.graph, self.warm = None, 0  # shapes changed: capture again

    def state(self) -> dict:
        return {"active": list(self.layout.models), "flat": self.flat.detach().cpu(), "m": self.opt.m.cpu(),
                "v": self.opt.v.cpu(), "t": self.opt.t.cpu(), "step": self.step_t.cpu()}

    def load(self, st: dict):
        """Continue from ``state()`` (a checkpoint): the models still training, weights, moments, steps."""
        self.keep(list(st["active"]))  # from the full ensemble: local positions are model indices
        dev = self.s.device
        self.flat = st["flat"].to(dev).clone().requires_grad_(True)
        self.opt.param = self.flat
        self.opt.m, self.opt.v, self.opt.t = st["m"].to(dev).clone(), st["v"].to(dev).clone(), st["t"].to(dev).clone()
        self.step_t = st["step"].to(dev).clone()


# ----------------------------------------------------------------------------- training

def check_members(members: list) -> None:
    """Members of one ensemble must share the hyperparameters in ``SHARED``; members of one joint
    model every hyperparameter and the seed, each on its own dataset."""
    if not members:
        raise ValueError("an ensemble needs at least one member")
    joint = {}
    for m in members:
        if m.joint is not None:
            joint.setdefault(m.joint, []).append(m)
    for key, ms in joint.items():
        diff = sorted(k for k in ms[0].hp if k != "verbose" and any(repr(o.hp[k]) != repr(ms[0].hp[k]) for o in ms))
        if diff or len({o.seed for o in ms}) > 1:
            raise ValueError(f"the time courses of joint model {key!r} must share the seed and every "
                             f"hyperparameter; {diff or ['seed']} differ")
        if len({o.dataset for o in ms}) < len(ms):
            raise ValueError(f"joint model {key!r} lists a dataset twice")
    first = members[0].hp
    for m in members[1:]:
        diff = [k for k in SHARED if m.hp[k] != first[k]]
        if diff:
            raise ValueError(f"members of one ensemble must share {diff} (member with seed {m.seed}, holdout "
                             f"{m.holdout} differs); train them in separate ensembles")


def groups(members: list) -> list:
    """Indices of ``members`` grouped by the hyperparameters they must share."""
    out = {}
    for i, m in enumerate(members):
        out.setdefault(tuple(repr(m.hp[k]) for k in SHARED), []).append(i)
    return list(out.values())


def train(marginals, members: list, desc: str | None = None, checkpoint=None, embed: bool = False) -> list:
    """Train ``members`` (checked ``Member``s) on ``marginals`` (one ``Marginals``, or a list for
    joint training); returns one CellMNN per member (its model's best validation weights, with
    ``.fit_info`` and ``.marginals_info``; members of one joint model share the object).  Members
    that cannot share one ensemble are trained in several.  ``embed``: joint models read a
    one-hot dataset code (``CellMNN(n_datasets=...)``).

    ``checkpoint``: a file the training state is written to at every check epoch (atomically,
    by rank 0); if it already holds the state of the same training (same data, members and
    hyperparameters) training continues from it, and gives the model an uninterrupted run gives.

    In a ``torch.distributed`` process group (e.g. under ``torchrun``) every rank must call this
    with the same arguments: each decodes its share of every batch, and the gradients are summed
    over ranks (``_Runner``)."""
    parts = groups(members)
    if checkpoint is not None and len(parts) > 1:
        raise ValueError("checkpoint: these members need several ensembles (they differ in "
                         f"{[k for k in SHARED if len({repr(m.hp[k]) for m in members}) > 1]}); checkpoints "
                         "cover one ensemble")
    models = [None] * len(members)
    for idx in parts:
        for i, m in zip(idx, _train_group(marginals, [members[i] for i in idx], desc, checkpoint, embed)):
            models[i] = m
    return models


def fingerprint(marginals, members: list) -> dict:
    """What a checkpoint must match to be continued: the data and every member's settings."""
    import hashlib

    h = hashlib.sha256()
    for m in (marginals if isinstance(marginals, (list, tuple)) else [marginals]):
        h.update(np.asarray(m.times, dtype=np.float64).tobytes())
        for d in m.data:
            h.update(np.ascontiguousarray(d, dtype=np.float64).tobytes())
    return {"data": h.hexdigest(),
            "members": [{"holdout": m.holdout, "seed": m.seed, "exclude": list(m.exclude), "dataset": m.dataset,
                         "joint": repr(m.joint),
                         "hp": {k: repr(v) for k, v in sorted(m.hp.items()) if k != "verbose"}} for m in members]}


def _check_resume(saved: dict, now: dict, path) -> None:
    if saved["data"] != now["data"]:
        raise ValueError(f"checkpoint {path} was written for other data; refusing to continue it (use another "
                         "checkpoint path)")
    if len(saved["members"]) != len(now["members"]):
        raise ValueError(f"checkpoint {path} holds {len(saved['members'])} time courses, this training "
                         f"{len(now['members'])}; refusing to continue it")
    for a, b in zip(saved["members"], now["members"]):
        diff = [k for k in ("holdout", "seed", "exclude", "dataset", "joint") if a.get(k) != b.get(k)]
        diff += sorted(k for k in set(a["hp"]) | set(b["hp"]) if a["hp"].get(k) != b["hp"].get(k))
        if diff:
            raise ValueError(f"checkpoint {path} was written with other settings ({', '.join(diff)} differ); "
                             "refusing to continue it")


def _train_group(marginals, members: list, desc, checkpoint=None, embed=False) -> list:
    from . import io
    from .train import FitInfo, _diverged, _Objective, _progress, resolve_device

    check_members(members)
    hp0 = members[0].hp
    device = resolve_device(hp0["device"])
    rank, n_ranks = world()
    use_graph = bool(hp0["cuda_graph"])
    if use_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device; device is {hp0['device']!r}")
    if use_graph and n_ranks > 1:
        raise ValueError("cuda_graph=True is for one process; train data-parallel without it")
    if hp0["batch_size"] < n_ranks:
        raise ValueError(f"batch_size ({hp0['batch_size']}) must be at least the number of processes ({n_ranks})")
    fp = saved = None
    if checkpoint is not None:
        fp = fingerprint(marginals, members)
        saved = io.load_checkpoint(checkpoint)  # None when absent; refuses foreign files
        if saved is not None:
            _check_resume(saved["fingerprint"], fp, checkpoint)
        elif rank == 0:
            io.check_output(checkpoint, io.CHECKPOINT_KIND, "checkpoint")
    s = _Setup(marginals, members, device, embed)
    M = len(s.model_members)
    runner = _Runner(s, s.flat0, use_graph)
    with torch.no_grad():  # the untrained models must decode: checked once, before training
        try:
            step_losses(s, runner.layout, runner.flat, runner.step_t, check=True)
        except (ValueError, torch.linalg.LinAlgError) as exc:
            scales = sorted({m.hp["init_scale"] for m in members})
            raise ValueError(f"the untrained model is out of range ({exc}); try a smaller init_scale (now "
                             f"{scales[0] if len(scales) == 1 else scales})") from None

    firsts = [members[mm[0]] for mm in s.model_members]  # a model's seed and hyperparameters
    hps = [f.hp for f in firsts]
    infos = [FitInfo(f.holdout if len(mm) == 1 else tuple(members[e].holdout for e in mm), f.seed, f.hp)
             for f, mm in zip(firsts, s.model_members)]
    best = [s.flat0[mi].clone() for mi in range(M)]
    bad = [0] * M
    step_loss = [[] for _ in range(M)]  # host copies of the losses of each model's unfinished epoch
    n, done = 0, False
    if saved is not None:
        runner.load(saved["runner"])
        n, done, bad = saved["n"], saved["done"], list(saved["bad"])
        best = [b.to(device) for b in saved["best"]]
        step_loss = [v.tolist() for v in saved["step_loss"]]
        for info, d in zip(infos, saved["infos"]):
            info.epochs, info.best_epoch, info.best_score = d["epochs"], d["best_epoch"], d["best_score"]
            info.history = [tuple(r) for r in d["history"]]

    def save_state():
        if checkpoint is not None and rank == 0:
            io.save_checkpoint({"fingerprint": fp, "n": n, "done": done, "bad": bad, "runner": runner.state(),
                                "best": [b.detach().cpu() for b in best],
                                "step_loss": [torch.tensor(v, dtype=torch.float64) for v in step_loss],
                                "infos": [{"epochs": i.epochs, "best_epoch": i.best_epoch, "best_score": i.best_score,
                                           "history": [list(r) for r in i.history]} for i in infos]}, checkpoint)

    objectives = [_Objective(s.times, s.kept[e], m.hp["gamma"], m.hp["sigma"], m.hp["velocity_weight"], s.backend,
                             s.kinetic, s.unit) for e, m in enumerate(members)]
    max_epochs = [hp["max_epochs"] for hp in hps]
    check_every = hp0["check_every"]
    verbose = rank == 0 and any(m.hp["verbose"] for m in members)
    if desc is None and M == 1 and len(members) == 1:
        progress = _progress(max_epochs[0], verbose, members[0].holdout, members[0].seed)
    else:
        from tqdm.auto import tqdm

        progress = tqdm(total=max(max_epochs), desc=desc or (f"Cell-MNN ensemble of {M}" if M > 1 else "Cell-MNN"),
                        disable=not (rank == 0 and desc or verbose), leave=False, unit="epoch")

    def member_score(e, model):
        hp, mem = members[e].hp, members[e]
        dataset = mem.dataset if s.embed else None
        if hp["select_on_holdout"]:
            k = s.tp_off[mem.dataset] + mem.holdout
            pred = model.predict(torch.as_tensor(s.data_list[k - 1], dtype=s.dtype, device=device),
                                 s.times[k - 1], s.times[k], dataset=dataset)
            return float(laplace_mmd(pred, torch.as_tensor(s.data_list[k], dtype=s.dtype, device=device),
                                     hp["sigma"], backend=hp["backend"]))
        val, obj = s.val[e], objectives[e]
        if any(len(val[i]) == 0 for i in s.kept[e]):
            return float("nan")
        _, sc = obj(model, {i: val[i] for i in obj.sources}, {i: val[i] for i in obj.targets}, s.dtype, device,
                    dataset=dataset)
        return float(sc)

    def score(mi, flat_m):
        """A model's validation score: the sum over its time courses (NaN if one has no validation cells)."""
        model = s.model(mi, flat_m)
        model.eval()
        with torch.no_grad():
            return float(sum(member_score(e, model) for e in s.model_members[mi]))

    buffer = []
    try:
        while not done and runner.layout.models:
            buffer.append(runner.step())
            n += 1
            active = runner.layout.models
            checking = []
            for mi in active:
                if n % s.steps[mi] == 0:
                    ep = n // s.steps[mi]
                    if ep % check_every == 0 or ep == max_epochs[mi]:
                        checking.append(mi)
            if not checking:
                continue
            # A check epoch: read the losses since the last read (one host synchronisation).
            losses = torch.stack(buffer).cpu().numpy()
            buffer = []
            for ml, mi in enumerate(active):
                step_loss[mi].extend(losses[:, ml].tolist())
                info, per = infos[mi], s.steps[mi]
                while len(step_loss[mi]) >= per:
                    chunk, step_loss[mi] = step_loss[mi][:per], step_loss[mi][per:]
                    info.epochs += 1
                    if not all(math.isfinite(v) for v in chunk):
                        raise _with_member(_diverged(info.epochs, hps[mi], f"loss {np.sum(chunk)}"), firsts[mi])
                    info.history.append((info.epochs, float(np.mean(chunk)), None))
            scores = []
            for mi in checking:
                try:
                    scores.append(score(mi, runner.flat[active.index(mi)]))
                except (ValueError, torch.linalg.LinAlgError) as exc:
                    raise _with_member(_diverged(infos[mi].epochs, hps[mi], str(exc)), firsts[mi]) from None
            if n_ranks > 1:  # the ranks hold the same weights; rank 0's scores decide for all
                import torch.distributed as dist

                sc_t = torch.tensor(scores, dtype=torch.float64, device=device)
                dist.broadcast(sc_t, 0)
                scores = sc_t.tolist()
            leaving = []
            for mi, sc in zip(checking, scores):
                ml = active.index(mi)
                info = infos[mi]
                ep, loss_mean, _ = info.history[-1]
                info.history[-1] = (ep, loss_mean, sc)
                if math.isnan(sc):  # no validation cells: keep the last model
                    best[mi], info.best_epoch = runner.flat[ml].detach().clone(), ep
                elif sc < info.best_score:
                    info.best_score, info.best_epoch, bad[mi] = sc, ep, 0
                    best[mi] = runner.flat[ml].detach().clone()
                else:
                    bad[mi] += 1
                if bad[mi] >= hps[mi]["patience"] or ep >= max_epochs[mi]:
                    leaving.append(mi)
            progress.n = max(infos[mi].epochs for mi in active)
            if M == 1:
                progress.set_postfix(loss=f"{infos[0].history[-1][1]:.4f}", val=f"{infos[0].best_score:.4f}")
            else:
                progress.set_postfix(training=f"{len(active) - len(leaving)}/{M}")
            progress.refresh()
            if leaving:
                keep = [ml for ml, mi in enumerate(active) if mi not in leaving]
                if keep:
                    runner.keep(keep)
                else:
                    done = True
            save_state()
        if not done:
            done = True
            save_state()
    finally:
        progress.close()
    out = []
    for mi, mm in enumerate(s.model_members):
        model = s.model(mi, best[mi])
        model.eval()
        model.fit_info = infos[mi]
        model.marginals_info = _marginals_info(s, [members[e].dataset for e in mm])
        out.append(model)
    return [out[s.model_of[e]] for e in range(len(members))]


def _marginals_info(s: _Setup, datasets: list) -> dict:
    """What a model records about its data: times, transform and source (per dataset if joint)."""
    sets = [s.sets[d] for d in datasets]
    if len(sets) == 1:
        m = sets[0]
        return {"times": [float(t) for t in m.times], "transform": m.transform.to_dict(), "source": m.source}
    return {"times": sorted({float(t) for m in sets for t in m.times}), "transform": sets[0].transform.to_dict(),
            "source": " + ".join(m.source for m in sets),
            "datasets": [{"index": d, "times": [float(t) for t in m.times], "source": m.source}
                         for d, m in zip(datasets, sets)]}


def _with_member(exc: Exception, member: Member) -> Exception:
    label = f"holdout {member.holdout}, seed {member.seed}"
    return type(exc)(f"{exc} [model with {label}]")
