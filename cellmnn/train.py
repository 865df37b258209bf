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

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from cellmnn_kernels import laplace_mmd, laplace_mmd_grouped
from cellmnn_kernels.ops.utils import BACKENDS

from .data import Marginals
from .model import CellMNN

DEFAULTS = dict(width=96, depth=4, init_scale=0.01, parameterization="direct", num_const_dims=0,
                lr=2e-4, weight_decay=1e-5, batch_size=200, gamma=0.1, sigma=1.0, velocity_weight=0.1,
                kinetic="kept_times", max_epochs=1000, check_every=10, patience=10, val_fraction=0.1,
                select_on_holdout=False,
                backend="auto", device="cpu", verbose=True)


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
    if not isinstance(marginals, Marginals):
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
    for name in ("batch_size", "max_epochs", "check_every", "patience", "width", "depth"):
        hp[name] = _positive_int(name, hp[name])
    if hp["num_const_dims"] != 0:
        hp["num_const_dims"] = _positive_int("num_const_dims", hp["num_const_dims"])
    _number("lr", hp["lr"], 0, None, low_open=True)
    for name in ("weight_decay", "gamma", "velocity_weight", "init_scale"):
        _number(name, hp[name], 0, None)
    _number("sigma", hp["sigma"], 0, None, low_open=True)
    _number("val_fraction", hp["val_fraction"], 0, 1)
    for name in ("select_on_holdout", "verbose"):
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

    def __call__(self, model, src_cells, obs_cells, dtype, device):
        """src_cells: {source index: (n_s, D) array}; obs_cells: {target index: (m, D) array}."""
        x0 = torch.as_tensor(np.concatenate([src_cells[s] for s in self.sources]), dtype=dtype, device=device)
        t0 = torch.cat([torch.full((len(src_cells[s]),), float(self.kept_times[self.kept.index(s)]),
                                   dtype=torch.float64) for s in self.sources]).to(device)
        n_kept = len(self.kept)
        t = torch.cat([self.kept_times, self.grid]).to(device)[None, :].expand(len(x0), -1)
        X, V, penalty = model(x0, t0, t, return_penalty=True)
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


def fit(marginals: Marginals, holdout=None, seed: int = 0, select=None, select_grid=None, **hparams) -> CellMNN:
    """Train a Cell-MNN on ``marginals``, leaving out timepoint index ``holdout`` (or none).

    Hyperparameters (paper defaults): width 96, depth 4, init_scale 0.01, parameterization
    "direct" or "eigen", AdamW lr 2e-4 and weight_decay 1e-5, batch_size 200, gamma 0.1, sigma 1,
    velocity_weight 0.1, kinetic "kept_times" ("future" or "grid": ``_Objective``), max_epochs
    1000 (an epoch is kept cells / batch_size steps), validation every check_every = 10 epochs
    with patience 10 checks on val_fraction = 10% of the kept cells; select_on_holdout=True
    instead selects on the held-out timepoint (the authors' choice: it uses the test marginal);
    device "cpu", "cuda" or "auto".  Returns the model with the best validation score, with
    ``.fit_info`` (history) and ``.marginals_info`` attached.
    Seeded: the same inputs and seed give the same model.

    ``select="inner"`` chooses hyperparameters without the held-out timepoint: every candidate of
    ``select_grid`` (default ``SELECT_GRID``: velocity_weight 0.1 or 0 x sigma 1 or 0.3) is
    trained once per interior kept timepoint with that timepoint also left out and scored by
    the exact W1 of its prediction from the previous kept timepoint; the candidate with the
    lowest mean W1 is then trained on every kept timepoint.  Cost: len(grid) x (kept
    timepoints - 2) + 1 fits.  The scores are in ``model.fit_info.selection``.
    """
    hp = check_inputs(marginals, hparams)
    seed = check_seed(seed)
    holdout = check_holdout(marginals, holdout)
    if hp["select_on_holdout"] and holdout is None:
        raise ValueError("select_on_holdout=True needs a holdout timepoint")
    if select is None:
        if select_grid is not None:
            raise ValueError("select_grid is used only with select='inner'")
        return _train(marginals, holdout, seed, hp)
    if select != "inner":
        raise ValueError(f"select must be None or 'inner', got {select!r}")
    if hp["select_on_holdout"]:
        raise ValueError("select='inner' and select_on_holdout=True exclude each other")
    grid = _check_grid(SELECT_GRID if select_grid is None else select_grid, hp)
    table = _select_inner(marginals, holdout, seed, hp, grid)
    model = _train(marginals, holdout, seed, {**hp, **best_candidate(table)})
    model.fit_info.selection = table
    return model


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


def _select_inner(marginals, holdout, seed, hp, grid) -> list:
    """Per candidate: the exact W1 at every interior kept timepoint j of a model trained without
    j (and without ``holdout``), predicting j from the kept timepoint before it."""
    from .evaluate import wasserstein1

    times = [float(t) for t in marginals.times]
    kept = [i for i in range(len(marginals)) if i != holdout]
    inner = kept[1:-1]
    if not inner:
        raise ValueError(f"select='inner' needs an interior kept timepoint to leave out; the data keep "
                         f"{len(kept)} timepoints")
    table = []
    for cand in grid:
        hpc = {**hp, **cand, "verbose": False}
        scores = {}
        for j in inner:
            model = _train(marginals, j, seed, hpc, exclude=(holdout,))
            prev = kept[kept.index(j) - 1]
            pred = model.predict(marginals.data[prev].astype(np.float32), times[prev], times[j])
            scores[j] = wasserstein1(pred, marginals.data[j])
        table.append(dict(hparams=cand, inner_W1=scores, mean_W1=float(np.mean(list(scores.values())))))
    return table


def _train(marginals: Marginals, holdout, seed: int, hp: dict, exclude=()) -> CellMNN:
    """``fit`` on checked arguments; timepoints ``exclude`` are left out besides ``holdout``."""
    device = resolve_device(hp["device"])
    dtype = torch.float32
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)

    K, times = len(marginals), [float(t) for t in marginals.times]
    kept = [i for i in range(K) if i != holdout and i not in exclude]
    if len(kept) < 2:
        raise ValueError("training needs at least two kept timepoints")
    # Split each kept timepoint into training and validation cells (fixed for the run).
    n_src = len(kept) - 1
    if hp["batch_size"] < n_src:
        raise ValueError(f"batch_size must be at least the number of source timepoints ({n_src}), so that each "
                         f"gets a cell per step; got {hp['batch_size']}")
    train, val = {}, {}
    for i in kept:
        perm = rng.permutation(len(marginals.data[i]))
        n_val = int(round(hp["val_fraction"] * len(perm))) if len(perm) > 1 else 0
        if n_val >= len(perm):
            raise ValueError(f"val_fraction={hp['val_fraction']} leaves no training cell at t = {times[i]:g} "
                             f"({len(perm)} cells); use a smaller val_fraction")
        val[i], train[i] = marginals.data[i][perm[:n_val]], marginals.data[i][perm[n_val:]]

    span, unit = max(times) - min(times), time_unit(times)
    model = CellMNN(marginals.dim, hp["width"], hp["depth"], hp["init_scale"], hp["parameterization"],
                    hp["num_const_dims"], hp["backend"], time_offset=min(times),
                    time_scale=span if span > 0 else 1.0, time_unit=unit).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    objective = _Objective(times, kept, hp["gamma"], hp["sigma"], hp["velocity_weight"], hp["backend"],
                           hp["kinetic"], unit)
    per_src = [hp["batch_size"] // n_src + (k < hp["batch_size"] % n_src) for k in range(n_src)]
    steps = max(1, math.ceil(sum(len(marginals.data[i]) for i in kept) / hp["batch_size"]))

    def sample(i, n):
        return train[i][rng.integers(0, len(train[i]), n)]

    def validation_score():
        model.eval()
        with torch.no_grad():
            if hp["select_on_holdout"]:
                prev = holdout - 1
                pred = model.predict(torch.as_tensor(marginals.data[prev], dtype=dtype, device=device),
                                     times[prev], times[holdout])
                score = laplace_mmd(pred, torch.as_tensor(marginals.data[holdout], dtype=dtype, device=device),
                                    hp["sigma"], backend=hp["backend"])
            else:
                if any(len(val[i]) == 0 for i in kept):
                    return float("nan")
                _, score = objective(model, {s: val[s] for s in objective.sources},
                                     {f: val[f] for f in objective.targets}, dtype, device)
        model.train()
        return float(score)

    info = FitInfo(holdout, seed, hp)
    best_state, bad_checks = copy.deepcopy(model.state_dict()), 0
    progress = _progress(hp["max_epochs"], hp["verbose"], holdout, seed)
    model.train()
    try:
        for epoch in range(1, hp["max_epochs"] + 1):
            total = 0.0
            for step in range(steps):
                src = {s: sample(s, n) for s, n in zip(objective.sources, per_src)}
                obs = {f: sample(f, hp["batch_size"]) for f in objective.targets}
                try:
                    loss, _ = objective(model, src, obs, dtype, device)
                except (ValueError, torch.linalg.LinAlgError) as exc:  # operators out of range, singular P
                    if epoch == 1 and step == 0:
                        raise ValueError(f"the untrained model is out of range ({exc}); try a smaller "
                                         f"init_scale (now {hp['init_scale']})") from None
                    raise _diverged(epoch, hp, str(exc)) from None
                value = loss.item()
                if not math.isfinite(value):
                    raise _diverged(epoch, hp, f"loss {value}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += value
            info.epochs = epoch
            score = None
            if epoch % hp["check_every"] == 0 or epoch == hp["max_epochs"]:
                try:
                    score = validation_score()
                except (ValueError, torch.linalg.LinAlgError) as exc:
                    raise _diverged(epoch, hp, str(exc)) from None
                if math.isnan(score):  # no validation cells: keep the last model
                    best_state, info.best_epoch = copy.deepcopy(model.state_dict()), epoch
                elif score < info.best_score:
                    info.best_score, info.best_epoch, bad_checks = score, epoch, 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    bad_checks += 1
            info.history.append((epoch, total / steps, score))
            progress.update(1)
            progress.set_postfix(loss=f"{total / steps:.4f}", val=f"{info.best_score:.4f}")
            if bad_checks >= hp["patience"]:
                break
    finally:
        progress.close()
    model.load_state_dict(best_state)
    model.eval()
    model.fit_info = info
    model.marginals_info = {"times": times, "transform": marginals.transform.to_dict(), "source": marginals.source}
    return model


def _diverged(epoch, hp, what) -> FloatingPointError:
    return FloatingPointError(f"training diverged at epoch {epoch} ({what}); try a smaller lr (now {hp['lr']:g})"
                              f" or init_scale (now {hp['init_scale']:g})")


def _progress(total, verbose, holdout, seed):
    from tqdm.auto import tqdm

    desc = f"Cell-MNN (holdout {holdout}, seed {seed})" if holdout is not None else f"Cell-MNN (seed {seed})"
    return tqdm(total=total, desc=desc, disable=not verbose, leave=False, unit="epoch")
