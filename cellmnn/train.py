"""Training Cell-MNN on snapshot marginals (the paper's objective and defaults).

Per step: ``batch_size`` initial cells spread over the source timepoints (every kept timepoint but
the last) and, for every kept timepoint, ``batch_size`` observed cells drawn with replacement.
Every initial cell is decoded to every kept time; loss = sum over sources s and later kept
timepoints f of gamma^(r-1) MMD^2(cells of s decoded to t_f, cells observed at t_f), r the rank
of f after s, + velocity_weight * the kinetic term (``kinetic``, default the authors' mean of
V^2 over cells x kept times x coordinates) + the eigen penalty.  Times enter in units of the
mean gap between timepoints, so the unit of time does not matter.  All MMD terms of a step are
one ``laplace_mmd_grouped`` call.  Early stopping checks a validation loss on cells of the kept
timepoints held back from training (never the held-out timepoint, unless ``select_on_holdout``
asks for the authors' choice).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from cellmnn_kernels import laplace_mmd_grouped
from cellmnn_kernels.ops.utils import BACKENDS

from .data import Marginals

DEFAULTS = dict(width=96, depth=4, init_scale=0.01, parameterization="direct", num_const_dims=0,
                lr=2e-4, weight_decay=1e-5, batch_size=200, gamma=0.1, sigma=1.0, velocity_weight=0.1,
                kinetic="kept_times", max_epochs=1000, check_every=10, patience=10, val_fraction=0.1, max_val_cells=5000,
                select_on_holdout=False,
                backend="auto", device="cpu", cuda_graph=False, verbose=True)


@dataclass
class FitInfo:
    holdout: int | None
    seed: int
    hparams: dict
    epochs: int = 0
    best_epoch: int = 0
    best_score: float = float("inf")
    history: list = field(default_factory=list)  # (epoch, mean train loss, validation score)
    selection: list | None = None  # select="inner": per candidate, inner W1 scores


def check_holdout(marginals: Marginals, holdout) -> int | None:
    if holdout is None:
        return None
    K = len(marginals)
    if K < 3:
        raise ValueError(f"leaving a timepoint out needs at least 3 timepoints; the data have {K}")
    if isinstance(holdout, bool) or not isinstance(holdout, (int, np.integer)) or not 0 < holdout < K - 1:
        raise ValueError(f"holdout must be the index of an interior timepoint, 1..{K - 2}; got {holdout!r}")
    return int(holdout)


def _number(name, v, low=None, high=None, low_open=False, high_open=True):
    """A finite real ``v`` within the stated bounds, or a ValueError/TypeError naming ``name``."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {v!r}")
    v = float(v)
    bounds = ("(" if low_open else "[") + f"{low}, {high}" + (")" if high_open else "]")
    if not math.isfinite(v) or (low is not None and (v < low or low_open and v == low)) or \
            (high is not None and (v > high or high_open and v == high)):
        raise ValueError(f"{name} must be a finite number in {bounds.replace('None', 'inf')}, got {v!r}")
    return v


def _positive_int(name, v):
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1:
        return int(v)
    if isinstance(v, (float, np.floating)) and math.isfinite(v) and v.is_integer() and v >= 1:
        return int(v)
    raise ValueError(f"{name} must be a positive integer, got {v!r}")


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return int(seed)


def check_inputs(marginals, hparams: dict) -> dict:
    """The checks ``fit`` and ``leave_one_out`` share: the data type and every hyperparameter.
    Returns the full hyperparameters (defaults filled in)."""
    if isinstance(marginals, (list, tuple)) and marginals and all(isinstance(m, Marginals) for m in marginals):
        from .joint import check_joint

        check_joint(marginals)
    elif not isinstance(marginals, Marginals):
        raise TypeError(f"marginals must be a Marginals from cellmnn.load_marginals(...), got "
                        f"{type(marginals).__name__}" + (" (for arrays, pass load_marginals(arrays, times=...))"
                                                         if isinstance(marginals, (list, tuple)) else ""))
    unknown = set(hparams) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown hyperparameter(s): {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    hp = {**DEFAULTS, **hparams}
    check_hparams(hp)
    return hp


def check_hparams(hp: dict) -> None:
    """Every hyperparameter of ``fit``, checked before any work; errors name the argument."""
    for name in ("batch_size", "max_epochs", "check_every", "patience", "width", "depth", "max_val_cells"):
        hp[name] = _positive_int(name, hp[name])
    if hp["num_const_dims"] != 0:
        hp["num_const_dims"] = _positive_int("num_const_dims", hp["num_const_dims"])
    _number("lr", hp["lr"], 0, None, low_open=True)
    for name in ("weight_decay", "gamma", "velocity_weight", "init_scale"):
        _number(name, hp[name], 0, None)
    _number("sigma", hp["sigma"], 0, None, low_open=True)
    _number("val_fraction", hp["val_fraction"], 0, 1)
    for name in ("select_on_holdout", "verbose", "cuda_graph"):
        if not isinstance(hp[name], bool):
            raise TypeError(f"{name} must be True or False, got {hp[name]!r}")
    if hp["kinetic"] not in KINETIC:
        raise ValueError(f"kinetic must be one of {KINETIC}, got {hp['kinetic']!r}")
    if hp["backend"] not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {hp['backend']!r}")
    resolve_device(hp["device"])


def resolve_device(device) -> torch.device:
    """"auto" (CUDA when available), or a torch device string/object that exists here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but CUDA is not available here; use 'cpu' or 'auto'")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}, but only {torch.cuda.device_count()} CUDA device(s) exist")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    return dev


KINETIC = ("kept_times", "future", "grid")
GRID_STEP = 0.1  # the "grid" kinetic form: decode points every 0.1 time units (the authors' older grid)


class _Objective:
    """The loss of one batch: cells of every source decoded to every kept time; MMD between the
    cells decoded to each later kept time and the cells observed there, plus the kinetic term.

    Kinetic forms, on the velocity V in units of ``time_unit`` (so the term does not depend on
    the unit of time): "kept_times" (the authors' objective), mean of V^2 over cells x every
    kept time (earlier ones decoded backwards, the cell's own included) x coordinates; "future",
    mean over cells x later kept times of ||V||^2 (summed over coordinates: D times heavier);
    "grid", mean of V^2 over a grid of step 0.1 time units from the first to the last timepoint.
    """

    def __init__(self, times, kept, gamma, sigma, velocity_weight, backend, kinetic="kept_times", time_unit=1.0):
        self.kept = kept
        self.sources = kept[:-1]
        self.targets = kept[1:]
        self.kept_times = torch.tensor([times[i] for i in kept], dtype=torch.float64)
        self.gamma, self.sigma, self.vw, self.backend = gamma, sigma, velocity_weight, backend
        self.kinetic, self.time_unit = kinetic, time_unit
        self.grid = torch.zeros(0, dtype=torch.float64)
        if kinetic == "grid":
            n = int(math.floor((max(times) - min(times)) / (GRID_STEP * time_unit) + 1e-9)) + 1
            self.grid = min(times) + GRID_STEP * time_unit * torch.arange(n, dtype=torch.float64)

    def __call__(self, model, src_cells, obs_cells, dtype, device, dataset=None):
        """src_cells: {source index: (n_s, D) array}; obs_cells: {target index: (m, D) array};
        ``dataset``: for a model with a dataset embedding, the dataset of these cells."""
        x0 = torch.as_tensor(np.concatenate([src_cells[s] for s in self.sources]), dtype=dtype, device=device)
        t0 = torch.cat([torch.full((len(src_cells[s]),), float(self.kept_times[self.kept.index(s)]),
                                   dtype=torch.float64) for s in self.sources]).to(device)
        n_kept = len(self.kept)
        t = torch.cat([self.kept_times, self.grid]).to(device)[None, :].expand(len(x0), -1)
        X, V, penalty = model(x0, t0, t, return_penalty=True, dataset=dataset)
        xs, vs, x_off, terms_y, weights, start = [], [], [0], [], [], 0
        for s in self.sources:
            n = len(src_cells[s])
            col = self.kept.index(s)
            for r, f in enumerate(self.kept[col + 1:], start=1):
                xs.append(X[start:start + n, col + r])
                vs.append(V[start:start + n, col + r])
                x_off.append(x_off[-1] + n)
                terms_y.append(self.targets.index(f))
                weights.append(self.gamma ** (r - 1))
            start += n
        ys = [torch.as_tensor(obs_cells[f], dtype=dtype, device=device) for f in self.targets]
        y_off = np.concatenate([[0], np.cumsum([len(y) for y in ys])]).tolist()
        mmd, per_term = laplace_mmd_grouped(torch.cat(xs), x_off, torch.cat(ys), y_off,
                                            list(range(len(xs))), terms_y, weights, self.sigma,
                                            backend=self.backend, check_finite=False)
        if self.kinetic == "future":
            vel = (torch.cat(vs) * self.time_unit).pow(2).sum(-1).mean()
        else:
            vel = (V[:, :n_kept] if self.kinetic == "kept_times" else V[:, n_kept:]).mul(self.time_unit).pow(2).mean()
        return mmd + self.vw * vel + penalty, mmd


def time_unit(times) -> float:
    """The internal unit of time: the mean gap between consecutive timepoints (1 if undefined)."""
    times = sorted(float(t) for t in times)
    span = times[-1] - times[0] if times else 0.0
    return span / (len(times) - 1) if span > 0 else 1.0


def fit(marginals: Marginals, holdout=None, seed: int = 0, select=None, select_grid=None, seeds=None,
        checkpoint=None, dataset_embedding: bool = False, **hparams):
    """Train a Cell-MNN on ``marginals``, leaving out timepoint index ``holdout`` (or none).

    Hyperparameters (paper defaults): width 96, depth 4, init_scale 0.01, parameterization
    "direct" or "eigen", AdamW lr 2e-4 and weight_decay 1e-5, batch_size 200, gamma 0.1, sigma 1,
    velocity_weight 0.1, kinetic "kept_times" ("future" or "grid": ``_Objective``), max_epochs
    1000 (an epoch is kept cells / batch_size steps), validation every check_every = 10 epochs
    with patience 10 checks on val_fraction = 10% of the kept cells (scored on at most
    max_val_cells = 5000 of them per timepoint, a seeded subsample); select_on_holdout=True
    instead selects on the held-out timepoint (the authors' choice: it uses the test marginal);
    device "cpu", "cuda" or "auto"; cuda_graph=True replays each training step as a captured
    CUDA graph (CUDA only; falls back to eager steps if capture fails).  Returns the model with
    the best validation score, with ``.fit_info`` (history) and ``.marginals_info`` attached.
    Seeded: the same inputs and seed give the same model.

    ``seeds=[s1, s2, ...]`` trains one model per seed, all at once as one batched ensemble
    (``cellmnn.ensemble``), and returns the list; each is the model ``fit(..., seed=s)`` gives.

    ``select="inner"`` chooses hyperparameters without the held-out timepoint: every candidate of
    ``select_grid`` (default ``SELECT_GRID``: velocity_weight 0.1 or 0 x sigma 1 or 0.3) is
    trained once per interior kept timepoint with that timepoint also left out and scored by
    the exact W1 of its prediction from the previous kept timepoint; the candidate with the
    lowest mean W1 is then trained on every kept timepoint.  Cost: len(grid) x (kept
    timepoints - 2) + 1 fits, trained as two batched ensembles.  The scores are in
    ``model.fit_info.selection``.

    ``checkpoint="run.ckpt"`` writes the training state to that file at every check epoch
    (atomically); calling ``fit`` again with the same arguments and file continues from it and
    returns the model an uninterrupted run returns.  A file there that is not a cellmnn
    checkpoint, or one of a different training, is an error (never replaced).

    Joint training: ``marginals`` a list of time courses in one model space (``load_joint``)
    trains one model on all of them; the loss is the sum of each one's loss (each with its own
    timepoints, batch of ``batch_size`` cells per step, and validation cells), ``holdout`` is None
    or one entry per dataset, and ``dataset_embedding=True`` lets the MLP read the dataset's
    one-hot code (a learned per-dataset embedding; ``predict(..., dataset=i)`` then).  The
    model's ``fit_info.holdout`` is the tuple of holdouts.  Time is measured in the mean gap of
    the pooled distinct timepoints (so a course's kinetic term can weigh differently than when
    it trains alone); an epoch is the kept cells of all courses / (courses x batch_size) steps,
    and early stopping follows the summed validation score.

    Data parallel: called by every process of a ``torch.distributed`` group with the same
    arguments (``torchrun``), each process decodes its share of every batch and the gradients are
    summed; the result equals one process's up to float rounding.  See the README.
    """
    hp = check_inputs(marginals, hparams)
    if not isinstance(dataset_embedding, bool):
        raise TypeError(f"dataset_embedding must be True or False, got {dataset_embedding!r}")
    joint = isinstance(marginals, (list, tuple))
    if dataset_embedding and not joint:
        raise ValueError("dataset_embedding=True needs a list of datasets (joint training)")
    if joint:
        from .joint import check_joint_holdout

        holdout = check_joint_holdout(marginals, holdout)
    else:
        holdout = check_holdout(marginals, holdout)
    if seeds is None:
        seed_list = [check_seed(seed)]
    else:
        if seed != 0:
            raise ValueError("give either seed or seeds, not both")
        seed_list = check_seeds(seeds)
    if hp["select_on_holdout"] and (holdout is None or joint and None in holdout):
        raise ValueError("select_on_holdout=True needs a holdout timepoint" + (" in every dataset" if joint else ""))
    grid = check_select(select, select_grid, hp)
    if joint:
        from .ensemble import Member, train

        if grid is not None:
            raise ValueError("select='inner' is not supported with joint training")
        members = [Member(k, s, hp, dataset=d, joint=s) for s in seed_list for d, k in enumerate(holdout)]
        out = train(marginals, members, checkpoint=checkpoint, embed=dataset_embedding)[::len(marginals)]
        return out if seeds is not None else out[0]
    if checkpoint is not None and grid is not None:
        raise ValueError("checkpoint is not supported with select='inner' (it trains several ensembles in turn)")
    models = fit_many(marginals, [(holdout, s) for s in seed_list], hp, grid, checkpoint)
    return models if seeds is not None else models[0]


def check_seeds(seeds) -> list:
    """A seed or a non-empty sequence of distinct seeds, as a list (``fit(seeds=)``, ``leave_one_out``)."""
    seeds = [check_seed(s) for s in ([seeds] if isinstance(seeds, (int, np.integer)) else list(seeds))]
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    dup = sorted({v for v in seeds if seeds.count(v) > 1})
    if dup:
        raise ValueError(f"seeds repeats {dup}; each must appear once (in leave_one_out a repeat would count "
                         "twice in the summary)")
    return seeds


def check_select(select, select_grid, hp):
    """The candidate grid for ``select="inner"`` (checked), or None without selection."""
    if select is None:
        if select_grid is not None:
            raise ValueError("select_grid is used only with select='inner'")
        return None
    if select != "inner":
        raise ValueError(f"select must be None or 'inner', got {select!r}")
    if hp["select_on_holdout"]:
        raise ValueError("select='inner' and select_on_holdout=True exclude each other")
    return _check_grid(SELECT_GRID if select_grid is None else select_grid, hp)


def fit_many(marginals: Marginals, jobs: list, hp: dict, grid=None, checkpoint=None) -> list:
    """One model per (holdout, seed) job, all trained as batched ensembles; with a candidate
    ``grid``, each job's hyperparameters are first chosen by inner leave-one-out."""
    from .ensemble import Member, train

    if grid is None:
        return train(marginals, [Member(k, s, hp) for k, s in jobs], checkpoint=checkpoint)
    tables = _select_inner(marginals, jobs, hp, grid)
    models = train(marginals, [Member(k, s, {**hp, **best_candidate(t)}) for (k, s), t in zip(jobs, tables)])
    for model, table in zip(models, tables):
        model.fit_info.selection = table
    return models


def best_candidate(table) -> dict:
    """The hyperparameters of the candidate with the lowest mean inner W1."""
    return min(table, key=lambda row: row["mean_W1"])["hparams"]


SELECT_GRID = ({"velocity_weight": 0.1, "sigma": 1.0}, {"velocity_weight": 0.1, "sigma": 0.3},
               {"velocity_weight": 0.0, "sigma": 1.0}, {"velocity_weight": 0.0, "sigma": 0.3})


def _check_grid(grid, hp) -> list:
    grid = list(grid) if isinstance(grid, (list, tuple)) else None
    if not grid or not all(isinstance(c, dict) and c for c in grid):
        raise ValueError("select_grid must be a non-empty list of non-empty dicts of hyperparameters")
    for cand in grid:
        unknown = set(cand) - set(DEFAULTS) | ({"select_on_holdout"} & set(cand))
        if unknown:
            raise ValueError(f"select_grid: {sorted(unknown)} cannot be selected; known: {sorted(DEFAULTS)}")
        check_hparams({**hp, **cand})
    return [dict(c) for c in grid]


def _select_inner(marginals, jobs, hp, grid) -> list:
    """Per (holdout, seed) job, per candidate: the exact W1 at every interior kept timepoint j of a
    model trained without j (and without the job's holdout), predicting j from the kept
    timepoint before it.  Every (job, candidate, j) model is trained in one batched call."""
    from .ensemble import Member, train
    from .evaluate import wasserstein1

    times = [float(t) for t in marginals.times]
    members, where = [], []
    for n, (holdout, seed) in enumerate(jobs):
        kept = [i for i in range(len(marginals)) if i != holdout]
        inner = kept[1:-1]
        if not inner:
            raise ValueError(f"select='inner' needs an interior kept timepoint to leave out; the data keep "
                             f"{len(kept)} timepoints")
        for c, cand in enumerate(grid):
            for j in inner:
                exclude = () if holdout is None else (holdout,)
                members.append(Member(j, seed, {**hp, **cand, "verbose": False}, exclude))
                where.append((n, c, j, kept[kept.index(j) - 1]))
    models = train(marginals, members, desc=f"inner selection ({len(members)} models)" if hp["verbose"] else None)
    tables = [[dict(hparams=cand, inner_W1={}) for cand in grid] for _ in jobs]
    for model, (n, c, j, prev) in zip(models, where):
        pred = model.predict(marginals.data[prev].astype(np.float32), times[prev], times[j])
        tables[n][c]["inner_W1"][j] = wasserstein1(pred, marginals.data[j])
    for table in tables:
        for row in table:
            row["mean_W1"] = float(np.mean(list(row["inner_W1"].values())))
    return tables


def _diverged(epoch, hp, what) -> FloatingPointError:
    return FloatingPointError(f"training diverged at epoch {epoch} ({what}); try a smaller lr (now {hp['lr']:g})"
                              f" or init_scale (now {hp['init_scale']:g})")


def _progress(total, verbose, holdout, seed):
    from tqdm.auto import tqdm

    desc = f"Cell-MNN (holdout {holdout}, seed {seed})" if holdout is not None else f"Cell-MNN (seed {seed})"
    return tqdm(total=total, desc=desc, disable=not verbose, leave=False, unit="epoch")
