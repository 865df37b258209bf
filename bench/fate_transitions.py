"""Fate read-outs against known answers: ``cell_transition`` on simulated courses whose true fates
are known, and ``pull`` on a course with two origins.

    python bench/fate_transitions.py [--cases ...] [--seeds 0 1 2] [--n-cells 300] [--fit JSON]
                                     [--json bench/results/fate_transitions.json]

For each bifurcation case of ``cellmnn.data.simulate`` (one population splitting by the sign of
its first latent coordinate): simulate the course (data seed 0), label every cell "left" or
"right" by that sign, train one model per training seed (``fit(seeds=...)``, paper defaults, or
the ``--fit`` keyword arguments, e.g. '{"noise": "state", "affine": true}') and,
for every pair of times (source < target), compare ``cell_transition(..., "branch", source, target)``
with the truth: the source cells themselves carried forward by the simulator (``advance``,
``--repeats`` noise draws each) and labelled at the target time.  Scores: total variation per
source group between the predicted and the true row; and the error of the predicted fractions at
the target time (source fractions @ table) against the observed ones.  Both rules (ot, knn), one
model (the first seed) and the ensemble of all seeds.

``pull`` of the left branch at the last time back to every earlier time: the share of its
ancestry on the cells that are left there, against the simulator (those cells carried forward,
the chance of each to end left).

For ``converging`` (two clusters at t = 0, at y = -1 and y = +1, drawn to one fate at (2, 0)):
``pull`` of every cell at t = 4 (the single fate) back to t = 0, and the share of its ancestry on
each starting cluster.  Every late cell is in the fate, so any coupling whose rows sum to 1 gives
each cluster its share of the cells: a sanity check of the read-out, not of the model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cellmnn  # noqa: E402
from cellmnn.analysis.fate import RULES, cell_transition, pull  # noqa: E402
from cellmnn.data.simulate import CASES, advance, rotation, simulate  # noqa: E402
from cellmnn.files import check_output, json_kind  # noqa: E402
from record import write_record  # noqa: E402  (bench/record.py, beside this script)

FORMAT = "cellmnn-fate-transitions"
JSON_KIND = json_kind(FORMAT)
BRANCHING = ("bifurcation", "uneven-gaps", "bifurcation-5d", "bifurcation-10d")


def course_anndata(arrays, times, labels):
    """One AnnData of the course: X the cells, obs "day" and "branch"."""
    import anndata
    import pandas as pd

    t = np.repeat(np.asarray(times, dtype=np.float64), [len(a) for a in arrays])
    obs = pd.DataFrame({"day": t, "branch": np.concatenate(labels)}, index=[f"c{i}" for i in range(len(t))])
    return anndata.AnnData(np.concatenate(arrays).astype(np.float32), obs=obs)


def branch(case, x):
    """"left"/"right" by the sign of the first latent coordinate of observed cells ``x``."""
    return np.where((x @ rotation(case, 0))[:, 0] < 0, "left", "right")


def score_pair(case, arrays, times, adata, models, src, tgt, repeats):
    """Rows of total variation and fraction errors for one (source, target) pair."""
    xs = arrays[src]
    truth = advance(case, xs, times[tgt] - times[src], seed=100 + src, repeats=repeats)
    end = branch(case, truth.reshape(-1, xs.shape[1])).reshape(repeats, -1)
    groups = branch(case, xs)
    observed = {h: float((branch(case, arrays[tgt]) == h).mean()) for h in ("left", "right")}
    out = []
    for rule in RULES:
        for name, model in (("one model", models[0]), (f"ensemble of {len(models)}", models)):
            df = cell_transition(model, adata, "branch", times[src], times[tgt], rule=rule)
            tv = {g: 0.5 * float(np.abs(df.loc[g].to_numpy() -
                                        np.array([(end[:, groups == g] == h).mean() for h in df.columns])).sum())
                  for g in df.index}
            frac = np.array([df.attrs["source_counts"][g] for g in df.index], dtype=float)
            pushed = (frac / frac.sum()) @ df.to_numpy()
            err = max(abs(pushed[j] - observed.get(h, 0.0)) for j, h in enumerate(df.columns))
            out.append(dict(source=times[src], target=times[tgt], rule=rule, model=name, tv=tv,
                            max_tv=max(tv.values()), fraction_error=float(err), table=df.to_dict("index")))
    return out


def run_branching(case, seeds, n_cells, repeats, fit_kw):
    """Every (source, target) pair of one bifurcation case."""
    arrays, times = simulate(case, n_cells, seed=0)
    adata = course_anndata(arrays, times, [branch(case, a) for a in arrays])
    m = cellmnn.load_marginals(adata, time_key="day", n_components=None)
    models = cellmnn.fit(m, seeds=seeds, verbose=False, **fit_kw)
    rows, pulls = [], []
    for src in range(len(times) - 1):
        for tgt in range(src + 1, len(times)):
            rows += score_pair(case, arrays, times, adata, models, src, tgt, repeats)
        pulls += score_pull(case, arrays, times, adata, models, src, repeats)
    return rows, pulls


def run_converging(seeds, n_cells, fit_kw):
    """``pull`` of the single late fate of the converging course back to t = 0."""
    arrays, times = simulate("converging", n_cells, seed=0)
    origin = [np.full(len(a), "fate") for a in arrays]
    origin[0] = np.where(arrays[0][:, 1] < 0, "lower", "upper")
    adata = course_anndata(arrays, times, origin)
    m = cellmnn.load_marginals(adata, time_key="day", n_components=None)
    models = cellmnn.fit(m, seeds=seeds, verbose=False, **fit_kw)
    first = adata.obs["day"].to_numpy() == times[0]
    labels = adata.obs["branch"].to_numpy()
    rows = []
    for rule in RULES:
        for name, model in (("one model", models[0]), (f"ensemble of {len(models)}", models)):
            w = pull(model, adata, "branch", "fate", times[0], times[-1], key_added=None, rule=rule)
            share = {g: float(w[first & (labels == g)].sum()) for g in ("lower", "upper")}
            cells = {g: float((origin[0] == g).mean()) for g in ("lower", "upper")}
            rows.append(dict(rule=rule, model=name, pulled_share=share, cell_share=cells))
    return rows


def score_pull(case, arrays, times, adata, models, src, repeats):
    """Ancestry of the left branch at the last time, traced back to time index ``src``."""
    xs = arrays[src]
    ends = advance(case, xs, times[-1] - times[src], seed=300 + src, repeats=repeats)
    p_left = (branch(case, ends.reshape(-1, xs.shape[1])) == "left").reshape(repeats, -1).mean(axis=0)
    left = branch(case, xs) == "left"
    truth = float(p_left[left].sum() / p_left.sum())
    at = adata.obs["day"].to_numpy() == times[src]
    out = []
    for rule in RULES:
        for name, model in (("one model", models[0]), (f"ensemble of {len(models)}", models)):
            w = pull(model, adata, "branch", "left", times[src], times[-1], key_added=None, rule=rule)
            out.append(dict(source=times[src], target=times[-1], rule=rule, model=name,
                            pulled_share_on_left=float(w[at][left].sum()), true_share_on_left=truth))
    return out


def summarise(results) -> dict:
    """Per rule and model: the mean and the largest max-TV over the branching cases' pairs, with
    and without source t = 0, and the largest error of the pulled ancestry share."""
    out = {}
    for res in results.values():
        if not isinstance(res, dict):
            continue
        for r in res["transitions"]:
            d = out.setdefault(f"{r['rule']}, {r['model']}", {"tv": [], "tv_after_0": [], "pull": []})
            d["tv"].append(r["max_tv"])
            if r["source"] > 0:
                d["tv_after_0"].append(r["max_tv"])
        for r in res["pull_left"]:
            out[f"{r['rule']}, {r['model']}"]["pull"].append(abs(r["pulled_share_on_left"] - r["true_share_on_left"]))
    return {k: {"pairs": len(v["tv"]), "mean_max_tv": float(np.mean(v["tv"])), "worst_max_tv": float(max(v["tv"])),
                "mean_max_tv_source_after_t0": float(np.mean(v["tv_after_0"])),
                "worst_max_tv_source_after_t0": float(max(v["tv_after_0"])),
                "worst_pull_share_error": float(max(v["pull"]))} for k, v in out.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(BRANCHING) + ["converging"],
                    choices=list(BRANCHING) + ["converging"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-cells", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=50, help="simulator draws per source cell for the truth")
    ap.add_argument("--fit", type=json.loads, default={}, help="fit keyword arguments (JSON), e.g. the decoder")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.json:
        check_output(args.json, JSON_KIND, "--json")
    results = {}
    for case in args.cases:
        t0 = time.time()
        if case == "converging":
            results[case] = run_converging(args.seeds, args.n_cells, args.fit)
            for r in results[case]:
                print(f"{case:<16} pull fate 4 -> 0  {r['rule']:<4} {r['model']:<14} pulled {r['pulled_share']}  "
                      f"cells {r['cell_share']}")
        else:
            rows, pulls = run_branching(case, args.seeds, args.n_cells, args.repeats, args.fit)
            results[case] = {"transitions": rows, "pull_left": pulls}
            for r in rows:
                print(f"{case:<16} {r['source']:g} -> {r['target']:g}  {r['rule']:<4} {r['model']:<14} "
                      f"max TV {r['max_tv']:.3f}  fraction error {r['fraction_error']:.3f}")
            for r in pulls:
                print(f"{case:<16} pull left {r['target']:g} -> {r['source']:g}  {r['rule']:<4} {r['model']:<14} "
                      f"share on left {r['pulled_share_on_left']:.3f}  true {r['true_share_on_left']:.3f}")
        print(f"{case}: {time.time() - t0:.0f} s", flush=True)
    summary = summarise(results)
    print(json.dumps(summary, indent=1))
    if args.json:
        write_record(args.json, FORMAT, JSON_KIND, seeds=args.seeds, fit=args.fit, n_cells=args.n_cells,
                     repeats=args.repeats, summary=summary, results=results,
                     cases={c: CASES[c][1:3] for c in args.cases})


if __name__ == "__main__":
    main()
