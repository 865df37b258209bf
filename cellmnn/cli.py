"""The ``cellmnn`` command line.

    cellmnn demo [--out DIR]                      leave-one-out on the embedded A549 EMT data
    cellmnn fit DATA --holdout K --out DIR        train one model and save it (--resume DIR continues a killed run)
    cellmnn evaluate DATA [--json FILE]           leave-one-out, Cell-MNN beside OT-interpolate
    cellmnn predict MODEL DATA --from-time T0 --to-time T1 [T2 ...] --out FILE.csv
    cellmnn interactions MODEL DATA (--genes G ... | --pairs S:T ... | --trrust TSV [--ensemble MODEL ...])
        --out FILE.csv
    cellmnn inflate DATA --n-cells N --out FILE.npz   noisy copies of the cells (the paper's scaling protocol)

DATA is a .h5ad, .npz or .csv file, or ``emt-a549`` for the embedded dataset.

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
from .analysis.interactions import gene_interactions
from .analysis.trrust import trrust_validation
from .data.inflate import INFLATED, check_inflate_args, inflate, write_inflated
from .data.load import load_marginals
from .data.marginals import Marginals
from .evaluate import leave_one_out, ot_interpolate
from .model.persist import check_model_destination, load_model, save_model
from .plots import plot_heatmap, plot_holdouts
from .train import HParams, check_select, fit, resolve_device

EMBEDDED = "emt-a549"


def _data_args(p):
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
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _hparams(args) -> dict:
    names = ["parameterization", "num_const_dims", "width", "depth", "init_scale", "lr", "weight_decay",
             "batch_size", "gamma", "sigma", "velocity_weight", "kinetic", "max_epochs", "check_every", "patience",
             "val_fraction", "max_val_cells", "backend", "device"]
    hp = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.select:
        hp["select"] = args.select
    if args.select_on_holdout:
        hp["select_on_holdout"] = True
    hp["verbose"] = not args.quiet
    return hp


def _load(args):
    source = None if args.data == EMBEDDED else args.data
    return load_marginals(source, time_key=args.time_key, embedding=args.embedding,
                          n_components=args.n_components, standardize=not args.no_standardize,
                          drop_nonfinite=args.drop_nonfinite, backed=getattr(args, "backed", False))


def _evaluate(marginals, holdouts, seeds, hp, json_path=None, plot_path=None):
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
    return result


def _check_outputs(args):
    """Every output path of the command, checked before any work (``files.check_output``)."""
    for attr, kind in (("json", files.LOO_JSON), ("plot", files.FIGURE), ("heatmap", files.FIGURE)):
        if getattr(args, attr, None):
            files.check_output(getattr(args, attr), kind, f"--{attr}")


def cmd_demo(args):
    """`cellmnn demo`: leave-one-out on the embedded EMT data (short), with a figure."""
    _check_outputs(args)
    marginals = load_marginals()
    hp = _hparams(args)
    print(f"Leave-one-out on the embedded A549 EMT time course (seeds {args.seeds}, at most "
          f"{hp['max_epochs']} epochs per model; `cellmnn evaluate {EMBEDDED}` runs the full protocol).")
    _evaluate(marginals, None, args.seeds, hp, args.json, args.plot)
    return 0


def cmd_fit(args):
    """`cellmnn fit`: train one model and save it (``--resume`` continues a killed run)."""
    out, flag = (args.out, "--out") if args.out else (args.resume, "--resume")
    hp = _hparams(args)
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
        model = fit(marginals, holdout=args.holdout, seed=args.seed, checkpoint=ckpt, **hp)
    except BaseException:
        if created and os.path.isdir(path) and not os.listdir(path):  # ours, and nothing was written in it
            os.rmdir(path)
        raise
    if _RANK == 0:
        save_model(model, path)
        files.remove_checkpoint(ckpt)
        info = model.fit_info
        print(f"trained on {marginals} (holdout {args.holdout}): {info.epochs} epochs, best validation "
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
    _evaluate(_load(args), args.holdouts, args.seeds, _hparams(args), args.json, args.plot)
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


def cmd_interactions(args):
    """`cellmnn interactions`: gene interactions of a saved model (CSV, heatmap, TRRUST)."""
    if not args.trrust and (args.tfs or args.ensemble):
        raise ValueError(f"{'--tfs' if args.tfs else '--ensemble'} is used only with --trrust")
    files.check_output(args.out, files.TRRUST_REPORT if args.trrust else files.INTERACTIONS, "--out")
    _check_outputs(args)
    model = load_model(args.model)
    marginals = _in_model_space(model, args)
    if args.trrust:
        models = [model] + [_same_transform(load_model(path), model, path) for path in args.ensemble or []]
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
    model = load_model(args.model)
    marginals = _in_model_space(model, args)
    matches = np.nonzero(np.isclose(marginals.times, args.from_time, rtol=1e-9, atol=0.0))[0]
    if len(matches) == 0:
        raise ValueError(f"--from-time {args.from_time:g} is not a timepoint of the data; times are "
                         f"{[float(t) for t in marginals.times]}")
    x0 = marginals.data[matches[0]]
    pred = model.predict(x0.astype(np.float32), args.from_time, list(args.to_time))  # (n, T, D)
    if args.features and model.transform is not None:
        pred = np.stack([model.transform.to_features(pred[:, j]) for j in range(pred.shape[1])], axis=1)
    names = [f"x{i + 1}" for i in range(pred.shape[2])]
    if args.features and model.transform is not None and model.transform.feature_names:
        names = list(model.transform.feature_names)
    rows = [[i, args.from_time, t, *[f"{v:.6g}" for v in pred[i, j]]]
            for j, t in enumerate(args.to_time) for i in range(pred.shape[0])]
    files.write_csv_atomic(args.out, ["cell", "from_time", "time", *names], rows, files.PREDICTIONS)
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    ap = argparse.ArgumentParser(prog="cellmnn", description="Cell-MNN: learn cell dynamics from snapshots.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="leave-one-out on the embedded A549 EMT data, with a figure")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--json", default=None, help="write the table as JSON")
    p.add_argument("--plot", default="cellmnn_demo.png", help="PNG of predicted vs observed held-out cells")
    _train_args(p, max_epochs=300)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("fit", help="train one model and save it")
    _data_args(p)
    p.add_argument("--holdout", type=int, default=None, help="index of an interior timepoint to leave out")
    p.add_argument("--seed", type=int, default=0)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="model directory to write (holds a checkpoint while training)")
    where.add_argument("--resume", metavar="DIR",
                       help="continue the killed run whose --out was DIR (same data and flags)")
    _train_args(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("evaluate", help="leave-one-out: Cell-MNN beside OT-interpolate (exact W1, MMD)")
    _data_args(p)
    p.add_argument("--holdouts", type=int, nargs="+", default=None, help="interior indices (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--json", default=None, help="write the table as JSON")
    p.add_argument("--plot", default=None, help="PNG of predicted vs observed held-out cells")
    _train_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="push the cells of one timepoint to other times with a saved model")
    _model_data_args(p)
    p.add_argument("--from-time", type=float, required=True)
    p.add_argument("--to-time", type=float, nargs="+", required=True)
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--features", action="store_true", help="write feature space (undo z-score and PCA)")
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
    return ap


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
        print(f"cellmnn {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the command line reports every failure in one line
        if os.environ.get("CELLMNN_TRACEBACK") == "1":
            raise
        expected = isinstance(exc, (ValueError, TypeError, OSError, FloatingPointError, LookupError))
        hint = "" if expected else f" ({type(exc).__name__}; set CELLMNN_TRACEBACK=1 to see where)"
        print(f"cellmnn {args.command}: error: {_describe(exc)}{hint}", file=sys.stderr)
        return 2 if expected else 1
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
