"""Time-course data: per-timepoint marginals in model space, read from AnnData, .h5ad (in memory or
backed), TrajectoryNet .npz, CSV or arrays; several courses in one space (``load_joint``); the
paper's scaling protocol (``inflate``) and seeded subsamples.

Modules, bottom to top: ``tables`` (raw tables and times, checked), ``marginals`` (``Marginals``,
``Transform``), ``backed`` (chunked .h5ad), ``load`` (``load_marginals``), ``joint``, ``inflate``.
"""
from .inflate import inflate, subsample, write_inflated
from .joint import load_joint
from .load import load_marginals
from .marginals import Marginals, Transform, check_holdout

__all__ = ["load_marginals", "Marginals", "Transform", "check_holdout", "load_joint", "inflate", "subsample",
           "write_inflated"]
