"""Many models' MLPs as one flat (models, parameters) tensor, evaluated at once (``fused_mlp``).

The layout of one model's flat vector (``pack``/``unpack``): layer by layer, W as (in, out)
row-major, then b; the same network as ``CellMNN.mlp`` (LeakyReLU with slope 0.01 between
layers).
"""
from __future__ import annotations

import torch

from cellmnn_kernels.ops.fused_mlp import fused_mlp, layer_offsets

from .network import CellMNN


def layer_shapes(dim: int, width: int, depth: int, n_out: int) -> list:
    """(inputs, outputs) of each linear layer of the MLP on (x, t): ``dim`` + 1 inputs (``dim``
    includes any one-hot dataset inputs), ``depth`` hidden layers of ``width``, ``n_out`` outputs."""
    shapes, n_in = [], dim + 1
    for _ in range(depth):
        shapes.append((n_in, width))
        n_in = width
    return shapes + [(n_in, n_out)]


def pack(model: CellMNN) -> torch.Tensor:
    """A model's MLP weights as one flat vector (layer by layer: W (in, out) row-major, then b)."""
    parts = []
    for m in model.mlp:
        if isinstance(m, torch.nn.Linear):
            parts += [m.weight.detach().t().reshape(-1), m.bias.detach().reshape(-1)]
    return torch.cat(parts)


def unpack(model: CellMNN, flat: torch.Tensor) -> CellMNN:
    """Load a flat vector written by ``pack`` into ``model``'s MLP."""
    linears = [m for m in model.mlp if isinstance(m, torch.nn.Linear)]
    offs = layer_offsets([(m.in_features, m.out_features) for m in linears])
    total = offs[-1][2]
    if flat.numel() != total:
        raise ValueError(f"flat weights have {flat.numel()} entries; the model needs {total}")
    with torch.no_grad():
        for m, (a, b, c) in zip(linears, offs):
            m.weight.copy_(flat[a:b].view(m.in_features, m.out_features).t())
            m.bias.copy_(flat[b:c])
    return model


def stacked_mlp(flat: torch.Tensor, shapes, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Every member's MLP at once: flat (E, P) weights, x (E, n, in) -> (E, n, out); LeakyReLU
    (slope 0.01, torch's default) between layers, as ``CellMNN.mlp``.  ``cellmnn_kernels``'
    ``fused_mlp``: on CUDA float32 the fused Triton kernels (backend "auto"), else batched products;
    backend "torch" or "reference" keeps it off the kernels."""
    return fused_mlp(flat, shapes, x, backend=backend if backend in ("torch", "reference") else "auto")
