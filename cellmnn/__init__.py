"""Cell-MNN: learn how single cells move between timepoints from snapshot data.

    marginals = cellmnn.load_marginals("data.h5ad", time_key="day")
    model = cellmnn.fit(marginals, holdout=2)
    predicted = model.predict(marginals.data[1], marginals.times[1], marginals.times[2])
    result = cellmnn.leave_one_out(marginals)        # Cell-MNN beside OT-interpolate, exact W1
    w = cellmnn.gene_interactions(model, marginals, pairs=[("JUN", "FOS")])   # gene-space weights
    a, b = cellmnn.load_joint(["a.h5ad", "b.h5ad"]); joint = cellmnn.fit([a, b])  # one model, two courses
"""
from .annotate import annotate
from .data import Marginals, Transform, load_marginals
from .evaluate import LeaveOneOutResult, leave_one_out, mmd, ot_interpolate, wasserstein1
from .interactions import Interactions, centered_expression, gene_interactions
from .io import load_model, save_model
from .joint import load_joint
from .model import CellMNN
from .scale import inflate, sliced_wasserstein1, subsample, wasserstein1_batched
from .train import fit
from .validation import read_trrust, recovery_scores, trrust_validation

__all__ = ["load_marginals", "Marginals", "Transform", "CellMNN", "fit", "leave_one_out", "LeaveOneOutResult",
           "wasserstein1", "mmd", "ot_interpolate", "save_model", "load_model", "gene_interactions", "centered_expression",
           "Interactions", "read_trrust", "trrust_validation", "recovery_scores", "annotate",
           "inflate", "wasserstein1_batched", "sliced_wasserstein1", "subsample", "load_joint"]
__version__ = "0.1.0"
