"""Training Cell-MNN models: ``fit`` (and ``fit_many``, ``select="inner"``) over batched ensembles.

Modules, bottom to top: ``objective`` (the loss terms: one builder for training and validation),
``hparams`` (``HParams``: one typed, validated, frozen record), ``sampling`` (the counter-based
batch sampler), ``layout`` (``Member``, ``Setup``, ``Layout``: what a step computes on), ``step``
(one step: stacked loss, AdamW, data-parallel gather, CUDA graphs), ``checkpoint`` (what a
checkpoint must match), ``parallel`` (an ensemble's models shared out to worker processes),
``trainer`` (``Trainer``: set up, epoch, check, checkpoint, resume; ``train``), ``worker`` (a
worker process), ``fitting`` (``fit``, ``fit_many``, inner selection).
"""
from .fitting import SELECT_GRID, best_candidate, check_inputs, check_seeds, check_select, fit, fit_many
from .hparams import HParams, resolve_device, time_unit
from .layout import Member
from .trainer import FitInfo, train

__all__ = ["fit", "fit_many", "check_inputs", "check_seeds", "check_select", "best_candidate", "SELECT_GRID",
           "HParams", "resolve_device", "time_unit", "Member", "FitInfo", "train"]
