"""The plain PyTorch reference of ``fused_mlp``: each model's layers one after another with dense
matrix products, in the inputs' dtype (tests call it in float64)."""
from __future__ import annotations

import torch

SLOPE = 0.01  # LeakyReLU's negative slope (torch's default, as ``CellMNN.mlp``)


def layer_offsets(shapes) -> list:
    """Per layer (start of W, start of b, end) in a model's flat vector: layer by layer, W as
    (in, out) row-major, then b (the last entry's end is the vector's length)."""
    out, o = [], 0
    for n_in, n_out in shapes:
        out.append((o, o + n_in * n_out, o + n_in * n_out + n_out))
        o += n_in * n_out + n_out
    return out


def fused_mlp_reference(flat: torch.Tensor, shapes, x: torch.Tensor) -> torch.Tensor:
    """flat (E, P), x (E, n, shapes[0][0]) -> (E, n, shapes[-1][1]): h <- LeakyReLU(h W + b) for
    every layer but the last, which is affine; one model and one layer at a time, in the inputs'
    dtype.  Differentiable by autograd (any order)."""
    outs = []
    for e in range(flat.shape[0]):
        h = x[e]
        for k, ((n_in, n_out), (a, b, c)) in enumerate(zip(shapes, layer_offsets(shapes))):
            h = h @ flat[e, a:b].view(n_in, n_out) + flat[e, b:c]
            if k < len(shapes) - 1:
                h = torch.nn.functional.leaky_relu(h, SLOPE)
        outs.append(h)
    return torch.stack(outs)
