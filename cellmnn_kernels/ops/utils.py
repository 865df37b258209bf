"""Shared helpers for the ops: optional Triton import, dtype support, input checks."""
from __future__ import annotations

import os

import torch

try:  # Triton is optional: without it the torch paths serve.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

SUPPORTED_DTYPES = (torch.float32, torch.float64)

# The torch backends' small matrix products: up to this D, broadcast multiply-and-sums with the
# cells in the last (contiguous) dimension, above it batched GEMMs.  For 1,800 cells x 4 times on
# one core of a 2-core x86-64 CPU (AMD EPYC), a matrix-vector product costs 39 against 181 us at
# D = 3, 126 against 804 us at D = 8, 565 against 709 us at D = 16 and 6.2 against 2.1 ms at D = 32.
LANES_MAX_D = 16

#: The only imports a function of cellmnn_kernels may make (module name or last component -> why):
#: everything else is imported at the top of its module (a test walks the package and checks it).
LAZY_IMPORTS = {
    "triton_impl": "an op's Triton backend: its kernels are defined on first use, so after TRITON_INTERPRET is "
                   "set (CPU runs), and only where triton is installed",
    "pytest": "the skip helpers of cellmnn_kernels.testing (pytest is a test dependency)",
    "hypothesis": "the example counts of cellmnn_kernels.testing (hypothesis is a test dependency)",
}


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable_on(device: torch.device) -> bool:
    """Whether Triton kernels can run on tensors of ``device`` in this process."""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpreted()


BACKENDS = ("auto", "triton", "torch", "reference")


def resolve_backend(backend: str, device: torch.device, D: int, max_triton_d: int, arg: str) -> str:
    """The backend an op runs: "auto" is triton for CUDA tensors (when D fits), torch otherwise.

    ``arg`` names the input whose dimension D is reported in errors.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and HAS_TRITON and D <= max_triton_d else "torch"
    if backend == "triton":
        if D > max_triton_d:
            raise ValueError(f"{arg} has D = {D}; backend='triton' supports D <= {max_triton_d} (use 'torch')")
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package, which is not installed")
        if not triton_usable_on(device):
            raise RuntimeError(f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                               f"import for CPU tensors; got tensors on {device}")
    return backend


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def check_tensor(name: str, t, ndim: int, shape_doc: str) -> None:
    """Type, dtype and rank of one input; errors name the argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; only torch.float32 and torch.float64 are supported")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_doc}; got a {t.dim()}-d tensor of shape {tuple(t.shape)}")


def check_same_dtype_device(**tensors: torch.Tensor) -> None:
    """TypeError unless the named tensors share one dtype, ValueError unless one device."""
    names = list(tensors)
    first = tensors[names[0]]
    for n in names[1:]:
        t = tensors[n]
        if t.dtype != first.dtype:
            raise TypeError(f"{names[0]} and {n} must share one dtype; got {first.dtype} and {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{names[0]} and {n} must be on one device; got {first.device} and {t.device}")


def count_nonfinite(**tensors: torch.Tensor) -> dict[str, int]:
    """Number of NaN/Inf entries per named tensor, with a single host synchronisation."""
    names = list(tensors)
    counts = torch.stack([(~torch.isfinite(tensors[n].detach())).sum() for n in names]).tolist()
    return dict(zip(names, counts))


def raise_if_nonfinite(**tensors: torch.Tensor) -> None:
    """ValueError naming the first tensor with NaN or Inf entries (one host synchronisation)."""
    for name, bad in count_nonfinite(**tensors).items():
        if bad:
            total = tensors[name].numel()
            raise ValueError(f"{name} has {bad} non-finite entries (NaN or Inf) out of {total}")


class _NotTwiceDifferentiable(torch.autograd.Function):
    """Identity on a gradient, tied to the op's inputs, whose own backward raises ``message``."""

    @staticmethod
    def forward(ctx, message, grad, *inputs):
        """A copy of ``grad``."""
        ctx.message = message
        return grad.clone()

    @staticmethod
    def backward(ctx, *grads):
        """Raises RuntimeError(message): a second derivative is not supported."""
        raise RuntimeError(ctx.message)


def first_order_only(message: str, grads: tuple, inputs: tuple) -> tuple:
    """For a custom backward with first derivatives only: when it runs with ``create_graph=True``,
    tie each gradient to ``inputs`` through a node that raises ``message`` if it is
    differentiated again (instead of silently treating the gradient as a constant)."""
    if not torch.is_grad_enabled():
        return grads
    anchors = tuple(t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad)
    if not anchors:
        return grads
    return tuple(g if g is None else _NotTwiceDifferentiable.apply(message, g, *anchors) for g in grads)


def expm_reference(M: torch.Tensor) -> torch.Tensor:
    """expm of a batch M (..., n, n) for the references: scaling and squaring, each matrix scaled to
    ||M / 2^s||_1 <= 1/2 and summed to degree 18 (truncation below 0.5^19 / 19! = 1.6e-23, far under
    float64 rounding), then squared s times.  Differentiable by autograd, any float dtype.

    Not ``torch.linalg.matrix_exp``: its degree-8 branch has a wrong coefficient (pytorch/pytorch
    issue 196592), which we measured on torch 2.13 as float64 errors up to 4e-11 for single 3 x 3
    matrices of 1-norm 0.01-0.06, above the float64 tolerances of the tests it is the oracle of."""
    norm = M.abs().sum(-2).amax(-1)  # the 1-norm, (...)
    s = torch.ceil(torch.log2(norm.clamp_min(1e-300) / 0.5)).clamp_min(0)
    s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
    X = M / torch.exp2(s)[..., None, None]
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device).expand_as(M)
    E = eye
    for k in range(18, 0, -1):  # Horner: I + X/1 (I + X/2 (I + ... (I + X/18)))
        E = eye + (X @ E) / k
    for k in range(int(s.max()) if s.numel() else 0):
        E = torch.where((s > k)[..., None, None], E @ E, E)
    return E
