"""The torch backend of ``fused_mlp``: one batched matrix product per layer over all E models."""
from __future__ import annotations

import torch

from .naive import SLOPE


def fused_mlp_torch(flat: torch.Tensor, shapes, x: torch.Tensor) -> torch.Tensor:
    """flat (E, P), x (E, n, in) -> (E, n, out) by autograd-differentiable batched products."""
    E = flat.shape[0]
    # One split, not a slice per tensor: its backward writes the weight gradient once (a slice's
    # backward fills a zero (E, P) tensor per slice, which autograd then sums).
    parts = flat.split([n for n_in, n_out in shapes for n in (n_in * n_out, n_out)], dim=1)
    h = x
    for k, (n_in, n_out) in enumerate(shapes):
        h = torch.baddbmm(parts[2 * k + 1].view(E, 1, n_out), h, parts[2 * k].view(E, n_in, n_out))
        if k < len(shapes) - 1:
            h = torch.nn.functional.leaky_relu(h, SLOPE)
    return h
