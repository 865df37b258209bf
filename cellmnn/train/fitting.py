"""``fit``: train Cell-MNN models on snapshot marginals (the paper's objective and defaults),
with model selection without the held-out timepoint (``select="inner"``).

Per step: ``batch_size`` initial cells spread over the source timepoints (every kept timepoint but
the last) and, for every kept timepoint, ``batch_size`` observed cells drawn with replacement;
the loss is the ``objective``.  Times enter in units of the mean gap between timepoints, so the
unit of time does not matter.  Early stopping checks the objective's MMD on cells of the kept
timepoints held back from training (never the held-out timepoint, unless ``select_on_holdout``
asks for the authors' choice).  Every fit is a batched ensemble (``trainer``).
"""
from __future__ import annotations

import numpy as np

from .. import checks
from ..data.joint import check_joint, check_joint_holdout
from ..data.marginals import Marginals, check_holdout, check_marginals
from ..metrics import wasserstein1
from .hparams import HParams
from .layout import Member
from .trainer import train

#: ``select="inner"``'s default candidates: the values earlier found to help on the two EMT files.
SELECT_GRID = ({"velocity_weight": 0.1, "sigma": 1.0}, {"velocity_weight": 0.1, "sigma": 0.3},
               {"velocity_weight": 0.0, "sigma": 1.0}, {"velocity_weight": 0.0, "sigma": 0.3})


def check_inputs(marginals, hparams: dict) -> HParams:
    """The checks ``fit`` and ``leave_one_out`` share: the data (one ``Marginals``, or a list of at
    least two in one model space) and every hyperparameter; returns the ``HParams``."""
    if isinstance(marginals, (list, tuple)):
        if not marginals:
            raise ValueError("marginals is an empty list; pass one Marginals, or a list of two or more time courses "
                             "for joint training (load_joint)")
        for i, m in enumerate(marginals):
            check_marginals(m, f"marginals[{i}]")
        check_joint(marginals)
    else:
        check_marginals(marginals)
    return HParams.from_kwargs(**hparams)


def fit(marginals: Marginals, holdout=None, seed: int = 0, select=None, select_grid=None, seeds=None,
        checkpoint=None, dataset_embedding: bool = False, **hparams):
    """Train a Cell-MNN on ``marginals``, leaving out timepoint index ``holdout`` (or none).

    ``hparams``: the fields of ``HParams`` (paper defaults: width 96, depth 4, init_scale 0.01,
    AdamW lr 2e-4, batch_size 200, gamma 0.1, sigma 1, velocity_weight 0.1, kinetic "kept_times",
    max_epochs 1000 of kept cells / batch_size steps; early stopping every check_every = 10 epochs,
    patience 10, on val_fraction = 10% of the kept cells, at most max_val_cells = 5000 per
    timepoint); select_on_holdout=True selects on the held-out timepoint instead (the authors'
    choice: it uses the test marginal); cuda_graph replays each step as a CUDA graph (None, the
    default: wherever a step can be captured, i.e. one process on CUDA with the Triton kernels).
    Returns the model with the best validation score, with ``.fit_info`` and ``.marginals_info``.
    Seeded: the same inputs and seed give the same model.

    ``seeds=[s1, s2, ...]`` trains one model per seed, all at once as one batched ensemble
    (``cellmnn.train.trainer``), and returns the list; each is the model ``fit(..., seed=s)`` gives.

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
    summed; the result equals one process's up to float rounding (docs/scale.md).
    """
    hp = check_inputs(marginals, hparams)
    checks.flag("dataset_embedding", dataset_embedding)
    joint = isinstance(marginals, (list, tuple))
    if dataset_embedding and not joint:
        raise ValueError("dataset_embedding=True needs a list of datasets (joint training)")
    holdout = check_joint_holdout(marginals, holdout) if joint else check_holdout(marginals, holdout)
    if seeds is not None and seed != 0:
        raise ValueError("give either seed or seeds, not both")
    seed_list = [checks.seed(seed)] if seeds is None else check_seeds(seeds)
    if hp.select_on_holdout and (holdout is None or joint and None in holdout):
        raise ValueError("select_on_holdout=True needs a holdout timepoint" + (" in every dataset" if joint else ""))
    grid = check_select(select, select_grid, hp)
    if joint:
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
    seeds = [checks.seed(s) for s in ([seeds] if isinstance(seeds, (int, np.integer)) else list(seeds))]
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    dup = sorted({v for v in seeds if seeds.count(v) > 1})
    if dup:
        raise ValueError(f"seeds repeats {dup}; each must appear once (in leave_one_out a repeat would count "
                         "twice in the summary)")
    return seeds


def check_select(select, select_grid, hp: HParams):
    """The candidate grid for ``select="inner"`` (checked), or None without selection."""
    if select is None:
        if select_grid is not None:
            raise ValueError("select_grid is used only with select='inner'")
        return None
    if select != "inner":
        raise ValueError(f"select must be None or 'inner', got {select!r}")
    if hp.select_on_holdout:
        raise ValueError("select='inner' and select_on_holdout=True exclude each other")
    grid = SELECT_GRID if select_grid is None else select_grid
    grid = list(grid) if isinstance(grid, (list, tuple)) else None
    if not grid or not all(isinstance(c, dict) and c for c in grid):
        raise ValueError("select_grid must be a non-empty list of non-empty dicts of hyperparameters")
    for cand in grid:
        unknown = set(cand) - set(HParams.names()) - {"preset"} | ({"select_on_holdout"} & set(cand))
        if unknown:
            raise ValueError(f"select_grid: {sorted(unknown)} cannot be selected; known: {sorted(HParams.names())}")
        hp.replace(**cand)
    return [dict(c) for c in grid]


def fit_many(marginals: Marginals, jobs: list, hp: HParams, grid=None, checkpoint=None) -> list:
    """One model per (holdout, seed) job, all trained as batched ensembles; with a candidate
    ``grid``, each job's hyperparameters are first chosen by inner leave-one-out."""
    if grid is None:
        return train(marginals, [Member(k, s, hp) for k, s in jobs], checkpoint=checkpoint)
    tables = _select_inner(marginals, jobs, hp, grid)
    models = train(marginals, [Member(k, s, hp.replace(**best_candidate(t))) for (k, s), t in zip(jobs, tables)])
    for model, table in zip(models, tables):
        model.fit_info.selection = table
    return models


def best_candidate(table) -> dict:
    """The hyperparameters of the candidate with the lowest mean inner W1."""
    return min(table, key=lambda row: row["mean_W1"])["hparams"]


def _select_inner(marginals, jobs, hp: HParams, grid) -> list:
    """Per (holdout, seed) job, per candidate: the exact W1 at every interior kept timepoint j of a
    model trained without j (and without the job's holdout), predicting j from the kept
    timepoint before it.  Every (job, candidate, j) model is trained in one batched call."""
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
                members.append(Member(j, seed, hp.replace(**cand, verbose=False), exclude))
                where.append((n, c, j, kept[kept.index(j) - 1]))
    models = train(marginals, members, desc=f"inner selection ({len(members)} models)" if hp.verbose else None)
    tables = [[dict(hparams=cand, inner_W1={}) for cand in grid] for _ in jobs]
    for model, (n, c, j, prev) in zip(models, where):
        pred = model.predict(marginals.data[prev].astype(np.float32), times[prev], times[j])
        tables[n][c]["inner_W1"][j] = wasserstein1(pred, marginals.data[j])
    for table in tables:
        for row in table:
            row["mean_W1"] = float(np.mean(list(row["inner_W1"].values())))
    return tables
