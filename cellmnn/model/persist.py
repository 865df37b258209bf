"""Saving and loading models: a model folder that a crash at any instant leaves loadable.

A save writes the new ``config.json`` and ``weights.pt`` to a temporary folder inside the model
directory, renames it to ``.commit`` (the commit point) and then moves its files over the old
ones.  ``load_model`` prefers what ``.commit`` holds, so a process killed at any instant leaves
the old or the new model loadable; the next save finishes or removes what a killed one left.
``config.json`` carries the SHA-256 of ``weights.pt``, checked on load.  A model is saved only
into a new folder, an empty one or an earlier save (``check_model_destination``).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile

import torch

from .. import checks
from ..checks import warn
from ..data.marginals import Transform
from ..files import (
    CHECKPOINT,
    CHECKPOINT_SUFFIX,
    PROBE_PREFIX,
    TMP_PREFIX,
    as_path,
    check_dir_writable,
    file_mode,
    is_checkpoint,
)
from .network import CellMNN

FORMAT = "cellmnn-model"
VERSION = 2  # 2: weights checksum and the .commit journal; 1 is still read
MODEL_FILES = ("config.json", "weights.pt")
COMMIT = ".commit"


# ----------------------------------------------------------------------------- models

def _is_leftover(path: str) -> bool:
    """What an interrupted save leaves: a ``.tmp-*`` folder holding only model files, or a probe."""
    name = os.path.basename(path)
    if os.path.islink(path):
        return False
    if name.startswith(PROBE_PREFIX) or name.startswith(TMP_PREFIX) and name.endswith(CHECKPOINT_SUFFIX):
        return os.path.isfile(path)
    return name.startswith(TMP_PREFIX) and os.path.isdir(path) and set(os.listdir(path)) <= set(MODEL_FILES)


def _model_config(path: str):
    """The model config that ``load_model`` would read in ``path`` (``.commit`` first), or None."""
    for cfg in (os.path.join(path, COMMIT, "config.json"), os.path.join(path, "config.json")):
        if os.path.isfile(cfg):
            try:
                with open(cfg, encoding="utf-8") as fh:
                    config = json.load(fh)
            except (OSError, ValueError):
                return None
            return config if isinstance(config, dict) and config.get("format") == FORMAT else None
    return None


def _model_dir_state(path: str) -> str:
    """"model" (a save of ours, possibly interrupted), "empty" or "other"."""
    entries = os.listdir(path)
    if not entries:
        return "empty"
    for name in entries:
        full = os.path.join(path, name)
        if name in MODEL_FILES and os.path.isfile(full) or _is_leftover(full):
            continue
        if name == COMMIT and os.path.isdir(full) and set(os.listdir(full)) <= set(MODEL_FILES):
            continue
        if name == CHECKPOINT and os.path.isfile(full) and is_checkpoint(full):
            continue
        return "other"
    if _model_config(path) is not None:
        return "model"
    # Only leftovers of a first save that was killed before its commit: ours, nothing to lose.
    return "model" if not any(n in MODEL_FILES or n == COMMIT for n in entries) else "other"


def check_model_destination(path) -> str:
    """Check before training that a model can be saved at ``path``: absent (it will be created),
    an empty folder, or a model saved by cellmnn.  Returns the absolute path."""
    path = as_path(path, "model path")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise FileExistsError(f"model path {path} exists and is not a folder; refusing to replace it")
    if os.path.isdir(path):
        if _model_dir_state(path) == "other":
            raise FileExistsError(f"model path {path} is a folder that does not hold a saved Cell-MNN model "
                                  "(only config.json and weights.pt); refusing to replace it (choose a new or "
                                  "empty folder)")
        check_dir_writable(path, path)
    else:
        check_dir_writable(os.path.dirname(path), path)
    return path


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _roll_forward(path: str) -> None:
    """Move a committed save (``.commit``) over the model files; idempotent."""
    commit = os.path.join(path, COMMIT)
    if not os.path.isdir(commit):
        return
    for name in MODEL_FILES:  # weights first: until config.json moves, .commit's config is the one read
        if os.path.exists(os.path.join(commit, name)):
            os.replace(os.path.join(commit, name), os.path.join(path, name))
    os.rmdir(commit)
    _fsync_dir(path)


def _recover(path: str) -> None:
    """Finish what an interrupted save left: roll a commit forward, remove temporary folders."""
    _roll_forward(path)
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if _is_leftover(full):
            shutil.rmtree(full) if os.path.isdir(full) else os.unlink(full)


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(path, file_mode())


def save_model(model: CellMNN, path) -> str:
    """Write ``model`` (and the data transform and times it was fitted with) to folder ``path``.

    ``path`` must be new, an empty folder or an earlier save (``check_model_destination``); a
    crash at any instant leaves the old or the new model loadable (module docstring).
    """
    if not isinstance(model, CellMNN):
        raise TypeError(f"model must be a CellMNN, got {type(model).__name__}")
    path = check_model_destination(path)
    info = getattr(model, "fit_info", None)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    weights = buf.getvalue()
    config = {
        "format": FORMAT, "version": VERSION, "model": model.config(),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "data": getattr(model, "marginals_info", None),
        "training": None if info is None else {
            "holdout": info.holdout, "seed": info.seed, "epochs": info.epochs, "best_epoch": info.best_epoch,
            "best_score": info.best_score if info.best_score != float("inf") else None,
            "hparams": info.hparams.to_dict() if hasattr(info.hparams, "to_dict") else dict(info.hparams),
            "selection": [dict(r, inner_W1={str(k): v for k, v in r["inner_W1"].items()}) for r in info.selection]
            if info.selection else None},
    }
    text = json.dumps(config, indent=1).encode("utf-8")
    try:
        os.makedirs(path, exist_ok=True)
        _recover(path)
        tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=path)
        _write_file(os.path.join(tmp, "weights.pt"), weights)
        _write_file(os.path.join(tmp, "config.json"), text)
        os.rename(tmp, os.path.join(path, COMMIT))  # the commit point
        _fsync_dir(path)
        _roll_forward(path)
    except OSError as exc:
        raise type(exc)(f"cannot save the model to {path}: {exc.strerror or exc}") from None
    return path



def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_model(path, device="cpu") -> CellMNN:
    """Read a model saved by ``save_model``; ``model.transform``, ``model.times`` and
    ``model.training_info`` (holdout, seed, epochs, hyperparameters) come with it.  Corrupt,
    incompatible or tampered saves (weights checksum) are refused with a ValueError."""
    path = as_path(path, "model path")
    device = checks.device(device)
    commit = os.path.join(path, COMMIT)
    cfg_path, w_path = (os.path.join(commit if os.path.isfile(os.path.join(commit, name)) else path, name)
                        for name in MODEL_FILES)
    if not os.path.isdir(path) or not os.path.isfile(cfg_path) or not os.path.isfile(w_path):
        raise FileNotFoundError(f"{path} is not a saved Cell-MNN model (needs config.json and weights.pt)")
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg_path} is corrupt: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} is not a Cell-MNN model config (format {config.get('format')!r})"
                         if isinstance(config, dict) else f"{cfg_path} is not a Cell-MNN model config")
    if config.get("version") not in (1, VERSION):
        raise ValueError(f"{path} was saved in format version {config.get('version')}; this cellmnn reads 1 "
                         f"and {VERSION}")
    if config["version"] >= 2:
        expected = config.get("weights_sha256")
        if not isinstance(expected, str) or _sha256(w_path) != expected:
            raise ValueError(f"{w_path} does not match the checksum in {cfg_path}: the weights are corrupt "
                             "or from another save")
    else:
        warn(f"{path} was saved without a weights checksum (format version 1); save it again to add one")
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
    if not all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point()):
        raise ValueError(f"{w_path} holds NaN or Inf weights")
    data = config.get("data") or {}
    if not isinstance(data, dict):
        raise ValueError(f"{cfg_path} has an invalid data section: expected an object (times, transform, source), "
                         f"got {type(data).__name__} {str(data)[:40]!r}")
    training = config.get("training")
    if training is not None and not isinstance(training, dict):
        raise ValueError(f"{cfg_path} has an invalid training section: expected an object, got "
                         f"{type(training).__name__}")
    try:
        model.transform = Transform.from_dict(data["transform"]) if data.get("transform") else None
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{cfg_path} has an invalid data transform: {exc}") from None
    if model.transform is not None:
        n_out = len(model.transform.mean)
        if n_out != model.dim:
            raise ValueError(f"{cfg_path}: the data transform maps to {n_out} dimensions but the model has "
                             f"{model.dim}")
    model.times = data.get("times")
    model.marginals_info = data or None
    model.training_info = training
    return model.to(device).eval()
