"""Cell-MNN: learn how single cells move between timepoints from snapshot data.

    marginals = cellmnn.load_marginals("data.h5ad", time_key="day")
    model = cellmnn.fit(marginals, holdout=2)
    predicted = model.predict(marginals.data[1], marginals.times[1], marginals.times[2])
    result = cellmnn.leave_one_out(marginals)        # Cell-MNN beside OT-interpolate, exact W1
    w = cellmnn.gene_interactions(model, marginals, pairs=[("JUN", "FOS")])   # gene-space weights
    a, b = cellmnn.load_joint(["a.h5ad", "b.h5ad"]); joint = cellmnn.fit([a, b])  # one model, two courses
    table = cellmnn.cell_transition(model, adata, "cell_type", source=1, target=3)  # fate probabilities
    ko = cellmnn.perturb(model, adata, {"GATA1": 0.0}, source=1, target=3)           # in-silico knockout

Subpackages and modules, each importing only those below it: ``checks``, ``optional``, ``files``
and ``version`` (shared by all); ``data`` (reading time courses); ``model`` (the network, saved
models); ``metrics`` (W1, MMD); ``train`` (the objective, ensembles, ``fit``); ``evaluate``
(leave-one-out); ``analysis`` (gene interactions, network checks, fates, perturbations); ``annotate`` and ``plots``;
``cli``.
"""
from .analysis.fate import cell_transition, pull, push
from .analysis.interactions import Interactions, centered_expression, gene_interactions
from .analysis.perturb import Perturbation, perturb
from .analysis.trrust import read_trrust, recovery_scores, trrust_validation
from .annotate import annotate
from .data import Marginals, Transform, inflate, load_joint, load_marginals, subsample
from .evaluate import LeaveOneOutResult, leave_one_out, ot_interpolate
from .metrics import mmd, sliced_wasserstein1, wasserstein1, wasserstein1_batched
from .model import CellMNN, load_model, save_model
from .train import HParams, fit
from .version import __version__

__all__ = ["load_marginals", "Marginals", "Transform", "CellMNN", "fit", "HParams", "leave_one_out",
           "LeaveOneOutResult", "wasserstein1", "mmd", "ot_interpolate", "save_model", "load_model",
           "gene_interactions", "centered_expression", "Interactions", "read_trrust", "trrust_validation",
           "recovery_scores", "annotate", "inflate", "wasserstein1_batched", "sliced_wasserstein1", "subsample",
           "load_joint", "cell_transition", "push", "pull", "perturb", "Perturbation", "__version__"]
