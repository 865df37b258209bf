"""The Cell-MNN model: the network (``CellMNN``), many models' MLPs as one stacked tensor
(``stacked``, for training ensembles) and model folders on disk (``persist``)."""
from .network import CellMNN, outputs_to_operator
from .persist import load_model, save_model

__all__ = ["CellMNN", "outputs_to_operator", "save_model", "load_model"]
