"""Hyperparameters of one model's training: one typed, validated, frozen record (``HParams``).

The defaults are the paper's (Cell-MNN, arXiv 2510.02903, and the authors' code): width 96,
depth 4, init_scale 0.01, AdamW lr 2e-4 and weight_decay 1e-5, batch_size 200, gamma 0.1,
sigma 1, velocity_weight 0.1 with the authors' kinetic form, up to 1000 epochs.  Early stopping
(check_every 10 epochs, patience 10 checks, val_fraction 10% of the kept cells, scored on at most
max_val_cells 5000 of them per timepoint) is this package's (docs/workflow.md: where ``fit`` differs).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from cellmnn_kernels.ops.utils import BACKENDS

from .. import checks
from ..model.network import PARAMETERIZATIONS, DecoderSpec
from .objective import KINETIC

#: Hyperparameters every member of one ensemble must share (the shape of the computation).
SHARED = ("width", "depth", "parameterization", "num_const_dims", "batch_size", "kinetic", "backend", "device",
          "check_every", "cuda_graph", "affine", "noise", "piece_length", "rate_bound", "n_jobs")


#: Named groups of options for ``preset=``: "paper" is the paper's decoder (closed form from the source
#: cell's operator, dx = A x, deterministic), the decoder of every release before the decoder options.
PRESETS = {"paper": dict(affine=False, noise="none", piece_length=None)}


@dataclass(frozen=True)
class HParams:
    """Every hyperparameter of ``fit`` (docs/workflow.md, "Training"), checked on creation: an invalid value is
    a ValueError/TypeError naming it.  ``HParams.from_kwargs(**kw)`` also refuses unknown names;
    ``hp.replace(**kw)`` is a checked copy; ``hp.to_dict()`` the plain dict that saved models record.
    """
    width: int = 96
    depth: int = 4
    init_scale: float = 0.01
    parameterization: str = "direct"
    num_const_dims: int = 0
    lr: float = 2e-4
    weight_decay: float = 1e-5
    batch_size: int = 200
    gamma: float = 0.1
    sigma: float = 1.0
    velocity_weight: float = 0.1
    kinetic: str = "kept_times"
    max_epochs: int = 1000
    check_every: int = 10
    patience: int = 10
    val_fraction: float = 0.1
    max_val_cells: int = 5000
    select_on_holdout: bool = False
    backend: str = "auto"
    device: object = "cpu"
    cuda_graph: bool | None = None
    verbose: bool = True
    affine: bool = False
    noise: str = "none"
    piece_length: float | None = None
    rate_bound: float = 10.0
    n_jobs: int | None = None

    def __post_init__(self):
        put = lambda name, v: object.__setattr__(self, name, v)  # noqa: E731 - frozen: normalise once
        for name in ("batch_size", "max_epochs", "check_every", "patience", "width", "depth", "max_val_cells"):
            put(name, checks.positive_int(name, getattr(self, name)))
        if self.num_const_dims != 0:
            put("num_const_dims", checks.positive_int("num_const_dims", self.num_const_dims))
        put("lr", checks.number("lr", self.lr, 0, None, low_open=True))
        for name in ("weight_decay", "gamma", "velocity_weight", "init_scale"):
            put(name, checks.number(name, getattr(self, name), 0, None))
        put("sigma", checks.number("sigma", self.sigma, 0, None, low_open=True))
        put("val_fraction", checks.number("val_fraction", self.val_fraction, 0, 1))
        for name in ("select_on_holdout", "verbose"):
            put(name, checks.flag(name, getattr(self, name)))
        if self.cuda_graph is not None:
            try:
                put("cuda_graph", checks.flag("cuda_graph", self.cuda_graph))
            except TypeError:
                raise TypeError(f"cuda_graph must be True, False or None (on where it can be), got "
                                f"{type(self.cuda_graph).__name__} {self.cuda_graph!r}") from None
        for name, allowed in (("kinetic", KINETIC), ("backend", BACKENDS), ("parameterization", PARAMETERIZATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        resolve_device(self.device)
        if self.n_jobs is not None and not (type(self.n_jobs) is int and self.n_jobs == -1):
            try:
                put("n_jobs", checks.positive_int("n_jobs", self.n_jobs))
            except ValueError:
                raise ValueError(f"n_jobs must be a positive integer, -1 (one process per usable core) or None "
                                 f"(one process), got {self.n_jobs!r}") from None
        put("affine", checks.flag("affine", self.affine))
        spec = DecoderSpec(1, affine=self.affine, noise=self.noise, piece_length=self.piece_length,
                           rate_bound=self.rate_bound)  # checks the decoder options
        put("piece_length", spec.piece_length)
        put("rate_bound", spec.rate_bound)

    @classmethod
    def names(cls) -> list:
        """Every hyperparameter's name."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_kwargs(cls, **kw) -> "HParams":
        """The defaults with ``kw`` applied; an unknown name is a TypeError listing the known ones.
        ``preset=NAME`` (``PRESETS``) sets a group of options at once; naming one of them as well, with
        another value, is a ValueError."""
        preset = kw.pop("preset", None)
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
            clash = {k: v for k, v in kw.items() if k in PRESETS[preset] and v != PRESETS[preset][k]}
            if clash:
                raise ValueError(f"preset={preset!r} sets {PRESETS[preset]}; it conflicts with {clash}")
            kw = {**kw, **PRESETS[preset]}
        unknown = set(kw) - set(cls.names())
        if unknown:
            raise TypeError(f"unknown hyperparameter(s): {sorted(unknown)}; known: {sorted(cls.names())}")
        return cls(**kw)

    def replace(self, **kw) -> "HParams":
        """A checked copy with ``kw`` changed."""
        return type(self).from_kwargs(**{**self.to_dict(), **kw})

    def to_dict(self) -> dict:
        """The values as a plain dict (field order)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def resolve_device(device) -> torch.device:
    """"auto" (CUDA when available), or a torch device string/object that exists here
    (``checks.device``)."""
    return checks.device(device)


def time_unit(times) -> float:
    """The internal unit of time: the mean gap between consecutive timepoints (1 if undefined)."""
    times = sorted(float(t) for t in times)
    span = times[-1] - times[0] if times else 0.0
    return span / (len(times) - 1) if span > 0 else 1.0
