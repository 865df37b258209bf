"""The ``cellmnn`` command line.

    cellmnn demo [--plot PNG] [--trajectories PNG]   leave-one-out on the embedded A549 EMT data, figures
    cellmnn fit DATA [DATA ...] --holdout K --out DIR   train one model and save it (--resume DIR continues a
                                                  killed run); several DATA: one model trained jointly
    cellmnn evaluate DATA [DATA ...] [--json FILE]     leave-one-out, Cell-MNN beside OT-interpolate
    cellmnn predict MODEL DATA --from-time T0 --to-time T1 [T2 ...] --out FILE.csv [--ensemble MODEL ...]
    cellmnn interactions MODEL DATA (--genes G ... | --pairs S:T ... | --trrust TSV [--ensemble MODEL ...])
        --out FILE.csv
    cellmnn inflate DATA --n-cells N --out FILE.npz   noisy copies of the cells (the paper's scaling protocol)
    cellmnn annotate MODEL DATA.h5ad --out NEW.h5ad   read-outs written into a copy of the AnnData
    cellmnn transitions MODEL DATA.h5ad --annotation KEY --source T0 --target T1 [T2 ...] --out FILE.csv
        [--heatmap PNG] [--flow PNG]              fate probabilities between the groups of two times
    cellmnn perturb MODEL DATA.h5ad --genes GATA1=0 SPI1=scale:2 --source T0 --target T1 --out FILE.csv
        [--annotation KEY]                        clamp or scale genes along the path: shifts of genes and groups

DATA is a .h5ad, .npz or .csv file, or ``emt-a549`` for the embedded dataset (``annotate``,
``transitions`` and ``perturb`` read a .h5ad).

``fit`` and ``evaluate`` run data-parallel under ``torchrun`` (gloo on CPU, nccl on CUDA) with
the same flags; rank 0 alone prints and writes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from . import checks, files
from .analysis.cells import time_column
from .analysis.fate import (
    FATE_SAMPLES,
    RULES,
    check_group,
    check_labelled,
    couple,
    pull_weights,
    push_weights,
    transition_table,
    two_times,
)
from .analysis.interactions import gene_interactions
from .analysis.perturb import OPERATORS, perturb
from .analysis.trrust import trrust_validation
from .annotate import annotate
from .data.inflate import INFLATED, check_inflate_args, inflate, write_inflated
from .data.joint import load_joint
from .data.load import load_marginals
from .data.marginals import Marginals
from .evaluate import joint_to_json, leave_one_out, ot_interpolate
from .model.persist import check_model_destination, load_model, save_model
from .plots import (
    plot_flow,
    plot_heatmap,
    plot_holdouts,
    plot_perturbation,
    plot_trajectories,
    plot_transitions,
    plot_weights,
)
from .train import HParams, check_select, fit, resolve_device

EMBEDDED = "emt-a549"


def _data_args(p, joint=False):
    if joint:
        p.add_argument("data", nargs="+", help=f"a .h5ad, .npz or .csv file, or {EMBEDDED!r} for the embedded "
                       "dataset; several: one model trained jointly on all, in one model space (load_joint)")
        p.add_argument("--dataset-embedding", action="store_true",
                       help="several DATA: the model also reads each dataset's one-hot code")
    else:
        p.add_argument("data", help=f"a .h5ad, .npz or .csv file, or {EMBEDDED!r} for the embedded dataset")
    p.add_argument("--time-key", default=None, help="time column (obs key, CSV column or npz array)")
    p.add_argument("--embedding", default=None, help="obsm key of an AnnData embedding (e.g. X_pca)")
    p.add_argument("--n-components", type=int, default=5, help="PCA components / embedding columns (default 5)")
    p.add_argument("--no-standardize", action="store_true", help="do not z-score the model space")
    p.add_argument("--drop-nonfinite", action="store_true", help="drop rows with NaN/Inf instead of failing")
    p.add_argument("--backed", action="store_true",
                   help=".h5ad only: read the file in chunks (X and wide embeddings never whole in memory)")


def _model_data_args(p):
    p.add_argument("model", help="a model directory written by `cellmnn fit`")
    p.add_argument("data", help=f"a .h5ad, .npz or .csv file with the model's raw features, or {EMBEDDED!r}")
    p.add_argument("--time-key", default=None)
    p.add_argument("--embedding", default=None)
    p.add_argument("--drop-nonfinite", action="store_true")


def _train_args(p, max_epochs=None):
    g = p.add_argument_group("training (defaults: the paper's)")
    g.add_argument("--parameterization", choices=("direct", "eigen"), default=None)
    g.add_argument("--num-const-dims", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--depth", type=int, default=None)
    g.add_argument("--init-scale", type=float, default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--gamma", type=float, default=None)
    g.add_argument("--sigma", type=float, default=None)
    g.add_argument("--velocity-weight", type=float, default=None)
    g.add_argument("--kinetic", choices=("kept_times", "future", "grid"), default=None,
                   help="kinetic term: V^2 at every kept time (default, the authors'), at later kept times "
                        "(summed over coordinates), or on a grid of step 0.1 time units")
    g.add_argument("--affine", action=argparse.BooleanOptionalAction, default=None,
                   help="affine drift A x + b: each cell relaxes to its own fixed point (docs/decoders.md)")
    g.add_argument("--noise", choices=("none", "state"), default=None,
                   help="state: a learned diffusion; predictions are samples (docs/decoders.md)")
    g.add_argument("--piece-length", type=float, default=None,
                   help="re-evaluate the operator every this many time units (mean gaps) along the path")
    g.add_argument("--rate-bound", type=float, default=None, help="bound on rates (and drift) per time unit")
    g.add_argument("--preset", choices=("paper",), default=None,
                   help="paper: the paper's decoder (closed form, deterministic, dx = A x)")
    g.add_argument("--max-epochs", type=int, default=max_epochs)
    g.add_argument("--check-every", type=int, default=None)
    g.add_argument("--patience", type=int, default=None)
    g.add_argument("--val-fraction", type=float, default=None)
    g.add_argument("--max-val-cells", type=int, default=None,
                   help="validation cells scored per timepoint, a seeded subsample (default 5000)")
    g.add_argument("--select", choices=("inner",), default=None,
                   help="choose velocity_weight and sigma by an inner leave-one-out over the kept timepoints "
                        "(never the held-out one); costs 4 x (kept timepoints - 2) + 1 fits per model")
    g.add_argument("--select-on-holdout", action="store_true",
                   help="select the model on the held-out timepoint (the authors' choice; uses test data)")
    g.add_argument("--backend", choices=("auto", "triton", "torch", "reference"), default=None)
    g.add_argument("--device", default=None, help="cpu, cuda or auto")
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each training step as a CUDA graph (default: wherever a step can be captured)")
    g.add_argument("--jobs", type=int, default=-1,
                   help="worker processes that share an ensemble's models on the CPU (default -1: one per usable "
                        "core; 1: train in this process)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _hparams(args) -> dict:
    names = ["parameterization", "num_const_dims", "width", "depth", "init_scale", "lr", "weight_decay",
             "batch_size", "gamma", "sigma", "velocity_weight", "kinetic", "max_epochs", "check_every", "patience",
             "val_fraction", "max_val_cells", "backend", "device", "cuda_graph", "affine", "noise", "piece_length",
             "rate_bound", "preset"]
    hp = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.select:
        hp["select"] = args.select
    if args.select_on_holdout:
        hp["select_on_holdout"] = True
    hp["verbose"] = not args.quiet
    hp["n_jobs"] = args.jobs
    return hp


def _joint(args) -> bool:
    """Whether the command was given several DATA (joint training)."""
    return isinstance(args.data, list) and len(args.data) > 1


def _load(args):
    """The DATA as ``Marginals``, or a list of them in one model space when several were given."""
    sources = args.data if isinstance(args.data, list) else [args.data]
    sources = [None if d == EMBEDDED else d for d in sources]
    if len(sources) > 1:
        if getattr(args, "backed", False):
            raise ValueError("--backed reads one .h5ad; several DATA (joint training) are read into memory")
        return load_joint(sources, time_key=args.time_key, embedding=args.embedding,
                          n_components=args.n_components, standardize=not args.no_standardize,
                          drop_nonfinite=args.drop_nonfinite)
    return load_marginals(sources[0], time_key=args.time_key, embedding=args.embedding,
                          n_components=args.n_components, standardize=not args.no_standardize,
                          drop_nonfinite=args.drop_nonfinite, backed=getattr(args, "backed", False))


def _holdout(args):
    """``--holdout``: one index (or "none") per DATA; None, an int, or a list for joint training."""
    n = len(args.data) if isinstance(args.data, list) else 1
    given = args.holdout if args.holdout is not None else ["none"] * n
    if len(given) != n:
        raise ValueError(f"--holdout takes one value per DATA ({n}; 'none' for a dataset with nothing held out); "
                         f"got {len(given)}")
    values = []
    for v in given:
        if str(v).lower() == "none":
            values.append(None)
            continue
        try:
            values.append(int(v))
        except ValueError:
            raise ValueError(f"--holdout takes timepoint indices or 'none'; got {v!r}") from None
    return values if n > 1 else values[0]


def _evaluate_joint(datasets, seeds, hp, json_path=None, embed=False):
    t0 = time.time()
    results = leave_one_out(datasets, seeds=seeds, report=False, dataset_embedding=embed, **hp)
    if _RANK != 0:
        return results
    for d, (m, result) in enumerate(zip(datasets, results)):
        print(f"dataset {d}: {m}, trained jointly with the other {len(datasets) - 1}")
        print(result.format())
    print(f"wall time {time.time() - t0:.0f} s")
    if json_path:
        joint_to_json(results, [m.source for m in datasets], json_path)
        print(f"wrote {json_path}")
    return results


def _evaluate(marginals, holdouts, seeds, hp, json_path=None, plot_path=None, trajectories_path=None):
    t0 = time.time()
    result, models = leave_one_out(marginals, holdouts=holdouts, seeds=seeds, return_models=True, report=False,
                                   **hp)
    if _RANK != 0:
        return result
    print(marginals)
    print(result.format())
    print(f"wall time {time.time() - t0:.0f} s")
    if json_path:
        result.to_json(json_path)
        print(f"wrote {json_path}")
    if plot_path:
        ks = sorted({k for k, _ in models})
        first_seed = min(s for _, s in models)
        preds, base = {}, {}
        for k in ks:
            t_prev, t_k, t_next = (float(marginals.times[i]) for i in (k - 1, k, k + 1))
            preds[k] = models[(k, first_seed)].predict(marginals.data[k - 1].astype(np.float32), t_prev, t_k)
            base[k] = ot_interpolate(marginals.data[k - 1], marginals.data[k + 1], (t_k - t_prev) / (t_next - t_prev))
        plot_holdouts(marginals, preds, base, plot_path)
        print(f"wrote {plot_path}")
    if trajectories_path:
        k, seed = min(models)
        plot_trajectories(marginals, models[(k, seed)], trajectories_path,
                          title=f"cells of t = {marginals.times[0]:g} pushed by the model trained without "
                                f"t = {marginals.times[k]:g} (seed {seed})")
        print(f"wrote {trajectories_path}")
    return result


def _check_outputs(args):
    """Every output path of the command, checked before any work (``files.check_output``)."""
    for attr, kind in (("json", files.LOO_JSON), ("plot", files.FIGURE), ("heatmap", files.FIGURE),
                       ("flow", files.FIGURE), ("trajectories", files.FIGURE), ("weights_plot", files.FIGURE)):
        if getattr(args, attr, None):
            files.check_output(getattr(args, attr), kind, f"--{attr.replace('_', '-')}")


def cmd_demo(args):
    """`cellmnn demo`: leave-one-out on the embedded EMT data (short), with a figure."""
    _check_outputs(args)
    marginals = load_marginals()
    hp = _hparams(args)
    print(f"Leave-one-out on the embedded A549 EMT time course (seeds {args.seeds}, at most "
          f"{hp['max_epochs']} epochs per model; `cellmnn evaluate {EMBEDDED}` runs the full protocol).")
    _evaluate(marginals, None, args.seeds, hp, args.json, args.plot, args.trajectories)
    return 0


def cmd_fit(args):
    """`cellmnn fit`: train one model and save it (``--resume`` continues a killed run)."""
    out, flag = (args.out, "--out") if args.out else (args.resume, "--resume")
    hp = _hparams(args)
    holdout = _holdout(args)
    if args.dataset_embedding and not _joint(args):
        raise ValueError("--dataset-embedding needs several DATA (joint training)")
    _check_flags(hp, args.seed)  # every flag, on every process, before any folder is touched
    ckpt = os.path.join(files.as_path(out, flag), files.CHECKPOINT)
    problem = files.checkpoint_problem(ckpt) if os.path.lexists(ckpt) else None
    if problem:
        raise ValueError(f"{flag} {out}: {ckpt} is not a usable training checkpoint ({problem}); remove it to "
                         "start afresh, or choose another folder")
    path = check_model_destination(out)
    if args.resume and not os.path.isfile(ckpt):
        raise FileNotFoundError(f"--resume {out}: no training checkpoint ({files.CHECKPOINT}) in that folder")
    if args.out and os.path.isfile(ckpt):
        raise FileExistsError(f"--out {out} holds the checkpoint of an interrupted run; continue it with "
                              f"--resume {out} (same flags), or choose another folder")
    marginals = _load(args)
    created = _RANK == 0 and not os.path.exists(path)
    if _RANK == 0:
        os.makedirs(path, exist_ok=True)
    try:
        model = fit(marginals, holdout=holdout, seed=args.seed, checkpoint=ckpt,
                    dataset_embedding=args.dataset_embedding, **hp)
    except BaseException:
        if created and os.path.isdir(path) and not os.listdir(path):  # ours, and nothing was written in it
            os.rmdir(path)
        raise
    if _RANK == 0:
        save_model(model, path)
        files.remove_checkpoint(ckpt)
        info = model.fit_info
        what = "; ".join(str(m) for m in marginals) if isinstance(marginals, list) else marginals
        print(f"trained on {what} (holdout {info.holdout}): {info.epochs} epochs, best validation "
              f"{info.best_score:.5f} at epoch {info.best_epoch}; saved to {path}")
    return 0


def _check_flags(hp: dict, seed=None) -> None:
    """The training flags and the seed, checked as ``fit`` will check them."""
    kw = dict(hp)
    select = kw.pop("select", None)
    check_select(select, None, HParams.from_kwargs(**kw))
    if seed is not None:
        checks.seed(seed)


def cmd_evaluate(args):
    """`cellmnn evaluate`: leave-one-out, Cell-MNN beside OT-interpolate."""
    _check_outputs(args)
    _check_flags(_hparams(args))
    if _joint(args):
        for flag, value in (("--holdouts", args.holdouts), ("--plot", args.plot),
                            ("--trajectories", args.trajectories)):
            if value is not None:
                raise ValueError(f"{flag} is for one DATA; with several, every interior timepoint of each is held "
                                 "out in turn (the Python API's leave_one_out takes holdouts per dataset)")
        _evaluate_joint(_load(args), args.seeds, _hparams(args), args.json, args.dataset_embedding)
        return 0
    if args.dataset_embedding:
        raise ValueError("--dataset-embedding needs several DATA (joint training)")
    _evaluate(_load(args), args.holdouts, args.seeds, _hparams(args), args.json, args.plot, args.trajectories)
    return 0


def _in_model_space(model, args):
    """The data's raw features, matched to the model's by name (``Transform.align``) and mapped with
    the model's own transform (its PCA and z-scoring)."""
    if model.transform is None:
        raise ValueError(f"{args.model} carries no data transform; it cannot map new data")
    raw = load_marginals(None if args.data == EMBEDDED else args.data, time_key=args.time_key,
                         embedding=args.embedding, n_components=None, standardize=False,
                         drop_nonfinite=args.drop_nonfinite)
    tr = model.transform
    names = raw.transform.feature_names
    data = [tr.to_model(tr.align(d, names, f"DATA {args.data}")) for d in raw.data]
    return Marginals(data, raw.times, tr, raw.source)


def _same_transform(other, model, path):
    if other.transform is None or not other.transform.same_as(model.transform) or other.dim != model.dim:
        raise ValueError(f"--ensemble {path}: its data transform differs from the first model's; "
                         "an ensemble needs models fitted on one transform (one dataset, one PCA)")
    return other


def _models(args):
    """The saved model and any ``--ensemble`` models (same data transform)."""
    model = load_model(args.model)
    return [model] + [_same_transform(load_model(path), model, path) for path in getattr(args, "ensemble", None) or []]


def cmd_interactions(args):
    """`cellmnn interactions`: gene interactions of a saved model (CSV, heatmap, TRRUST)."""
    if not args.trrust and (args.tfs or args.ensemble):
        raise ValueError(f"{'--tfs' if args.tfs else '--ensemble'} is used only with --trrust")
    files.check_output(args.out, files.TRRUST_REPORT if args.trrust else files.INTERACTIONS, "--out")
    _check_outputs(args)
    models = _models(args)
    model = models[0]
    marginals = _in_model_space(model, args)
    if args.trrust:
        report = trrust_validation(models, marginals, args.trrust, tfs=args.tfs)
        print(report.format())
        report.to_csv(args.out)
        print(f"wrote {len(report.edges)} edges to {args.out}")
        genes = sorted({e["tf"] for e in report.edges} | {e["target"] for e in report.edges})
        pairs = [(e["tf"], e["target"]) for e in report.edges]
    else:
        pairs = None if args.pairs is None else [tuple(p.split(":", 1)) for p in args.pairs]
        if pairs is not None and any(len(p) != 2 for p in pairs):
            raise ValueError("--pairs takes SOURCE:TARGET items")
        agg = None if args.aggregate == "cell" else args.aggregate
        result = gene_interactions(model, marginals, genes=args.genes, pairs=pairs, aggregate=agg, kind=args.kind)
        result.to_csv(args.out)
        print(f"wrote {len(result.pairs)} gene pairs ({args.aggregate}) to {args.out}")
        genes = args.genes or sorted({g for p in pairs for g in p})
        pairs = result.pairs
    if args.heatmap:
        overall = gene_interactions(model, marginals, pairs=pairs, aggregate="all", kind=args.kind)
        plot_heatmap(overall.matrix(genes), genes, args.heatmap,
                     f"mean {'w_(j->i)' if args.kind == 'weight' else 'J_ij'} over all cells")
        print(f"wrote {args.heatmap}")
    return 0


def cmd_predict(args):
    """`cellmnn predict`: push the cells of one timepoint to other times with a saved model."""
    files.check_output(args.out, files.PREDICTIONS, "--out")
    models = _models(args)
    model = models[0]
    marginals = _in_model_space(model, args)
    matches = np.nonzero(np.isclose(marginals.times, args.from_time, rtol=1e-9, atol=0.0))[0]
    if len(matches) == 0:
        raise ValueError(f"--from-time {args.from_time:g} is not a timepoint of the data; times are "
                         f"{[float(t) for t in marginals.times]}")
    x0 = marginals.data[matches[0]]
    each = np.stack([m.predict(x0.astype(np.float32), args.from_time, list(args.to_time)) for m in models])
    if args.features and model.transform is not None:
        each = np.stack([[model.transform.to_features(p[:, j]) for j in range(p.shape[1])] for p in each]
                        ).transpose(0, 2, 1, 3)
    pred = each.mean(axis=0)  # (n, T, D or F)
    spread = np.sqrt(((each - pred) ** 2).sum(axis=-1).mean(axis=0))  # (n, T), in the units written
    names = [f"x{i + 1}" for i in range(pred.shape[2])]
    if args.features and model.transform is not None and model.transform.feature_names:
        names = list(model.transform.feature_names)
    extra = ["spread"] if len(models) > 1 else []
    rows = [[i, args.from_time, t, *[f"{v:.6g}" for v in pred[i, j]], *([f"{spread[i, j]:.6g}"] if extra else [])]
            for j, t in enumerate(args.to_time) for i in range(pred.shape[0])]
    files.write_csv_atomic(args.out, ["cell", "from_time", "time", *names, *extra], rows, files.PREDICTIONS)
    print(f"wrote {pred.shape[0]} cells x {len(args.to_time)} times to {args.out}")
    return 0


def cmd_inflate(args):
    """`cellmnn inflate`: noisy copies of the cells (the paper's scaling protocol)."""
    n_cells, noise_std, seed, _ = check_inflate_args(args.n_cells, args.noise_std, args.seed)
    if not args.out.lower().endswith(".npz"):
        raise ValueError(f"--out must name a .npz file (the TrajectoryNet-style archive load_marginals reads); "
                         f"got {args.out!r}")
    files.check_output(args.out, INFLATED, "--out")
    marginals = _load(args)
    inflated, parents = inflate(marginals, n_cells, noise_std, seed, return_parents=True)
    write_inflated(args.out, inflated, parents, noise_std, seed)
    print(f"inflated {marginals.sizes} to {inflated.sizes} cells (noise_std {noise_std:g} in embedding units, "
          f"seed {seed}); wrote {args.out}")
    return 0


def _read_h5ad(path, what: str = "DATA"):
    """An .h5ad file read into memory (the commands that need ``obs`` annotations read only these)."""
    import anndata

    if not str(path).lower().endswith(".h5ad"):
        raise ValueError(f"{what} must be an .h5ad file (an AnnData with obs annotations); got {path!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path}: no such file")
    return anndata.read_h5ad(path)


def cmd_annotate(args):
    """`cellmnn annotate`: a model's read-outs written into a new .h5ad (the input is never changed)."""
    out = files.check_output(args.out, files.ANNOTATED_H5AD, "--out")
    if not out.lower().endswith(".h5ad"):
        raise ValueError(f"--out must name a .h5ad file; got {args.out!r}")
    if os.path.abspath(args.data) == out or (os.path.exists(out) and os.path.samefile(args.data, out)):
        raise ValueError("--out is the input file; annotate writes a new file and never changes DATA")
    models = _models(args)
    adata = _read_h5ad(args.data)
    annotate(adata, models if len(models) > 1 else models[0], times=args.times, genes=args.genes,
             time_key=args.time_key, embedding=args.embedding, prefix=args.prefix, dataset=args.dataset)
    files.write_atomic(out, files.ANNOTATED_H5AD, adata.write_h5ad, ".h5ad")
    info = adata.uns[args.prefix]
    print(f"annotated {adata.n_obs} cells at {len(info['pred_times'])} times ({', '.join(info['keys']['obsm'])}, "
          f"{', '.join(info['keys']['obs'])}); wrote {out}")
    return 0


def cmd_transitions(args):
    """`cellmnn transitions`: fate probabilities from the groups of one time to those of a later one."""
    files.check_output(args.out, files.TRANSITIONS, "--out")
    _check_outputs(args)
    if args.samples is not None:
        checks.positive_int("--samples", args.samples)
    checks.seed(args.seed, "--seed")
    if bool(args.push or args.pull) != bool(args.weights):
        raise ValueError("--push/--pull need --weights FILE.csv, and --weights needs --push or --pull")
    if args.weights:
        files.check_output(args.weights, files.FATE_WEIGHTS, "--weights")
    if args.weights_plot and not args.weights:
        raise ValueError("--weights-plot needs --push or --pull (and --weights)")
    times = [args.source] + list(args.target)
    if (args.push or args.pull) and len(args.target) > 1:
        raise ValueError("--push/--pull take one --target time")
    models = _models(args)
    model = models if len(models) > 1 else models[0]
    adata = _read_h5ad(args.data)
    tgt_key = args.target_annotation or args.annotation
    couplings = []  # one coupling per pair of times: the table, --push and --pull all read it
    for a, b in zip(times[:-1], times[1:]):
        c = two_times(model, adata, args.annotation, a, b, args.rule, args.k, args.time_key, args.embedding,
                      dataset=args.dataset, target_annotation=args.target_annotation, n_samples=args.samples,
                      seed=args.seed)
        check_labelled(c, args.annotation, tgt_key, bool(args.target_annotation))
        if args.push:
            check_group(c.source_labels, args.push, "--push", c.source_time)
        if args.pull:
            check_group(c.target_labels, args.pull, "--pull", c.target_time)
        couplings.append(c)
    couplings = [couple(c, args.dataset) for c in couplings]
    tables = [transition_table(c, adata, args.annotation, tgt_key) for c in couplings]
    rows = [[g, h, f"{t.loc[g, h]:.6g}", f"{t.attrs['source_time']:g}", f"{t.attrs['target_time']:g}",
             t.attrs["source_counts"][g], args.rule, t.attrs["n_samples"]]
            for t in tables for g in t.index for h in t.columns]
    files.write_csv_atomic(args.out, ["source_group", "target_group", "probability", "source_time", "target_time",
                                      "n_source_cells", "rule", "n_samples"], rows, files.TRANSITIONS)
    for t in tables:
        print(t.round(3).to_string())
    print(f"wrote {len(rows)} group pairs to {args.out}")
    for path, plot in ((args.heatmap, plot_transitions), (args.flow, plot_flow)):
        if path:
            plot(tables, path)
            print(f"wrote {path}")
    if args.push or args.pull:
        _push_pull(args, couplings[0], adata)
    return 0


def _push_pull(args, c, adata):
    """``--push`` / ``--pull`` from the coupling ``c``: per-cell weights into ``--weights`` (CSV) and
    ``--weights-plot``."""
    keys = []
    if args.push:
        push_weights(c, adata, args.annotation, args.push, "cellmnn_push")
        keys.append("cellmnn_push")
    if args.pull:
        pull_weights(c, adata, args.target_annotation or args.annotation, args.pull, "cellmnn_pull")
        keys.append("cellmnn_pull")
    time_key = time_column(adata, args.time_key)
    w = {k: adata.obs[k].to_numpy(dtype=np.float64) for k in keys}
    at = np.flatnonzero(np.isfinite(np.vstack(list(w.values()))).any(axis=0))
    rows = [[adata.obs_names[i], adata.obs[time_key].iloc[i], *("" if not np.isfinite(w[k][i]) else f"{w[k][i]:.6g}"
                                                              for k in keys)] for i in at]
    header = ["cell", "time"] + [f"push_{args.push}" if k == "cellmnn_push" else f"pull_{args.pull}" for k in keys]
    files.write_csv_atomic(args.weights, header, rows, files.FATE_WEIGHTS)
    print(f"wrote {len(rows)} cells' weights to {args.weights}")
    if args.weights_plot:
        plot_weights(adata, keys[0], args.weights_plot, basis=args.basis,
                     title=f"{header[2]}: t = {args.source:g} -> {args.target[0]:g}")
        print(f"wrote {args.weights_plot}")


def _gene_specs(items) -> dict:
    """``--genes`` items GENE=VALUE (clamp) or GENE=scale:FACTOR as ``perturb``'s ``genes``."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--genes takes GENE=VALUE or GENE=scale:FACTOR items; got {item!r}")
        kind, _, number = value.rpartition(":")
        if kind not in ("", "scale", "clamp"):
            raise ValueError(f"--genes {item!r}: the value is a number or scale:FACTOR")
        try:
            v = float(number)
        except ValueError:
            raise ValueError(f"--genes {item!r}: {number!r} is not a number") from None
        if name in out:
            raise ValueError(f"--genes names {name!r} twice")
        out[name] = (kind, v) if kind == "scale" else v
    return out


def cmd_perturb(args):
    """`cellmnn perturb`: genes clamped or scaled along the path, against the unperturbed prediction."""
    genes = _gene_specs(args.genes)
    files.check_output(args.out, files.PERTURBATION, "--out")
    _check_outputs(args)
    models = _models(args)
    adata = _read_h5ad(args.data)
    res = perturb(models if len(models) > 1 else models[0], adata, genes, args.source, args.target,
                  annotation=args.annotation, rule=args.rule, k=args.k, time_key=args.time_key,
                  embedding=args.embedding, dataset=args.dataset, operator=args.operator)
    tr = models[0].transform
    ctrl, pert = tr.to_features(res.control).mean(0), tr.to_features(res.perturbed).mean(0)
    rows = [["gene", g, f"{ctrl[i]:.6g}", f"{pert[i]:.6g}", f"{res.shift[i]:.6g}", f"{res.shift_spread[i]:.6g}"]
            for i, g in enumerate(res.features)]
    if res.fractions is not None:
        rows += [["group", g, f"{r['control']:.6g}", f"{r['perturbed']:.6g}", f"{r['shift']:.6g}", ""]
                 for g, r in res.fractions.iterrows()]
    files.write_csv_atomic(args.out, ["kind", "name", "control", "perturbed", "shift", "spread"], rows,
                           files.PERTURBATION)
    top = np.argsort(-np.abs(res.shift))[:10]
    print(f"{len(res.cells)} cells from t = {res.source:g} to {res.target:g} with {genes}; largest mean shifts:")
    print("\n".join(f"  {res.features[i]:<16} {res.shift[i]:+.4g} (spread {res.shift_spread[i]:.2g})" for i in top))
    if res.fractions is not None:
        print(res.fractions.round(3).to_string())
    print(f"wrote {len(rows)} rows to {args.out}")
    if args.plot:
        plot_perturbation(res, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _h5ad_command_args(p, data_help: str, ensemble_help: str):
    """The arguments shared by the commands that read a saved model and an .h5ad (annotate,
    transitions, perturb): MODEL, DATA, --time-key, --embedding, --dataset, --ensemble."""
    p.add_argument("model", help="a model directory written by `cellmnn fit`")
    p.add_argument("data", help=data_help)
    p.add_argument("--time-key", default=None)
    p.add_argument("--embedding", default=None)
    p.add_argument("--dataset", type=int, default=None, help="joint models with a dataset embedding: the dataset")
    p.add_argument("--ensemble", nargs="+", default=None, metavar="MODEL", help=ensemble_help)


def _add_perturb(sub):
    p = sub.add_parser("perturb", help="clamp or scale genes along the path; shifts of genes and group fractions")
    _h5ad_command_args(p, "an .h5ad with the model's raw features and times",
                       "more saved models (same data transform): member-wise, averaged, with their spread")
    p.add_argument("--genes", nargs="+", required=True, metavar="GENE=VALUE",
                   help="GENE=VALUE clamps the gene at VALUE (feature units; 0 knocks it out); GENE=scale:F holds "
                        "it at F times each cell's own value")
    p.add_argument("--source", type=float, required=True, help="the time of the cells pushed")
    p.add_argument("--target", type=float, required=True, help="the later time they are pushed to")
    p.add_argument("--annotation", default=None, help="obs column: also the shift in group fractions at --target")
    p.add_argument("--rule", choices=RULES, default="knn")
    p.add_argument("--k", type=int, default=15)
    p.add_argument("--out", required=True, help="CSV to write (one row per gene, and per group)")
    p.add_argument("--plot", default=None, help="PNG of the largest gene shifts (and of the group fractions)")
    p.add_argument("--operator", choices=OPERATORS, default="observed",
                   help="where A is read: each cell as observed (default), moved onto the clamp, or the source "
                        "cells' mean operator for every cell")
    p.set_defaults(func=cmd_perturb)


def _add_annotate(sub):
    p = sub.add_parser("annotate", help="a model's read-outs written into a new .h5ad (never changes DATA)")
    _h5ad_command_args(p, "an .h5ad with the model's raw features (X or --embedding) and times",
                       "more saved models (same data transform): means and the per-cell spread of predictions")
    p.add_argument("--out", required=True, help="the annotated .h5ad to write (a new file)")
    p.add_argument("--times", type=float, nargs="+", default=None,
                   help="times to predict every cell at (default: the model's timepoints)")
    p.add_argument("--genes", nargs="+", default=None, help="genes whose pairwise interaction weights to record")
    p.add_argument("--prefix", default="cellmnn", help="start of every key written (default cellmnn)")
    p.set_defaults(func=cmd_annotate)


def _add_transitions(sub):
    p = sub.add_parser("transitions", help="fate probabilities between the groups of two times (CSV, figures)")
    _h5ad_command_args(p, "an .h5ad with the model's raw features, times and the group annotation",
                       "more saved models (same data transform) whose couplings are averaged")
    p.add_argument("--annotation", required=True, help="obs column naming each cell's group")
    p.add_argument("--target-annotation", default=None, help="another obs column for the groups at --target")
    p.add_argument("--source", type=float, required=True, help="the earlier time")
    p.add_argument("--target", type=float, nargs="+", required=True,
                   help="the later time; several: the transitions between consecutive times, in one CSV and figure")
    p.add_argument("--rule", choices=RULES, default="knn",
                   help="how pushed cells meet observed ones: k nearest (default) or an exact OT match")
    p.add_argument("--k", type=int, default=15, help="neighbours per pushed cell with --rule knn")
    p.add_argument("--samples", type=int, default=None,
                   help=f"draws per source cell from a stochastic model (default {FATE_SAMPLES}; deterministic: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first draw (stochastic models)")
    p.add_argument("--out", required=True, help="CSV to write (one row per pair of groups)")
    p.add_argument("--heatmap", default=None, help="PNG heatmap of the table")
    p.add_argument("--flow", default=None,
                   help="PNG sankey-style flow between the times (several --target: one diagram through every time)")
    p.add_argument("--push", default=None, metavar="GROUP", help="also: where the cells of GROUP at --source go")
    p.add_argument("--pull", default=None, metavar="GROUP", help="also: where the cells of GROUP at --target came from")
    p.add_argument("--weights", default=None, help="with --push/--pull: CSV of the per-cell weights")
    p.add_argument("--weights-plot", default=None, help="with --push/--pull: PNG of the cells coloured by weight")
    p.add_argument("--basis", default=None, help="obsm key for --weights-plot (default: the first two columns of X)")
    p.set_defaults(func=cmd_transitions)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    ap = argparse.ArgumentParser(prog="cellmnn", description="Cell-MNN: learn cell dynamics from snapshots.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="leave-one-out on the embedded A549 EMT data, with a figure")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--json", default=None, help="write the table as JSON")
    p.add_argument("--plot", default="cellmnn_demo.png", help="PNG of predicted vs observed held-out cells")
    p.add_argument("--trajectories", default="cellmnn_trajectories.png",
                   help="PNG of the observed populations (density contours) and cells pushed through every time")
    _train_args(p, max_epochs=300)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("fit", help="train one model and save it")
    _data_args(p, joint=True)
    p.add_argument("--holdout", nargs="+", default=None, metavar="K",
                   help="index of an interior timepoint to leave out; with several DATA one per dataset ('none' "
                        "for none)")
    p.add_argument("--seed", type=int, default=0)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="model directory to write (holds a checkpoint while training)")
    where.add_argument("--resume", metavar="DIR",
                       help="continue the killed run whose --out was DIR (same data and flags)")
    _train_args(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("evaluate", help="leave-one-out: Cell-MNN beside OT-interpolate (exact W1, MMD)")
    _data_args(p, joint=True)
    p.add_argument("--holdouts", type=int, nargs="+", default=None, help="interior indices (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--json", default=None, help="write the table as JSON")
    p.add_argument("--plot", default=None, help="PNG of predicted vs observed held-out cells")
    p.add_argument("--trajectories", default=None,
                   help="PNG of the observed populations and cells pushed through every time (one model)")
    _train_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="push the cells of one timepoint to other times with a saved model")
    _model_data_args(p)
    p.add_argument("--from-time", type=float, required=True)
    p.add_argument("--to-time", type=float, nargs="+", required=True)
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--features", action="store_true", help="write feature space (undo z-score and PCA)")
    p.add_argument("--ensemble", nargs="+", default=None, metavar="MODEL",
                   help="more saved models (same data transform): the mean prediction and a spread column (root "
                        "mean square distance of the members' predictions from it)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("interactions", help="gene interactions of a saved model (CSV, heatmap, TRRUST check)")
    _model_data_args(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--genes", nargs="+", help="a block of genes: every ordered pair among them")
    which.add_argument("--pairs", nargs="+", help="SOURCE:TARGET gene pairs")
    which.add_argument("--trrust", help="a TRRUST TSV: sign validation of its Activation/Repression edges")
    p.add_argument("--tfs", nargs="+", default=None, help="with --trrust: only these TFs")
    p.add_argument("--ensemble", nargs="+", default=None, metavar="MODEL",
                   help="with --trrust: more saved models (same data transform) whose weights are averaged")
    p.add_argument("--aggregate", choices=("timepoint", "all", "cell"), default="timepoint")
    p.add_argument("--kind", choices=("weight", "jacobian", "velocity_jacobian"), default="weight")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--heatmap", default=None, help="PNG heatmap of the mean over all cells")
    p.set_defaults(func=cmd_interactions)

    p = sub.add_parser("inflate", help="add noisy copies of the cells (the paper's scaling protocol); writes .npz")
    _data_args(p)
    p.add_argument("--n-cells", type=int, required=True,
                   help="total cells after inflating (at least the data's; split over timepoints by size)")
    p.add_argument("--noise-std", type=float, default=0.1,
                   help="std of the Gaussian noise of a copy, in embedding units before z-scoring (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help=".npz to write (pcs, sample_labels: reads back with load_marginals)")
    p.set_defaults(func=cmd_inflate)
    _add_annotate(sub)
    _add_transitions(sub)
    _add_perturb(sub)
    return ap


def _report(line):
    """Write one line to stderr in a single write, so that ranks sharing a pipe never interleave it."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _describe(exc: BaseException) -> str:
    """A one-line account of an error: OS errors with their file, others with their message."""
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    return " ".join(str(exc).split()) or type(exc).__name__


_RANK = 0  # this process's rank under torchrun (0 alone)
DATA_PARALLEL = ("fit", "evaluate")


def _init_distributed(args):
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (nccl when training on CUDA,
    one device per local rank; gloo on CPU) and return True."""
    global _RANK
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if args.command not in DATA_PARALLEL:
        raise ValueError(f"only {' and '.join(DATA_PARALLEL)} run data-parallel; run `cellmnn {args.command}` "
                         "without torchrun")
    dev = resolve_device(args.device or "cpu")
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    _RANK = dist.get_rank()
    return True


def main(argv=None) -> int:
    """Run the command line; every failure is one line on stderr and a non-zero exit code
    (2 for bad input, 1 for anything unexpected; ``CELLMNN_TRACEBACK=1`` shows the traceback)."""
    args = build_parser().parse_args(argv)
    distributed = False
    try:
        distributed = _init_distributed(args)
        return args.func(args)
    except KeyboardInterrupt:
        _report(f"cellmnn {args.command}: interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - the command line reports every failure in one line
        if os.environ.get("CELLMNN_TRACEBACK") == "1":
            raise
        expected = isinstance(exc, (ValueError, TypeError, OSError, FloatingPointError, LookupError))
        hint = "" if expected else f" ({type(exc).__name__}; set CELLMNN_TRACEBACK=1 to see where)"
        _report(f"cellmnn {args.command}: error: {_describe(exc)}{hint}")
        return 2 if expected else 1
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
