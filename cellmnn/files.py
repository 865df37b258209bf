"""Every output file of cellmnn, written without ever losing a user's file.

* A write replaces only an earlier output of the same kind, recognised by its own content (a CSV
  by its header, a JSON by its ``format`` field, a figure by the PNG's ``Software`` text, a
  training checkpoint by its ``format`` entry); anything else at the path is refused with a clear
  error and left untouched.  Destinations are checked (``check_output``) before any long work, by
  creating and removing a probe file where the output will go.
* Files are written to a temporary sibling and moved into place with one rename
  (``write_atomic``).

Model folders (``save_model``/``load_model``, crash-safe with a commit journal) are in
``cellmnn.model.persist``, built on the helpers here.
"""
from __future__ import annotations

import csv
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Callable

import torch

from .version import __version__

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
LOO_FORMAT = "cellmnn-leave-one-out"
LOO_JSON = OutputKind("leave-one-out JSON", _json_with_format(LOO_FORMAT, ("rows", "summary")))
FIGURE = OutputKind("cellmnn figure (PNG)", lambda path: png_software(path).startswith(SOFTWARE))
TRANSITIONS = OutputKind("transitions CSV", _csv_with_header("source_group,target_group,probability,"))
PERTURBATION = OutputKind("perturbation CSV", _csv_with_header("kind,name,control,perturbed,shift,"))
FATE_WEIGHTS = OutputKind("push/pull weights CSV", _csv_with_header("cell,time,"))
ANNOTATE_FORMAT = "cellmnn-annotate"  # the "format" entry of what annotate writes into uns[prefix]


def is_annotated_h5ad(path: str) -> bool:
    """Whether ``path`` is an .h5ad with an ``uns`` entry written by ``cellmnn.annotate`` (its
    ``format``), i.e. one that ``cellmnn annotate --out`` wrote."""
    try:
        import h5py

        with h5py.File(path, "r") as f:
            uns = f.get("uns")
            for entry in (uns.values() if uns is not None else []):
                fmt = entry.get("format") if isinstance(entry, h5py.Group) else None
                value = fmt[()] if isinstance(fmt, h5py.Dataset) else None
                if (value.decode() if isinstance(value, bytes) else value) == ANNOTATE_FORMAT:
                    return True
    except (OSError, ValueError, TypeError, KeyError):
        return False
    return False


ANNOTATED_H5AD = OutputKind("cellmnn-annotated .h5ad file", is_annotated_h5ad)


def json_kind(fmt: str, legacy_keys: tuple = ()) -> OutputKind:
    """The kind of a JSON document carrying ``"format": fmt`` (or, written before that field
    existed, all of ``legacy_keys``)."""
    return OutputKind(f"{fmt} JSON", _json_with_format(fmt, legacy_keys))


# ----------------------------------------------------------------------------- checks

def as_path(path, what: str) -> str:
    """``path`` (str or PathLike, non-empty) as an absolute path; errors name ``what``."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path (str or os.PathLike), got {type(path).__name__}")
    raw = os.fspath(path)
    if not raw.strip():
        raise ValueError(f"{what} is empty; give a file or folder name")
    return os.path.abspath(raw)


def check_dir_writable(folder: str, target: str) -> None:
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
    path = as_path(path, what)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path} is a folder; give a file name for the {kind.name}")
    if os.path.lexists(path):
        if not os.path.isfile(path):
            raise FileExistsError(f"{what} {path} exists and is not a regular file; refusing to replace it")
        if not kind.recognise(path):
            raise FileExistsError(f"{what} {path} exists and is not a {kind.name} written by cellmnn; refusing "
                                  "to overwrite it (choose another path or remove the file)")
    check_dir_writable(os.path.dirname(path), path)
    return path


def write_atomic(path, kind: OutputKind, write: Callable, suffix: str = "") -> str:
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


def file_mode() -> int:
    """The mode a plain ``open`` gives a new file here (0o666 less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def publish(tmp: str, path: str) -> None:
    """Give a finished temporary file the mode a plain ``open`` would have given it and move it
    into place (``tempfile`` makes private 0600 files)."""
    os.chmod(tmp, file_mode())
    os.replace(tmp, path)


def write_text_atomic(path, text: str, kind: OutputKind) -> str:
    """``text`` (UTF-8) written atomically to ``path``, replacing only an earlier ``kind`` file."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    return write_atomic(path, kind, write)


def write_csv_atomic(path, header, rows, kind: OutputKind) -> str:
    """A CSV (``header`` then ``rows``) written atomically, replacing only an earlier ``kind`` file."""
    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)
    return write_atomic(path, kind, write, ".csv")


def save_figure(fig, path) -> str:
    """A matplotlib figure as PNG, marked as ours (``Software``), written atomically."""
    return write_atomic(path, FIGURE, lambda tmp: fig.savefig(
        tmp, dpi=120, format="png", metadata={"Software": f"{SOFTWARE} {__version__} (matplotlib)"}), ".png")


# ----------------------------------------------------------------------------- training checkpoints

def checkpoint_problem(path: str) -> str | None:
    """Why ``path`` is not a training checkpoint written by cellmnn (unreadable, truncated, another
    kind of file), or None when it is one (by its ``format`` field)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # tensors stay on disk
    except Exception as exc:  # noqa: BLE001 - anything unreadable is not ours
        return f"unreadable: {' '.join(str(exc).split())[:200] or type(exc).__name__}"
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        return "not a cellmnn checkpoint (no 'format': 'cellmnn-checkpoint' entry)"
    return None


def is_checkpoint(path: str) -> bool:
    """Whether ``path`` is a training checkpoint written by cellmnn (by its ``format`` field)."""
    return checkpoint_problem(path) is None


CHECKPOINT_KIND = OutputKind("cellmnn training checkpoint", is_checkpoint)


def save_checkpoint(state: dict, path) -> str:
    """Write a training state (tensors, numbers, strings, lists, dicts) to ``path`` atomically,
    replacing only an earlier checkpoint."""
    def write(tmp):
        torch.save(dict(state, format=CHECKPOINT_FORMAT), tmp)
    return write_atomic(path, CHECKPOINT_KIND, write, suffix=CHECKPOINT_SUFFIX)


def load_checkpoint(path) -> dict | None:
    """The training state in ``path``; None if there is no file; an error if the file is not a
    cellmnn checkpoint (it is then never overwritten)."""
    path = as_path(path, "checkpoint")
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
