"""Many models' MLPs as one flat (models, parameters) tensor, evaluated with batched matmuls.

The layout of one model's flat vector (``pack``/``unpack``): layer by layer, W as (in, out)
row-major, then b; the same network as ``CellMNN.mlp`` (LeakyReLU with slope 0.01 between
layers).
"""
from __future__ import annotations

import torch

from .network import CellMNN


def layer_shapes(dim: int, width: int, depth: int, n_out: int) -> list:
    """(inputs, outputs) of each linear layer of the MLP on (x, t): ``dim`` + 1 inputs (``dim``
    includes any one-hot dataset inputs), ``depth`` hidden layers of ``width``, ``n_out`` outputs."""
    shapes, n_in = [], dim + 1
    for _ in range(depth):
        shapes.append((n_in, width))
        n_in = width
    return shapes + [(n_in, n_out)]


def _offsets(shapes):
    """Per layer (start of W, start of b, end) in the flat vector, and the total length."""
    out, o = [], 0
    for n_in, n_out in shapes:
        out.append((o, o + n_in * n_out, o + n_in * n_out + n_out))
        o += n_in * n_out + n_out
    return out, o


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
    offs, total = _offsets([(m.in_features, m.out_features) for m in linears])
    if flat.numel() != total:
        raise ValueError(f"flat weights have {flat.numel()} entries; the model needs {total}")
    with torch.no_grad():
        for m, (a, b, c) in zip(linears, offs):
            m.weight.copy_(flat[a:b].view(m.in_features, m.out_features).t())
            m.bias.copy_(flat[b:c])
    return model


def stacked_mlp(flat: torch.Tensor, shapes, x: torch.Tensor) -> torch.Tensor:
    """Every member's MLP at once: flat (E, P) weights, x (E, n, in) -> (E, n, out); LeakyReLU
    (slope 0.01, torch's default) between layers, as ``CellMNN.mlp``."""
    E = flat.shape[0]
    # One split, not a slice per tensor: its backward writes the weight gradient once (a slice's
    # backward fills a zero (E, P) tensor per slice, which autograd then sums).
    parts = flat.split([n for n_in, n_out in shapes for n in (n_in * n_out, n_out)], dim=1)
    h = x
    for k, (n_in, n_out) in enumerate(shapes):
        h = torch.baddbmm(parts[2 * k + 1].view(E, 1, n_out), h, parts[2 * k].view(E, n_in, n_out))
        if k < len(shapes) - 1:
            h = torch.nn.functional.leaky_relu(h)
    return h
