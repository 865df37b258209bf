"""``local_linear_sde_step``: the local-linear SDE step, dx = A x ds + diag(g) dW with A frozen over
the step, in closed form.  The transition is exactly Gaussian:

    x(t + dt) | x(t) ~ N(X, S),   X = expm(dt A) x,   S = int_0^dt expm(uA) G G^T expm(uA)^T du,

and the op returns the mean (with V = A X, as ``local_linear_step``), the covariance and a
reparameterised sample Y = X + L eps (L L^T = S) for given standard-normal eps.
"""
from __future__ import annotations

import torch

from ..local_linear_step import local_linear_step
from ..local_linear_step.common import check_overflow, empty_result
from ..utils import resolve_backend
from .common import check_sde_values, psd_cholesky, validate_sde_inputs
from .naive import local_linear_sde_step_reference, sde_covariance_reference
from .torch_impl import sde_covariance_torch, sde_noise_torch

__all__ = ["local_linear_sde_step", "sde_covariance", "sde_noise", "local_linear_sde_step_reference",
           "sde_covariance_reference", "psd_cholesky", "BACKENDS"]

BACKENDS = ("auto", "triton", "torch", "reference")
MAX_TRITON_D = 16  # triton_impl.MAX_D


def _triton_impl():
    """The Triton backend, imported on first use: triton is optional, and the kernels must be
    defined after TRITON_INTERPRET is set (CPU runs)."""
    from .triton_impl import sde_covariance_triton

    return sde_covariance_triton


def sde_covariance(A: torch.Tensor, dt: torch.Tensor, g: torch.Tensor, backend: str = "auto",
                   check_finite: bool | None = None) -> torch.Tensor:
    """S (B, T, D, D), the covariance of ``local_linear_sde_step`` (0 where dt <= 0); differentiable in A,
    dt and g (the derivative in dt at dt = 0 is taken from the left: 0).  backend "auto" (triton for
    CUDA tensors with D <= 16, torch otherwise), "triton" (Taylor and doubling in one kernel
    launch; first derivatives only), "torch" (the same scheme with per-cell Taylor terms; first
    derivatives only for D <= 7) or "reference" (Van Loan, dense; second derivatives too).
    Shapes, dtypes and devices are always checked; check_finite as ``local_linear_sde_step``."""
    _checked(A, dt, g, None, check_finite)
    backend = _backend(backend, A)
    impl = {"reference": sde_covariance_reference, "torch": sde_covariance_torch}.get(backend)
    return (impl or _triton_impl())(A, dt, g)


def sde_noise(A: torch.Tensor, dt: torch.Tensor, g: torch.Tensor, eps: torch.Tensor, backend: str = "auto",
              check_finite: bool | None = None):
    """L eps (B, T, D), L L^T = ``sde_covariance(A, dt, g)`` (``psd_cholesky``'s factor), for
    standard-normal eps (B, T, D): the noise of the step's sample; 0 where dt <= 0.  The torch
    backend computes only the pairs with dt > 0 and never forms the (B, T, D, D) covariance.
    Checks as ``sde_covariance``."""
    _checked(A, dt, g, eps, check_finite)
    backend = _backend(backend, A)
    if backend == "torch":
        return sde_noise_torch(A, dt, g, eps)
    S = sde_covariance(A, dt, g, backend=backend, check_finite=False)
    return (psd_cholesky(S) @ eps[..., None])[..., 0]


def _checked(A, dt, g, eps, check_finite, x0=None):
    """Shapes, dtypes and devices; with check_finite (default: off CUDA) the values too.  Returns
    (B, T, D) and whether the values were checked (x0 None: an op without states)."""
    B, T, D = validate_sde_inputs(A, x0, dt, g, eps)
    if check_finite is None:
        check_finite = A.device.type != "cuda"
    if check_finite:
        check_sde_values(A, x0, dt, g, eps)
    return B, T, D, check_finite


def _backend(backend: str, A: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    return resolve_backend(backend, A.device, A.shape[-1], MAX_TRITON_D, "A")


def local_linear_sde_step(A: torch.Tensor, x0: torch.Tensor, dt: torch.Tensor, g: torch.Tensor,
                          eps: torch.Tensor | None = None, backend: str = "auto", step_backend: str = "auto",
                          return_cov: bool = False, check_finite: bool | None = None):
    """The exact Gaussian transition of the frozen linear SDE for every (cell, time) pair.

    Args:
        A: (B, D, D) operators; x0: (B, D) start states; dt: (B, T) time offsets.  Noise acts forward
            in time: a pair with dt <= 0 has covariance 0 (its sample is the deterministic decode).
        g: (B, D) per-cell or (D,) shared diagonal noise scales, >= 0 (G = diag(g)).
        eps: (B, T, D) standard-normal draws, or None (no sample).
        backend: the covariance's, "auto", "triton", "torch" or "reference" (``sde_covariance``);
            step_backend: the mean's (``local_linear_step``'s backend).
        return_cov: also return S.
        check_finite: as ``local_linear_step``; also rejects negative g.

    Returns:
        X, V, Y (B, T, D) — the mean, the drift A X at the mean and the sample X + L eps (Y is None
        without eps) — and S (B, T, D, D) when ``return_cov``.  Differentiable in A, x0, dt and g
        (first derivatives; the mean through ``local_linear_step``'s backward).  With g = 0, Y and X
        are the deterministic step exactly.
    """
    B, T, D, check_finite = _checked(A, dt, g, eps, check_finite, x0)
    if B == 0 or T == 0:
        X, V = empty_result(A, x0, dt)
        S = X.new_zeros(B, T, D, D) + 0 * g.sum()
        Y = None if eps is None else X + 0 * eps
    else:
        X, V = local_linear_step(A, x0, dt, backend=step_backend, check_finite=False)
        S = sde_covariance(A, dt, g, backend=backend, check_finite=False) if return_cov else None
        if eps is None:
            Y = None
        elif S is None:
            Y = X + sde_noise(A, dt, g, eps, backend=backend, check_finite=False)
        else:
            Y = X + (psd_cholesky(S) @ eps[..., None])[..., 0]
        if check_finite:
            check_overflow(X, V)
    return (X, V, Y, S) if return_cov else (X, V, Y)
