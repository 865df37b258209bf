"""Leave-one-timepoint-out evaluation: Cell-MNN beside the OT-interpolate baseline.

For each interior timepoint k: train without it, push every cell of timepoint k-1 to t_k, and
score against the held-out cells with exact W1 (POT ``emd2``, Euclidean cost, uniform weights)
and the Laplace MMD^2 of training.  OT-interpolate: the exact OT plan (squared Euclidean cost)
between timepoints k-1 and k+1, its support moved linearly in time to t_k and weighted by the
plan (McCann's displacement interpolation), scored the same way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .data.inflate import subsample
from .data.marginals import Marginals, check_holdout
from .files import LOO_FORMAT, LOO_JSON, write_text_atomic
from .metrics import OT_MAX_ITER, mmd, sliced_wasserstein1, wasserstein1, wasserstein1_batched
from .train import Member, best_candidate, check_inputs, check_seeds, check_select, fit_many, train

#: Cells per side beyond which leave-one-out scores a seeded subsample exactly (10k x 10k exact
#: W1 measured 57 s and 4.3 GB here) and adds the batched and sliced estimates on all cells.
EXACT_MAX = 10_000
EVAL_SEED = 0  # the subsample's seed


def ot_interpolate(x0, x1, s: float):
    """Displacement interpolation at fraction s in [0, 1] of the exact OT plan from x0 to x1.

    Returns the support points (the plan's non-zero couplings moved to (1 - s) x0_i + s x1_j) and
    their masses.
    """
    import ot

    x0, x1 = np.asarray(x0, dtype=np.float64), np.asarray(x1, dtype=np.float64)
    plan = ot.emd(np.full(len(x0), 1 / len(x0)), np.full(len(x1), 1 / len(x1)), ot.dist(x0, x1),
                  numItermax=OT_MAX_ITER)
    i, j = np.nonzero(plan > 0)
    return (1 - s) * x0[i] + s * x1[j], plan[i, j]


@dataclass
class LeaveOneOutResult:
    """Rows (method, holdout, time, seed, W1, MMD) and their summary."""
    rows: list

    def summary(self) -> dict:
        """Per method: mean and std over seeds of the mean over holdouts, for W1 and MMD."""
        out = {}
        for method in dict.fromkeys(r["method"] for r in self.rows):
            by_seed = {}
            for r in self.rows:
                if r["method"] == method:
                    by_seed.setdefault(r["seed"], []).append(r)
            stats = {}
            for metric in ("W1", "MMD"):
                per_seed = [np.mean([r[metric] for r in rs]) for rs in by_seed.values()]
                stats[metric] = (float(np.mean(per_seed)), float(np.std(per_seed)))
            out[method] = stats
        return out

    def format_summary(self) -> str:
        """The summary as printable lines."""
        lines = ["mean over held-out timepoints, mean +- std over seeds:"]
        for method, st in self.summary().items():
            lines.append(f"  {method:<16} W1 {st['W1'][0]:.4f} +- {st['W1'][1]:.4f}   "
                         f"MMD {st['MMD'][0]:.5f} +- {st['MMD'][1]:.5f}")
        return "\n".join(lines)

    def winners(self) -> list:
        """Per held-out timepoint: (holdout, time, Cell-MNN W1 mean over seeds, OT-interpolate W1,
        the method with the lower W1)."""
        out = []
        for k in dict.fromkeys(r["holdout"] for r in self.rows):
            w = {m: [r["W1"] for r in self.rows if r["holdout"] == k and r["method"] == m]
                 for m in ("Cell-MNN", "OT-interpolate")}
            if w["Cell-MNN"] and w["OT-interpolate"]:
                ours, ot = float(np.mean(w["Cell-MNN"])), float(np.mean(w["OT-interpolate"]))
                time = next(r["time"] for r in self.rows if r["holdout"] == k)
                out.append((k, time, ours, ot, "Cell-MNN" if ours < ot else "OT-interpolate"))
        return out

    def format_winners(self) -> str:
        """Who wins on each held-out timepoint, as printable lines (empty without a baseline)."""
        rows = self.winners()
        if not rows:
            return ""
        lines = ["who wins on each held-out timepoint (W1, mean over seeds; lower is better):"]
        lines += [f"  holdout {k} (t = {t:g}): Cell-MNN {a:.4f}, OT-interpolate {b:.4f} -> {win}"
                  for k, t, a, b, win in rows]
        n = sum(win == "Cell-MNN" for *_, win in rows)
        lines.append(f"  Cell-MNN wins {n} of {len(rows)}")
        return "\n".join(lines)

    def format(self) -> str:
        """Every row, the summary and the winners, as a printable table."""
        lines = [f"{'method':<16} {'holdout':>7} {'time':>6} {'seed':>5} {'W1':>8} {'MMD':>9}"]
        for r in self.rows:
            lines.append(f"{r['method']:<16} {r['holdout']:>7} {r['time']:>6g} {r['seed']:>5} "
                         f"{r['W1']:>8.4f} {r['MMD']:>9.5f}")
        winners = self.format_winners()
        return "\n".join(lines) + "\n\n" + self.format_summary() + ("\n" + winners if winners else "")

    def to_dict(self) -> dict:
        """The rows, summary and winners (what ``to_json`` writes, without the format)."""
        winners = [dict(holdout=k, time=t, cell_mnn_W1=a, ot_interpolate_W1=b, winner=w)
                   for k, t, a, b, w in self.winners()]
        return {"rows": self.rows, "summary": self.summary(), "winners": winners}

    def to_json(self, path: str) -> None:
        """Write the rows, summary and winners as JSON (``format``: cellmnn-leave-one-out), atomically."""
        write_text_atomic(path, json.dumps({"format": LOO_FORMAT, **self.to_dict()}, indent=1), LOO_JSON)


def joint_to_json(results: list, sources: list, path: str) -> None:
    """The results of a joint ``leave_one_out`` (one per dataset) as one JSON, atomically:
    ``{"format": "cellmnn-leave-one-out", "datasets": [{"source", "rows", "summary", "winners"}, ...]}``."""
    doc = {"format": LOO_FORMAT, "datasets": [{"source": src, **r.to_dict()} for r, src in zip(results, sources)]}
    write_text_atomic(path, json.dumps(doc, indent=1), LOO_JSON)


def leave_one_out(marginals: Marginals, holdouts=None, seeds=(0, 1, 2), baseline: bool = True,
                  return_models: bool = False, report: bool = True, select=None, select_grid=None,
                  dataset_embedding: bool = False, **hparams):
    """Run the leave-one-timepoint-out protocol; returns a ``LeaveOneOutResult``
    (and the trained models keyed by (holdout, seed) if ``return_models``) and, with ``report``,
    prints the mean +- std over seeds of the mean over held-out timepoints.

    ``holdouts``: interior timepoint indices (default: all); ``seeds``: training seeds;
    ``select``, ``select_grid`` and ``hparams``: as for ``fit`` (``select="inner"`` chooses
    hyperparameters per held-out timepoint and seed without that timepoint; the choice is in each
    row's "selected").  Every (holdout, seed) model is trained at once, as one batched ensemble.
    The OT-interpolate baseline (deterministic) is scored on the same splits.

    Joint training: ``marginals`` a list of datasets in one model space (``load_joint``); for
    each dataset, each of its interior timepoints (``holdouts``: None, or one list per dataset)
    and each seed, one model is trained jointly on that dataset without the timepoint and on
    every other dataset whole (``dataset_embedding`` as for ``fit``), and scored on that
    dataset.  Returns one ``LeaveOneOutResult`` per dataset (models keyed by (dataset, holdout,
    seed)); compare with ``leave_one_out`` of each dataset alone to see what joint training does.
    """
    hp = check_inputs(marginals, hparams)
    seeds = check_seeds(seeds)
    if isinstance(marginals, (list, tuple)):
        if select is not None:
            raise ValueError("select='inner' is not supported with joint training")
        return _joint_leave_one_out(marginals, holdouts, seeds, baseline, return_models, report, dataset_embedding,
                                    hp)
    if dataset_embedding:
        raise ValueError("dataset_embedding=True needs a list of datasets (joint training)")
    holdouts = _check_holdouts(marginals, holdouts)
    grid = check_select(select, select_grid, hp)
    jobs = [(k, seed) for k in holdouts for seed in seeds]
    trained = dict(zip(jobs, fit_many(marginals, jobs, hp, grid)))  # every fit at once, batched
    result = LeaveOneOutResult(_rows(marginals, holdouts, seeds, trained, hp.sigma, baseline))
    if report:
        print(result.format_summary())
        print(result.format_winners())
    return (result, trained) if return_models else result


def _check_holdouts(marginals, holdouts) -> list:
    K = len(marginals)
    if holdouts is None:
        holdouts = list(range(1, K - 1))
        if not holdouts:
            raise ValueError(f"no interior timepoint to hold out: the data have {K} timepoints")
    else:
        holdouts = [holdouts] if isinstance(holdouts, (int, np.integer)) else list(holdouts)
        if not holdouts:
            raise ValueError(f"holdouts is empty; name interior timepoints to hold out (1..{K - 2}), or pass None for "
                             "all of them")
        holdouts = [check_holdout(marginals, k) for k in holdouts]
    dup = sorted({k for k in holdouts if holdouts.count(k) > 1})
    if dup:
        raise ValueError(f"holdouts repeats {dup}; each must appear once (a repeat would count twice in the "
                         "summary)")
    return holdouts


def _rows(marginals, holdouts, seeds, trained, sigma, baseline, dataset=None) -> list:
    """The Cell-MNN rows (``trained[(holdout, seed)]`` predicting each held-out timepoint from the
    previous one) and the OT-interpolate rows of one dataset.

    A timepoint with more than ``EXACT_MAX`` cells is scored on a subsample of ``EXACT_MAX``
    (seed ``EVAL_SEED``; "W1_cells" in the row): exact W1 and MMD of the subsample, and for
    Cell-MNN also "W1_batched" (the paper's mean W1 over 200 x 200 batches, an upper estimate)
    and "W1_sliced" (a lower bound) on every cell."""
    rows = []
    cap = lambda x: subsample(x, EXACT_MAX, EVAL_SEED)  # noqa: E731 - x itself when small enough
    for k in holdouts:
        t_prev, t_k, t_next = (float(marginals.times[i]) for i in (k - 1, k, k + 1))
        observed, previous = marginals.data[k], marginals.data[k - 1]
        big = max(len(observed), len(previous), len(marginals.data[k + 1])) > EXACT_MAX
        obs_s = cap(observed)
        for seed in seeds:
            model = trained[(k, seed)]
            pred = model.predict(previous.astype(np.float32), t_prev, t_k,
                                 dataset=dataset if getattr(model, "n_datasets", 0) else None)
            pred_s = cap(pred)
            rows.append(dict(method="Cell-MNN", holdout=k, time=t_k, seed=seed,
                             W1=wasserstein1(pred_s, obs_s), MMD=mmd(pred_s, obs_s, sigma=sigma),
                             epochs=model.fit_info.epochs, best_epoch=model.fit_info.best_epoch))
            if big:
                rows[-1].update(W1_cells=EXACT_MAX, W1_batched=wasserstein1_batched(pred, observed, seed=EVAL_SEED),
                                W1_sliced=sliced_wasserstein1(pred, observed, seed=EVAL_SEED))
            if model.fit_info.selection:
                rows[-1]["selected"] = best_candidate(model.fit_info.selection)
        if baseline:
            pts, w = ot_interpolate(cap(previous), cap(marginals.data[k + 1]), (t_k - t_prev) / (t_next - t_prev))
            w1, m = wasserstein1(pts, obs_s, w), mmd(pts, obs_s, w, sigma)
            for seed in seeds:  # deterministic: the same value on every seed's row
                rows.append(dict(method="OT-interpolate", holdout=k, time=t_k, seed=seed, W1=w1, MMD=m))
                if big:
                    rows[-1]["W1_cells"] = EXACT_MAX
    return rows


def _joint_leave_one_out(datasets, holdouts, seeds, baseline, return_models, report, embed, hp):
    if holdouts is None:
        holdouts = [None] * len(datasets)
    if not isinstance(holdouts, (list, tuple)) or len(holdouts) != len(datasets):
        raise ValueError(f"with {len(datasets)} datasets, holdouts must be None or one list (or None) per dataset; "
                         f"got {holdouts!r}")
    holdouts = [_check_holdouts(m, h) for m, h in zip(datasets, holdouts)]
    jobs = [(d, k, seed) for d in range(len(datasets)) for k in holdouts[d] for seed in seeds]
    members = [Member(k if dd == d else None, seed, hp, dataset=dd, joint=(d, k, seed))
               for d, k, seed in jobs for dd in range(len(datasets))]
    models = train(datasets, members, embed=embed)[::len(datasets)]  # one joint model per job
    trained = dict(zip(jobs, models))
    results = []
    for d, m in enumerate(datasets):
        mine = {(k, seed): trained[(d, k, seed)] for k in holdouts[d] for seed in seeds}
        results.append(LeaveOneOutResult(_rows(m, holdouts[d], seeds, mine, hp.sigma, baseline, dataset=d)))
        if report:
            print(f"dataset {d} ({m.source}), trained jointly with the other {len(datasets) - 1}:")
            print(results[-1].format_summary())
    return (results, trained) if return_models else results
