"""What a training step computes on: the members of an ensemble, their data on the device, and the
index tensors of one step.

* ``Member`` — one time course of an ensemble: a dataset without some timepoints, a seed and its
  ``HParams``; members with one ``joint`` key are one model trained on all their courses.
* ``Setup`` — what does not change during training: the data on the device, every member's kept
  timepoints, training pool and validation cells, the models and their initial weights.
* ``Layout`` — the index tensors of one step for the members still training (the batch's slots,
  decode offsets, MLP time inputs) and their ``Objective``, built once and reused by every step
  until a member leaves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..model.network import CellMNN, DecoderSpec
from ..model.stacked import layer_shapes, pack, unpack
from .hparams import HParams, time_unit
from .objective import Course, Objective, expected_self_term, kinetic_grid
from .sampling import member_key, slot_hash


@dataclass(frozen=True)
class Member:
    """One training time course of an ensemble: dataset ``dataset`` (an index into the list of
    marginals) without timepoints ``holdout`` and ``exclude``, trained with ``seed`` and ``hp``.
    Members with the same ``joint`` key (not None) are one model trained on all their time
    courses (joint training: the loss is the sum of theirs); otherwise each member is a model."""
    holdout: int | None
    seed: int
    hp: HParams = field(hash=False, compare=False)
    exclude: tuple = ()
    dataset: int = 0
    joint: object = None


class Setup:
    """What does not change during training: the data on the device, every member's kept
    timepoints, training pool (indices into ``data``) and validation cells, the models (one per
    member, or one per ``joint`` key) and their initial weights.

    ``marginals`` is one ``Marginals`` or a list (joint training); timepoints are numbered
    globally, dataset after dataset (``tp_off``), so a member's kept list indexes ``times``."""

    def __init__(self, marginals, members: list, device: torch.device, embed: bool = False):
        sets = list(marginals) if isinstance(marginals, (list, tuple)) else [marginals]
        hp0 = members[0].hp
        self.members, self.device, self.sets = members, device, sets
        self.embed = len(sets) if embed else 0  # one-hot dataset inputs of the MLP
        self.dtype = torch.float32
        self.D = sets[0].dim
        self.B = hp0.batch_size
        self.tp_off = np.concatenate([[0], np.cumsum([len(m) for m in sets])]).tolist()
        self.times = [float(t) for m in sets for t in m.times]
        self.data_list = [d for m in sets for d in m.data]
        span = max(self.times) - min(self.times)
        self.unit = time_unit(sorted(set(self.times)))
        self.t_offset, self.t_scale = min(self.times), (span if span > 0 else 1.0)
        self.data = torch.as_tensor(np.concatenate(self.data_list), dtype=self.dtype, device=device)
        self.kinetic, self.backend = hp0.kinetic, hp0.backend
        self.decoder = DecoderSpec(self.D, hp0.parameterization, hp0.num_const_dims, hp0.affine, hp0.noise,
                                   hp0.piece_length, hp0.rate_bound)
        self.shapes = layer_shapes(self.D + self.embed, hp0.width, hp0.depth, self.decoder.n_outputs)
        self.grid = kinetic_grid(self.times, self.kinetic, self.unit)
        self._self_terms: dict = {}
        self._split(members)
        self._models(members)

    def _split(self, members: list) -> None:
        """Every member's kept timepoints, each split into training pool and validation cells."""
        sizes = [len(d) for d in self.data_list]
        tp_start = np.concatenate([[0], np.cumsum(sizes)])
        pools, self.kept, self.val, self.pool_at, self.kept_cells = [], [], [], [], []
        n_pool = 0
        for mem in members:
            hp, off = mem.hp, self.tp_off[mem.dataset]
            rng = np.random.default_rng(mem.seed if mem.dataset == 0 else [mem.seed, mem.dataset])
            kept = [off + i for i in range(len(self.sets[mem.dataset])) if i != mem.holdout and i not in mem.exclude]
            if len(kept) < 2:
                raise ValueError("training needs at least two kept timepoints")
            if self.B < len(kept) - 1:
                raise ValueError(f"batch_size must be at least the number of source timepoints ({len(kept) - 1}), "
                                 f"so that each gets a cell per step; got {self.B}")
            val, at = {}, {}
            for i in kept:  # each kept timepoint split into training and validation cells, fixed for the run
                perm = rng.permutation(sizes[i])
                n_val = int(round(hp.val_fraction * len(perm))) if len(perm) > 1 else 0
                if n_val >= len(perm):
                    raise ValueError(f"val_fraction={hp.val_fraction} leaves no training cell at t = "
                                     f"{self.times[i]:g} ({len(perm)} cells); use a smaller val_fraction")
                val[i] = self.data_list[i][perm[:min(n_val, hp.max_val_cells)]]  # held back; scored on a subsample
                pools.append(tp_start[i] + perm[n_val:])
                at[i] = (n_pool, len(perm) - n_val)
                n_pool += len(perm) - n_val
            self.kept.append(kept)
            self.val.append(val)
            self.pool_at.append(at)
            self.kept_cells.append(sum(sizes[i] for i in kept))
        self.pool = torch.as_tensor(np.concatenate(pools), dtype=torch.int64, device=self.device)

    def _models(self, members: list) -> None:
        """One model per member, or per joint key (its members' losses are summed); initial weights
        from the (first) member's seed; an epoch's steps draw each kept cell once on average."""
        keys = {}
        self.model_of = [keys.setdefault(("joint", m.joint) if m.joint is not None else ("member", e), len(keys))
                         for e, m in enumerate(members)]
        self.model_members = [[e for e, mi in enumerate(self.model_of) if mi == k] for k in range(len(keys))]
        flats, self.steps = [], []
        for mm in self.model_members:
            first = members[mm[0]]
            torch.manual_seed(first.seed)
            flats.append(pack(self._new_model(first.hp)))
            self.steps.append(max(1, math.ceil(sum(self.kept_cells[e] for e in mm) / (len(mm) * self.B))))
        self.flat0 = torch.stack(flats).to(self.device)
        self.keys = [member_key(m.seed ^ (m.dataset << 48)) for m in members]

    def _new_model(self, hp: HParams) -> CellMNN:
        return CellMNN(self.D, hp.width, hp.depth, hp.init_scale, hp.parameterization, hp.num_const_dims,
                       hp.backend, time_offset=self.t_offset, time_scale=self.t_scale, time_unit=self.unit,
                       n_datasets=self.embed, **self.decoder.options())

    def model(self, mi: int, flat: torch.Tensor) -> CellMNN:
        """Model ``mi`` as a CellMNN with the weights ``flat`` (P,)."""
        hp = self.members[self.model_members[mi][0]].hp
        return unpack(self._new_model(hp).to(flat.device), flat.detach())

    def self_term(self, e: int, i: int) -> float:
        """The expected mean k(Y, Y) of member e's B observed cells at timepoint i, drawn from its
        training pool (``expected_self_term``); computed once."""
        key = (e, i)
        if key not in self._self_terms:
            a, n = self.pool_at[e][i]
            cells = self.data.index_select(0, self.pool[a:a + n])
            self._self_terms[key] = expected_self_term(cells, self.B, self.members[e].hp.sigma)
        return self._self_terms[key]

    def members_of(self, models) -> list:
        """The members of ``models``, model after model (the layout's order)."""
        return [e for mi in models for e in self.model_members[mi]]

    def validation(self, e: int):
        """Member e's validation cells as (objective, source cells, observed cells), or None when a
        kept timepoint has none (then there is nothing to score)."""
        val, kept, hp = self.val[e], self.kept[e], self.members[e].hp
        if any(len(val[i]) == 0 for i in kept):
            return None
        course = Course(tuple(kept), tuple(len(val[i]) for i in kept[:-1]), tuple(len(val[i]) for i in kept[1:]),
                        hp.gamma, hp.sigma, hp.velocity_weight)
        obj = Objective([course], self.times, self.D, self.kinetic, self.unit, self.backend, self.grid)
        cells = lambda ks: torch.as_tensor(np.concatenate([val[i] for i in ks]), dtype=self.dtype,  # noqa: E731
                                           device=self.device)
        return obj, cells(kept[:-1]), cells(kept[1:])


class Layout:
    """The index tensors of one training step for the members ``active`` (indices into the
    setup's members), built once and reused by every step until a member leaves.

    Slots: every member's B source slots (split over its sources), then every member's B observed
    slots per target; a slot's cell at a step is drawn by ``sampling.draw``.  Under data
    parallelism this rank decodes source slots [lo, hi) of every member (``counts`` per rank);
    the decoded points are gathered before the objective."""

    def __init__(self, s: Setup, active: list, rank: int = 0, world: int = 1):
        B, f32 = s.B, s.dtype
        E = self.E = len(active)
        self.active = list(active)
        courses, src, obs = [], [], []
        for e in active:
            hp, kept = s.members[e].hp, s.kept[e]
            n_src = len(kept) - 1
            per_src = [B // n_src + (k < B % n_src) for k in range(n_src)]
            courses.append(Course(tuple(kept), tuple(per_src), (B,) * n_src, hp.gamma, hp.sigma, hp.velocity_weight))
            src += [(s.keys[e], *s.pool_at[e][i], n) for i, n in zip(kept[:-1], per_src)]
            obs += [(s.keys[e], *s.pool_at[e][i], B) for i in kept[1:]]
        self.objective = obj = Objective(courses, s.times, s.D, s.kinetic, s.unit, s.backend, s.grid)
        self.y_self = torch.tensor([s.self_term(e, i) for e in active for i in s.kept[e][1:]], dtype=f32,
                                   device=s.device)  # per target segment of the objective
        self.T, self.kmax = obj.T, obj.kmax
        L = lambda v, dtype=torch.int64: torch.as_tensor(np.asarray(v), dtype=dtype, device=s.device)  # noqa: E731
        self.rank, self.world = rank, world
        self.counts = [(B * (r + 1)) // world - (B * r) // world for r in range(world)]
        # Under data parallelism each process computes the MMD sums of its own source cells as queries.
        lo = (B * rank) // world
        self.x_rows = obj.query_rows(lo, lo + self.counts[rank]) if world > 1 else None
        own = (np.arange(E)[:, None] * B + (B * rank) // world + np.arange(self.counts[rank])).ravel()
        self.n_src = len(own)  # this rank's source cells; then every member's observed cells
        keys, slots, starts, lens = _slots(src, per_member=[len(s.kept[e]) - 1 for e in active], first_slot=0)
        tkeys, tslots, tstarts, tlens = _slots(obs, per_member=[len(s.kept[e]) - 1 for e in active], first_slot=B)
        sel = np.concatenate([own, E * B + np.arange(len(tkeys))])
        self.u = slot_hash(L(np.concatenate([keys, tkeys])[sel]), L(np.concatenate([slots, tslots])[sel]))
        self.u_src = self.u[:self.n_src]  # the source slots' hashes (their noise draws)
        self.starts = L(np.concatenate([starts, tstarts])[sel])
        self.lens = L(np.concatenate([lens, tlens])[sel])
        t0 = np.concatenate([obj.source_times(el) for el in range(E)])
        t_in = ((t0 - s.t_offset) / s.t_scale)[:, None]  # float64 first (offsets of large times stay exact)
        if s.embed:  # the one-hot code of each slot's dataset
            t_in = np.concatenate([t_in, np.eye(s.embed)[np.repeat([s.members[e].dataset for e in active], B)]], 1)
        self.t_in = L(t_in[own], f32)  # the MLP's inputs after x: (n_src, 1 + embed)
        self.dt = L(np.concatenate([obj.offsets(el) for el in range(E)])[own], f32)
        self.models = list(dict.fromkeys(s.model_of[e] for e in active))  # the active models, in order
        self.shared = len(self.models) < E
        self.member_model = L([self.models.index(s.model_of[e]) for e in active])


def _slots(groups: list, per_member: list, first_slot: int) -> tuple:
    """Per slot: stream key, slot number, pool start and pool length, from (key, start, length,
    n slots) groups; a member's slots are numbered from ``first_slot`` on, group after group."""
    keys, slots, starts, lens = [], [], [], []
    g = 0
    for n_groups in per_member:
        j = first_slot
        for key, start, length, n in groups[g:g + n_groups]:
            keys += [key] * n
            slots += range(j, j + n)
            starts += [start] * n
            lens += [length] * n
            j += n
        g += n_groups
    return keys, slots, starts, lens
