"""``fused_mlp``: E stacked LeakyReLU MLPs (the operator network of E models) evaluated at once.

    y[e] = W_L^T h_(L-1) + b_L,   h_k = LeakyReLU(W_k^T h_(k-1) + b_k),   h_0 = x[e]

with each model's weights one row of ``flat`` (layer by layer: W as (in, out) row-major, then b)
and LeakyReLU's slope 0.01 (torch's default).  On CUDA the Triton backend keeps a block of cells'
activations on chip through every layer (one launch forward, one backward); the torch backend
runs one batched matrix product per layer.
"""
from __future__ import annotations

import torch

from ..utils import check_same_dtype_device, check_tensor, resolve_backend, triton_usable_on
from .naive import SLOPE, fused_mlp_reference, layer_offsets
from .torch_impl import fused_mlp_torch

__all__ = ["fused_mlp", "fused_mlp_reference", "layer_offsets", "triton_serves", "has_tf32_tensor_cores", "SLOPE",
           "BACKENDS"]

BACKENDS = ("auto", "triton", "torch", "reference")
MAX_IN = 32  # triton_impl.MAX_IN: inputs of the first layer
MAX_WIDTH = 128  # triton_impl.MAX_WIDTH: the hidden width


def check_inputs(flat, shapes, x) -> tuple:
    """Shapes, dtypes and devices of a call; returns (E, n).  ``shapes``: [(in, out), ...] per layer,
    at least one; the network's (E, P) ``flat`` must hold exactly their weights and biases."""
    check_tensor("flat", flat, 2, "(E, P)")
    check_tensor("x", x, 3, "(E, n, in)")
    check_same_dtype_device(flat=flat, x=x)
    try:
        shapes = [tuple(int(v) for v in s) for s in shapes]
    except (TypeError, ValueError):
        raise TypeError(f"shapes must be a sequence of (in, out) pairs of integers; got {shapes!r}") from None
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ValueError(f"shapes must be one or more (in, out) pairs of positive integers; got {shapes}")
    for k in range(1, len(shapes)):
        if shapes[k][0] != shapes[k - 1][1]:
            raise ValueError(f"shapes: layer {k} takes {shapes[k][0]} inputs but layer {k - 1} gives "
                             f"{shapes[k - 1][1]} outputs")
    P = layer_offsets(shapes)[-1][2]
    if flat.shape[1] != P:
        raise ValueError(f"flat has {flat.shape[1]} weights per model; shapes {shapes} need {P}")
    if x.shape[0] != flat.shape[0] or x.shape[2] != shapes[0][0]:
        raise ValueError(f"x must have shape (E, n, in) = ({flat.shape[0]}, n, {shapes[0][0]}) for flat "
                         f"{tuple(flat.shape)} and shapes {shapes}; got {tuple(x.shape)}")
    return shapes


def triton_serves(shapes, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels take this network: float32; at least one hidden layer, all of one
    width <= 128; at most 32 inputs."""
    hidden = [s[1] for s in shapes[:-1]]
    return (dtype == torch.float32 and len(shapes) >= 2 and shapes[0][0] <= MAX_IN
            and len(set(hidden)) == 1 and hidden[0] <= MAX_WIDTH)


def has_tf32_tensor_cores(device: torch.device) -> bool:
    """Whether the kernels' tf32 products run on ``device``: CUDA compute capability 8.0 or newer
    (Ampere on); the CPU interpreter too.  Older GPUs (a T4, a V100) take the torch backend."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def fused_mlp(flat: torch.Tensor, shapes, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """y (E, n, out) = every model's MLP on its own cells: ``flat`` (E, P), ``x`` (E, n, in), one
    dtype (float32 or float64) and device; differentiable in flat and x (first derivatives on the
    triton backend).  backend: "auto" (triton for float32 tensors of a network it takes,
    ``triton_serves``, on a GPU with tf32 tensor cores; torch otherwise), "triton" (products as
    three tf32 tensor-core products: about float32 accuracy, see ``triton_impl``), "torch" or
    "reference" (one model at a time)."""
    shapes = check_inputs(flat, shapes, x)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    serves = triton_serves(shapes, x.dtype)
    if backend == "auto":
        backend = "triton" if (serves and x.device.type == "cuda" and triton_usable_on(x.device)
                               and has_tf32_tensor_cores(x.device)) else "torch"
    elif backend == "triton":
        if not serves:
            raise ValueError(f"backend='triton' takes float32 networks with at most {MAX_IN} inputs and one "
                             f"hidden width <= {MAX_WIDTH}; got {x.dtype} and shapes {shapes} (use 'torch')")
        resolve_backend("triton", x.device, 0, 0, "x")  # triton installed, and usable on x's device
        if not has_tf32_tensor_cores(x.device):
            cap = torch.cuda.get_device_capability(x.device)
            raise ValueError(f"backend='triton' needs tf32 tensor cores (compute capability 8.0 or newer); "
                             f"x is on {x.device}, capability {cap} (use 'torch')")
    if backend == "reference":
        return fused_mlp_reference(flat, shapes, x)
    if backend == "torch":
        return fused_mlp_torch(flat, shapes, x)
    from .triton_impl import FusedMlpFunction

    return FusedMlpFunction.apply(flat, x, tuple(shapes))
