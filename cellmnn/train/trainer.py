"""Many Cell-MNN models trained at once, as one vectorised model (every fit runs here).

The members of an ensemble share the data and the shape of the computation (``hparams.SHARED``);
each has its own seed, held-out and excluded timepoints and every other hyperparameter.  A
member's batches, initial weights and validation split depend only on its own seed and
hyperparameters, so the same member gives the same model alone or in any ensemble (up to float
rounding of the batched products).

``Trainer`` runs one ensemble in named steps: set up (``__init__``), ``epoch`` (training steps
until some model ends a check epoch; losses stay on the device), ``check`` (losses read back once,
validation scores, early stopping; a model that stops keeps its best weights and leaves),
``checkpoint`` and ``resume``, and ``models`` (the fitted models).  ``train`` splits members into
ensembles and runs a ``Trainer`` per ensemble.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from cellmnn_kernels import laplace_mmd
from cellmnn_kernels.ops.local_linear_step.common import MAX_TRITON_D

from .. import files
from . import parallel
from .checkpoint import check_resume, fingerprint
from .hparams import SHARED, HParams, resolve_device
from .layout import Member, Setup
from .step import Runner, step_losses, world


@dataclass
class FitInfo:
    """What a fit records: the holdout (a tuple, one per dataset, for a joint model), seed and
    hyperparameters, epochs trained, the best validation score and its epoch, the history
    ((epoch, mean training loss, validation score or None) per epoch) and, with
    ``select="inner"``, the candidates' inner W1 scores."""
    holdout: int | tuple | None
    seed: int
    hparams: HParams
    epochs: int = 0
    best_epoch: int = 0
    best_score: float = float("inf")
    history: list = field(default_factory=list)
    selection: list | None = None


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
        first = ms[0].hp.to_dict()
        diff = sorted(k for k in first if k != "verbose" and any(repr(getattr(o.hp, k)) != repr(first[k]) for o in ms))
        if diff or len({o.seed for o in ms}) > 1:
            raise ValueError(f"the time courses of joint model {key!r} must share the seed and every "
                             f"hyperparameter; {diff or ['seed']} differ")
        if len({o.dataset for o in ms}) < len(ms):
            raise ValueError(f"joint model {key!r} lists a dataset twice")
    first = members[0].hp
    for m in members[1:]:
        diff = [k for k in SHARED if getattr(m.hp, k) != getattr(first, k)]
        if diff:
            raise ValueError(f"members of one ensemble must share {diff} (member with seed {m.seed}, holdout "
                             f"{m.holdout} differs); train them in separate ensembles")


def groups(members: list) -> list:
    """Indices of ``members`` grouped by the hyperparameters they must share."""
    out = {}
    for i, m in enumerate(members):
        out.setdefault(tuple(repr(getattr(m.hp, k)) for k in SHARED), []).append(i)
    return list(out.values())


def train(marginals, members: list, desc: str | None = None, checkpoint=None, embed: bool = False,
          n_jobs=None) -> list:
    """Train ``members`` (``Member``s) on ``marginals`` (one ``Marginals``, or a list for joint
    training); returns one CellMNN per member (its model's best validation weights, with
    ``.fit_info`` and ``.marginals_info``; members of one joint model share the object).  Members
    that cannot share one ensemble are trained in several.  ``embed``: joint models read a
    one-hot dataset code (``CellMNN(n_datasets=...)``).

    ``checkpoint``: a file the training state is written to at every check epoch (atomically,
    by rank 0); if it already holds the state of the same training (same data, members and
    hyperparameters) training continues from it, and gives the model an uninterrupted run gives.

    In a ``torch.distributed`` process group (e.g. under ``torchrun``) every rank must call this
    with the same arguments: each decodes its share of every batch, and the gradients are summed
    over ranks (``step.Runner``).

    ``n_jobs`` (default: the members' ``HParams.n_jobs``): on the CPU, outside a process group
    and without a checkpoint, an ensemble's models are trained in that many worker processes
    (``parallel``; -1: one per usable core)."""
    parts = groups(members)
    if checkpoint is not None and len(parts) > 1:
        raise ValueError("checkpoint: these members need several ensembles (they differ in "
                         f"{[k for k in SHARED if len({repr(getattr(m.hp, k)) for m in members}) > 1]}); "
                         "checkpoints cover one ensemble")
    models = [None] * len(members)
    for idx in parts:
        part = [members[i] for i in idx]
        k = _workers(part, checkpoint, n_jobs)
        fitted = parallel.train_in_processes(marginals, part, k, desc, embed) if k > 1 else \
            Trainer(marginals, part, desc, checkpoint, embed).run()
        for i, m in zip(idx, fitted):
            models[i] = m
    return models


def _workers(members: list, checkpoint, n_jobs) -> int:
    """How many worker processes train ``members`` (one ensemble): 1 on a GPU, in a process group
    or with a checkpoint (an explicit n_jobs > 1 with a checkpoint is an error)."""
    n_jobs = members[0].hp.n_jobs if n_jobs is None else n_jobs
    if checkpoint is not None and n_jobs not in (None, 1, -1):
        raise ValueError(f"n_jobs={n_jobs}: a checkpoint covers one process; use n_jobs=1 with checkpoint")
    if checkpoint is not None or world()[1] > 1 or resolve_device(members[0].hp.device).type != "cpu":
        return 1
    return parallel.n_workers(n_jobs, len(parallel.units(members)))


class Trainer:
    """One ensemble's training, in named steps (module docstring)."""

    def __init__(self, marginals, members: list, desc: str | None = None, checkpoint=None, embed: bool = False):
        check_members(members)
        self.members, self.hp0, self.path = members, members[0].hp, checkpoint
        self.device = resolve_device(self.hp0.device)
        self.rank, self.n_ranks = world()
        self._check_options(marginals)
        saved = self._open_checkpoint(marginals)
        self.s = s = Setup(marginals, members, self.device, embed)
        self.runner = Runner(s, s.flat0, use_graph(self.hp0, s.D, self.device, self.n_ranks))
        self._check_untrained()
        self.firsts = [members[mm[0]] for mm in s.model_members]  # a model's seed and hyperparameters
        self.infos = [FitInfo(f.holdout if len(mm) == 1 else tuple(members[e].holdout for e in mm), f.seed, f.hp)
                      for f, mm in zip(self.firsts, s.model_members)]
        self.best = [s.flat0[mi].clone() for mi in range(len(self.firsts))]
        self.bad = [0] * len(self.firsts)
        self.step_loss = [[] for _ in self.firsts]  # host copies of the losses of each model's unfinished epoch
        self.n, self.done, self.buffer = 0, False, []
        self.validation = [s.validation(e) for e in range(len(members))]
        self.progress = self._progress(desc)
        if saved is not None:
            self.resume(saved)

    # ------------------------------------------------------------------ set up

    def _check_options(self, marginals) -> None:
        hp0 = self.hp0
        if hp0.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device; device is {hp0.device!r}")
        if hp0.cuda_graph and self.n_ranks > 1:
            raise ValueError("cuda_graph=True is for one process; train data-parallel without it")
        D = (marginals[0] if isinstance(marginals, (list, tuple)) else marginals).dim
        if hp0.cuda_graph and not capturable(hp0, D):
            raise ValueError(f"cuda_graph=True cannot capture this step (backend={hp0.backend!r}, D = {D}, "
                             f"noise={hp0.noise!r}): {GRAPH_NEEDS}")
        if hp0.batch_size < self.n_ranks:
            raise ValueError(f"batch_size ({hp0.batch_size}) must be at least the number of processes "
                             f"({self.n_ranks})")

    def _open_checkpoint(self, marginals):
        """The saved state to resume from (None if none); a foreign or mismatching file is an error."""
        self.fp = saved = None
        if self.path is not None:
            self.fp = fingerprint(marginals, self.members)
            saved = files.load_checkpoint(self.path)  # None when absent; refuses foreign files
            if saved is not None:
                check_resume(saved["fingerprint"], self.fp, self.path)
            elif self.rank == 0:
                files.check_output(self.path, files.CHECKPOINT_KIND, "checkpoint")
        return saved

    def _check_untrained(self) -> None:
        """The untrained models must decode: checked once, before training."""
        with torch.no_grad():
            try:
                step_losses(self.s, self.runner.layout, self.runner.flat, self.runner.step_t, check=True)
            except (ValueError, torch.linalg.LinAlgError) as exc:
                scales = sorted({m.hp.init_scale for m in self.members})
                raise ValueError(f"the untrained model is out of range ({exc}); try a smaller init_scale (now "
                                 f"{scales[0] if len(scales) == 1 else scales})") from None

    def _progress(self, desc):
        verbose = self.rank == 0 and any(m.hp.verbose for m in self.members)
        epochs = [f.hp.max_epochs for f in self.firsts]
        if desc is None and len(self.firsts) == 1 and len(self.members) == 1:
            m = self.members[0]
            desc = f"Cell-MNN (holdout {m.holdout}, seed {m.seed})" if m.holdout is not None else \
                f"Cell-MNN (seed {m.seed})"
            show = verbose
        else:
            show = self.rank == 0 and desc or verbose
            desc = desc or (f"Cell-MNN ensemble of {len(self.firsts)}" if len(self.firsts) > 1 else "Cell-MNN")
        return tqdm(total=max(epochs), desc=desc, disable=not show, leave=False, unit="epoch")

    # ------------------------------------------------------------------ the loop

    def run(self) -> list:
        """Train until every model has stopped; one fitted CellMNN per member."""
        try:
            while not self.done and self.runner.layout.models:
                checking = self.epoch()
                self.check(checking)
                self.checkpoint()
            if not self.done:
                self.done = True
                self.checkpoint()
        finally:
            self.progress.close()
        return self.models()

    def epoch(self) -> list:
        """Training steps until at least one model ends a check epoch (every ``check_every``-th of
        its epochs, or its last); returns those models.  Losses stay on the device."""
        while True:
            self.buffer.append(self.runner.step())
            self.n += 1
            checking = []
            for mi in self.runner.layout.models:
                if self.n % self.s.steps[mi] == 0:
                    ep = self.n // self.s.steps[mi]
                    if ep % self.hp0.check_every == 0 or ep == self.firsts[mi].hp.max_epochs:
                        checking.append(mi)
            if checking:
                return checking

    def check(self, checking: list) -> None:
        """A check epoch: read the losses since the last one (one host synchronisation), record each
        model's finished epochs, score the ``checking`` models on their validation cells, and let the
        models that stop (patience spent, or their last epoch) leave with their best weights."""
        active = self.runner.layout.models
        self._record_epochs(active)
        scores = self._scores(checking, active)
        leaving = []
        for mi, sc in zip(checking, scores):
            ml, info = active.index(mi), self.infos[mi]
            ep, loss_mean, _ = info.history[-1]
            info.history[-1] = (ep, loss_mean, sc)
            if math.isnan(sc):  # no validation cells: keep the last model
                self.best[mi], info.best_epoch = self.runner.flat[ml].detach().clone(), ep
            elif sc < info.best_score:
                info.best_score, info.best_epoch, self.bad[mi] = sc, ep, 0
                self.best[mi] = self.runner.flat[ml].detach().clone()
            else:
                self.bad[mi] += 1
            if self.bad[mi] >= self.firsts[mi].hp.patience or ep >= self.firsts[mi].hp.max_epochs:
                leaving.append(mi)
        self._show(active, leaving)
        if leaving:
            keep = [ml for ml, mi in enumerate(active) if mi not in leaving]
            if keep:
                self.runner.keep(keep)
            else:
                self.done = True

    def _record_epochs(self, active: list) -> None:
        losses = torch.stack(self.buffer).cpu().numpy()
        self.buffer = []
        for ml, mi in enumerate(active):
            self.step_loss[mi].extend(losses[:, ml].tolist())
            info, per = self.infos[mi], self.s.steps[mi]
            while len(self.step_loss[mi]) >= per:
                chunk, self.step_loss[mi] = self.step_loss[mi][:per], self.step_loss[mi][per:]
                info.epochs += 1
                if not all(math.isfinite(v) for v in chunk):
                    raise _diverged(info.epochs, self.firsts[mi], f"loss {np.sum(chunk)}", self.runner.use_graph)
                info.history.append((info.epochs, float(np.mean(chunk)), None))

    def _scores(self, checking: list, active: list) -> list:
        """The validation score of every ``checking`` model (rank 0's, under data parallelism)."""
        scores = []
        for mi in checking:
            try:
                scores.append(self.score(mi, self.runner.flat[active.index(mi)]))
            except (ValueError, torch.linalg.LinAlgError) as exc:
                raise _diverged(self.infos[mi].epochs, self.firsts[mi], str(exc), self.runner.use_graph) from None
        if self.n_ranks > 1:  # the ranks hold the same weights; rank 0's scores decide for all
            sc_t = torch.tensor(scores, dtype=torch.float64, device=self.device)
            dist.broadcast(sc_t, 0)
            scores = sc_t.tolist()
        return scores

    def score(self, mi: int, flat_m: torch.Tensor) -> float:
        """Model ``mi``'s validation score: the sum over its time courses of the MMD part of the
        objective on their validation cells (NaN if one has none); with ``select_on_holdout``, the
        MMD of its prediction of the held-out timepoint (the authors' choice)."""
        model = self.s.model(mi, flat_m)
        model.eval()
        with torch.no_grad():
            return float(sum(self._member_score(e, model) for e in self.s.model_members[mi]))

    def _member_score(self, e: int, model) -> float:
        s, mem = self.s, self.members[e]
        dataset = mem.dataset if s.embed else None
        as_t = lambda a: torch.as_tensor(a, dtype=s.dtype, device=self.device)  # noqa: E731
        if mem.hp.select_on_holdout:
            k = s.tp_off[mem.dataset] + mem.holdout
            pred = model.predict(as_t(s.data_list[k - 1]), s.times[k - 1], s.times[k], dataset=dataset)
            return float(laplace_mmd(pred, as_t(s.data_list[k]), mem.hp.sigma, backend=mem.hp.backend))
        if self.validation[e] is None:
            return float("nan")
        obj, x0, ys = self.validation[e]
        t0 = torch.as_tensor(obj.source_times(0), device=self.device)
        t = t0[:, None] + torch.as_tensor(obj.offsets(0), device=self.device)
        X, V = model(x0, t0, t, dataset=dataset)
        return float(obj(X, V, ys)[1][0])

    def _show(self, active: list, leaving: list) -> None:
        self.progress.n = max(self.infos[mi].epochs for mi in active)
        if len(self.firsts) == 1:
            info = self.infos[0]
            self.progress.set_postfix(loss=f"{info.history[-1][1]:.4f}", val=f"{info.best_score:.4f}")
        else:
            self.progress.set_postfix(training=f"{len(active) - len(leaving)}/{len(self.firsts)}")
        self.progress.refresh()

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> None:
        """Write the training state (rank 0, atomically) when a checkpoint file was given."""
        if self.path is None or self.rank != 0:
            return
        files.save_checkpoint({
            "fingerprint": self.fp, "n": self.n, "done": self.done, "bad": self.bad, "runner": self.runner.state(),
            "best": [b.detach().cpu() for b in self.best],
            "step_loss": [torch.tensor(v, dtype=torch.float64) for v in self.step_loss],
            "infos": [{"epochs": i.epochs, "best_epoch": i.best_epoch, "best_score": i.best_score,
                       "history": [list(r) for r in i.history]} for i in self.infos]}, self.path)

    def resume(self, saved: dict) -> None:
        """Continue from a checkpoint's state: weights, optimiser, step, histories, early stopping."""
        self.runner.load(saved["runner"])
        self.n, self.done, self.bad = saved["n"], saved["done"], list(saved["bad"])
        self.best = [b.to(self.device) for b in saved["best"]]
        self.step_loss = [v.tolist() for v in saved["step_loss"]]
        for info, d in zip(self.infos, saved["infos"]):
            info.epochs, info.best_epoch, info.best_score = d["epochs"], d["best_epoch"], d["best_score"]
            info.history = [tuple(r) for r in d["history"]]

    # ------------------------------------------------------------------ results

    def models(self) -> list:
        """One CellMNN per member (members of one joint model share it), with its best weights,
        ``fit_info`` and ``marginals_info``."""
        s, out = self.s, []
        for mi, mm in enumerate(s.model_members):
            model = s.model(mi, self.best[mi])
            model.eval()
            model.fit_info = self.infos[mi]
            model.marginals_info = _marginals_info(s, [self.members[e].dataset for e in mm])
            out.append(model)
        return [out[s.model_of[e]] for e in range(len(self.members))]


def _marginals_info(s: Setup, datasets: list) -> dict:
    """What a model records about its data: times, transform and source (per dataset if joint)."""
    sets = [s.sets[d] for d in datasets]
    if len(sets) == 1:
        m = sets[0]
        return {"times": [float(t) for t in m.times], "transform": m.transform.to_dict(), "source": m.source}
    return {"times": sorted({float(t) for m in sets for t in m.times}), "transform": sets[0].transform.to_dict(),
            "source": " + ".join(m.source for m in sets),
            "datasets": [{"index": d, "times": [float(t) for t in m.times], "source": m.source}
                         for d, m in zip(datasets, sets)]}


GRAPH_NEEDS = (f"a captured step needs the Triton step kernels (backend 'auto' or 'triton', at most "
               f"{MAX_TRITON_D} dimensions) and a deterministic decoder (noise='none'): the torch step and the "
               "noise's covariance read values on the host")


def capturable(hp, D: int) -> bool:
    """Whether a step of a D-dimensional model with these hyperparameters reads nothing on the
    host on CUDA, so that a CUDA graph can capture it (``GRAPH_NEEDS``)."""
    return hp.backend in ("auto", "triton") and D <= MAX_TRITON_D and hp.noise == "none"


def use_graph(hp, D: int, device: torch.device, n_ranks: int) -> bool:
    """``hp.cuda_graph``, or for None (the default): on wherever a step can be captured, i.e. a CUDA
    device, one process and ``capturable(hp, D)``."""
    if hp.cuda_graph is not None:
        return hp.cuda_graph
    return device.type == "cuda" and n_ranks == 1 and capturable(hp, D)


def _diverged(epoch: int, member: Member, what: str, graph: bool = False) -> FloatingPointError:
    hp = member.hp
    hint = ("; the steps were CUDA graph replays, whose backward holds ||dt A||_1 within a fixed scratch "
            "(beyond it, NaN): cuda_graph=False lifts that bound") if graph else ""
    return FloatingPointError(f"training diverged at epoch {epoch} ({what}); try a smaller lr (now {hp.lr:g})"
                              f" or init_scale (now {hp.init_scale:g}){hint} [model with holdout "
                              f"{member.holdout}, seed {member.seed}]")
