"""Saving and loading models, and writing every output file, without ever losing a user's file.

Guarantees (README, "Files"):

* A write replaces only an earlier output of the same kind, recognised by its own content (a model
  directory by its ``config.json``, a CSV by its header, a JSON by its ``format`` field, a figure
  by the PNG's ``Software`` text); anything else at the path is refused with a clear error and
  left untouched.  Destinations are checked (``check_output``, ``check_model_destination``)
  before any long work, by creating and removing a probe file where the output will go.
* Files are written to a temporary sibling and moved into place with one rename.
* A model save is crash-safe: the new ``config.json`` and ``weights.pt`` are written to a
  temporary folder inside the model directory, which is renamed to ``.commit`` (the commit
  point), and then moved over the old files.  ``load_model`` prefers what ``.commit`` holds, so
  a process killed at any instant leaves the old or the new model loadable; the next save
  finishes or removes what a killed one left.  ``config.json`` carries the SHA-256 of
  ``weights.pt``, checked on load.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .data import Transform
from .model import CellMNN

FORMAT = "cellmnn-model"
VERSION = 2  # 2: weights checksum and the .commit journal; 1 is still read
MODEL_FILES = ("config.json", "weights.pt")
COMMIT = ".commit"
TMP_PREFIX = ".tmp-"
PROBE_PREFIX = ".cellmnn-probe-"
CHECKPOINT = "checkpoint.pt"  # a training checkpoint, in a model folder while `cellmnn fit` runs
CHECKPOINT_FORMAT = "cellmnn-checkpoint"
CHECKPOINT_SUFFIX = ".checkpoint"  # of the temporary file a checkpoint is written to


# ----------------------------------------------------------------------------- output kinds

@dataclass(frozen=True)
class OutputKind:
    """A kind of output file and how an earlier file of that kind is recognised."""
    name: str
    recognise: Callable[[str], bool]


def _first_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            return fh.readline(4096).rstrip("\r\n")
    except (OSError, UnicodeDecodeError):
        return ""


def _csv_with_header(*prefixes: str) -> Callable[[str], bool]:
    return lambda path: _first_line(path).startswith(prefixes)


def _json_with_format(fmt: str, legacy_keys: tuple = ()) -> Callable[[str], bool]:
    def recognise(path):
        try:
            with open(path, encoding="utf-8") as fh:
                obj = json.load(fh)
        except (OSError, ValueError):
            return False
        return isinstance(obj, dict) and (obj.get("format") == fmt or
                                          bool(legacy_keys) and set(legacy_keys) <= set(obj))
    return recognise


def png_software(path: str) -> str:
    """The ``Software`` text of a PNG file ("" if none or not a PNG)."""
    try:
        with open(path, "rb") as fh:
            if fh.read(8) != b"\x89PNG\r\n\x1a\n":
                return ""
            while True:
                head = fh.read(8)
                if len(head) < 8:
                    return ""
                size, kind = int.from_bytes(head[:4], "big"), head[4:]
                if kind == b"tEXt" and size < 65536:
                    key, _, value = fh.read(size).partition(b"\x00")
                    if key == b"Software":
                        return value.decode("latin-1")
                    fh.seek(4, os.SEEK_CUR)
                elif kind == b"IEND":
                    return ""
                else:
                    fh.seek(size + 4, os.SEEK_CUR)
    except OSError:
        return ""


SOFTWARE = "cellmnn"  # the PNG Software text of our figures starts with this
PREDICTIONS = OutputKind("predictions CSV", _csv_with_header("cell,from_time,time,"))
INTERACTIONS = OutputKind("gene interactions CSV", _csv_with_header("source,target,", "cell,time,source,target,"))
TRRUST_REPORT = OutputKind("TRRUST report CSV", _csv_with_header("tf,target,mode,score,"))
LOO_JSON = OutputKind("leave-one-out JSON", _json_with_format("cellmnn-leave-one-out", ("rows", "summary")))
FIGURE = OutputKind("cellmnn figure (PNG)", lambda path: png_software(path).startswith(SOFTWARE))


def json_kind(fmt: str, legacy_keys: tuple = ()) -> OutputKind:
    """The kind of a JSON document carrying ``"format": fmt`` (or, written before that field
    existed, all of ``legacy_keys``)."""
    return OutputKind(f"{fmt} JSON", _json_with_format(fmt, legacy_keys))


# ----------------------------------------------------------------------------- checks

def _as_path(path, what: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path (str or os.PathLike), got {type(path).__name__}")
    raw = os.fspath(path)
    if not raw.strip():
        raise ValueError(f"{what} is empty; give a file or folder name")
    return os.path.abspath(raw)


def _check_dir_writable(folder: str, target: str) -> None:
    """``folder`` exists or can be created, and files can be created in it (a probe file is made
    and removed in the nearest existing folder)."""
    probe_in = folder
    while not os.path.exists(probe_in):
        parent = os.path.dirname(probe_in)
        if parent == probe_in:
            break
        probe_in = parent
    if not os.path.isdir(probe_in):
        raise NotADirectoryError(f"cannot write {target}: {probe_in} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=probe_in)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PermissionError(f"cannot write {target}: {probe_in} is not writable ({exc.strerror})") from None


def check_output(path, kind: OutputKind, what: str = "output path") -> str:
    """Check before any work that a ``kind`` file can be written at ``path``: not a folder, the
    folder writable, and any existing file an earlier ``kind`` output.  Returns the absolute path."""
    path = _as_path(path, what)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path} is a folder; give a file name for the {kind.name}")
    if os.path.lexists(path):
        if not os.path.isfile(path):
            raise FileExistsError(f"{what} {path} exists and is not a regular file; refusing to replace it")
        if not kind.recognise(path):
            raise FileExistsError(f"{what} {path} exists and is not a {kind.name} written by cellmnn; refusing "
                                  "to overwrite it (choose another path or remove the file)")
    _check_dir_writable(os.path.dirname(path), path)
    return path


def _write_atomic(path, kind: OutputKind, write: Callable, suffix: str = "") -> str:
    """Check ``path`` (``check_output``), call ``write(tmp)`` on a temporary sibling and move it
    into place with ordinary permissions; errors name ``path``, never the temporary file."""
    path = check_output(path, kind)
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=parent)
        os.close(fd)
    except OSError as exc:
        raise type(exc)(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        publish(tmp, path)
    except OSError as exc:
        raise type(exc)(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp: str, path: str) -> None:
    """Give a finished temporary file the mode a plain ``open`` would have given it and move it
    into place (``tempfile`` makes private 0600 files)."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def write_text_atomic(path, text: str, kind: OutputKind) -> str:
    """``text`` (UTF-8) written atomically to ``path``, replacing only an earlier ``kind`` file."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    return _write_atomic(path, kind, write)


def write_csv_atomic(path, header, rows, kind: OutputKind) -> str:
    """A CSV (``header`` then ``rows``) written atomically, replacing only an earlier ``kind`` file."""
    import csv

    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)
    return _write_atomic(path, kind, write, ".csv")


def save_figure(fig, path) -> str:
    """A matplotlib figure as PNG, marked as ours (``Software``), written atomically."""
    from . import __version__

    return _write_atomic(path, FIGURE, lambda tmp: fig.savefig(
        tmp, dpi=120, format="png", metadata={"Software": f"{SOFTWARE} {__version__} (matplotlib)"}), ".png")


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
    path = _as_path(path, "model path")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise FileExistsError(f"model path {path} exists and is not a folder; refusing to replace it")
    if os.path.isdir(path):
        if _model_dir_state(path) == "other":
            raise FileExistsError(f"model path {path} is a folder that does not hold a saved Cell-MNN model "
                                  "(only config.json and weights.pt); refusing to replace it (choose a new or "
                                  "empty folder)")
        _check_dir_writable(path, path)
    else:
        _check_dir_writable(os.path.dirname(path), path)
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
    os.chmod(path, 0o666 & ~_umask())


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
            "hparams": {k: v for k, v in info.hparams.items()},
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


# ----------------------------------------------------------------------------- training checkpoints

def is_checkpoint(path: str) -> bool:
    """Whether ``path`` is a training checkpoint written by cellmnn (by its ``format`` field)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # tensors stay on disk
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


CHECKPOINT_KIND = OutputKind("cellmnn training checkpoint", is_checkpoint)


def save_checkpoint(state: dict, path) -> str:
    """Write a training state (tensors, numbers, strings, lists, dicts) to ``path`` atomically,
    replacing only an earlier checkpoint."""
    def write(tmp):
        torch.save(dict(state, format=CHECKPOINT_FORMAT), tmp)
    return _write_atomic(path, CHECKPOINT_KIND, write, suffix=CHECKPOINT_SUFFIX)


def load_checkpoint(path) -> dict | None:
    """The training state in ``path``; None if there is no file; an error if the file is not a
    cellmnn checkpoint (it is then never overwritten)."""
    path = _as_path(path, "checkpoint")
    if not os.path.lexists(path):
        return None
    if not os.path.isfile(path) or not is_checkpoint(path):
        raise FileExistsError(f"checkpoint {path} exists and is not a cellmnn training checkpoint; refusing to "
                              "read or replace it (choose another path)")
    return torch.load(path, map_location="cpu", weights_only=True)


def remove_checkpoint(path) -> None:
    """Delete ``path`` if it is a cellmnn checkpoint (after the model it led to was saved)."""
    if os.path.isfile(path) and is_checkpoint(path):
        os.unlink(path)


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
    path = _as_path(path, "model path")
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
        warnings.warn(f"{path} was saved without a weights checksum (format version 1); save it again to "
                      "add one", stacklevel=2)
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
    model.training_info = config.get("training")
    return model.to(device).eval()
