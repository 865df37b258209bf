"""Saving and loading trained models: a directory with ``config.json`` and ``weights.pt``.

Writes are atomic: files go to a temporary sibling first and replace the target in one rename, so
a crash leaves either the old model or the new one, never a mixture.  Loading needs no training
data and refuses corrupt or incompatible directories with a clear error.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from .data import Transform
from .model import CellMNN

FORMAT = "cellmnn-model"
VERSION = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp: str, path: str, directory: bool = False) -> None:
    """Give a finished temporary file (or directory) ordinary permissions and move it into place.

    ``tempfile`` creates private (0600/0700) entries; a published result gets the mode that a
    plain ``open``/``mkdir`` would have given it under the current umask."""
    os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())
    os.replace(tmp, path)


def write_text_atomic(path: str, text: str) -> None:
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_csv_atomic(path: str, header, rows) -> None:
    """A CSV (``header`` then ``rows``) written to a temporary sibling and moved into place."""
    import csv

    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".csv", dir=parent)
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)
        publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model(model: CellMNN, path: str) -> str:
    """Write ``model`` (and the data transform and times it was fitted with) to directory ``path``."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    info = getattr(model, "fit_info", None)
    config = {
        "format": FORMAT, "version": VERSION, "model": model.config(),
        "data": getattr(model, "marginals_info", None),
        "training": None if info is None else {
            "holdout": info.holdout, "seed": info.seed, "epochs": info.epochs, "best_epoch": info.best_epoch,
            "best_score": info.best_score if info.best_score != float("inf") else None,
            "hparams": {k: v for k, v in info.hparams.items()}},
    }
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump(config, fh, indent=1)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, os.path.join(tmp, "weights.pt"))
        for name in ("config.json", "weights.pt"):
            os.chmod(os.path.join(tmp, name), 0o666 & ~_umask())
        if os.path.isdir(path):
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
            publish(tmp, path, directory=True)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if os.path.exists(path):
                raise FileExistsError(f"{path} exists and is not a model directory")
            publish(tmp, path, directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_model(path: str, device="cpu") -> CellMNN:
    """Read a model saved by ``save_model``; ``model.transform``, ``model.times`` and
    ``model.training_info`` (holdout, seed, epochs, hyperparameters) come with it."""
    path = os.fspath(path)
    cfg_path, w_path = os.path.join(path, "config.json"), os.path.join(path, "weights.pt")
    if not os.path.isdir(path) or not os.path.exists(cfg_path) or not os.path.exists(w_path):
        raise FileNotFoundError(f"{path} is not a saved Cell-MNN model (needs config.json and weights.pt)")
    try:
        with open(cfg_path) as fh:
            config = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg_path} is corrupt: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} is not a Cell-MNN model config (format {config.get('format')!r})"
                         if isinstance(config, dict) else f"{cfg_path} is not a Cell-MNN model config")
    if config.get("version") != VERSION:
        raise ValueError(f"{path} was saved in format version {config.get('version')}; this cellmnn reads {VERSION}")
    try:
        model = CellMNN(**config["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{cfg_path} has an invalid model section: {exc}") from None
    try:
        state = torch.load(w_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged files
        raise ValueError(f"{w_path} is corrupt or not a weights file: {exc}") from None
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ValueError(f"{w_path} does not fit the model in config.json: {str(exc).splitlines()[0]}") from None
    data = config.get("data") or {}
    model.transform = Transform.from_dict(data["transform"]) if data.get("transform") else None
    model.times = data.get("times")
    model.marginals_info = data or None
    model.training_info = config.get("training")
    return model.to(device).eval()
