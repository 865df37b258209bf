"""What every backend of ``local_linear_sde_step`` shares: the covariance scheme's constants, the
guarded Cholesky factor and the input checks.

Scheme ("Taylor and doubling", the covariance analogue of the step's scaling and squaring): for a
pair with tau = dt > 0 let s be the smallest integer with ||(tau / 2^s) A||_1 <= THETA and h = tau / 2^s.
Then E(h) = expm(h A) and S(h) = int_0^h expm(uA) Q expm(uA)^T du, Q = diag(g^2), are Taylor series
in h (S solves dS/du = A S + S A^T + Q, S(0) = 0, so S(h) = sum_n h^(n+1) / (n+1)! L^n(Q) with
L(X) = A X + X A^T), and s doublings S(2u) = S(u) + E(u) S(u) E(u)^T, E(2u) = E(u)^2 give S(tau).
Each doubling adds a positive semi-definite matrix and, with ||h A||_1 <= 1/2, no Taylor term exceeds
S(h) by more than about e, so little cancels whatever the sign of A's eigenvalues (Van Loan's block
exponential, the reference, subtracts through expm(-tau A)).  Every backend carries E = I + F as F
(S <- 2 S + F S + S F^T + F S F^T, F <- 2 F + F^2): s is one for the call, so a pair far shorter than
the longest is doubled with F tiny, and I + F would round F's digits away (float32 lost 1e-3 of S
with pairs 10^4 apart in one call).
"""
from __future__ import annotations

import math

import torch

from ..local_linear_step.common import NU_MAX, operator_norm1, validate_inputs
from ..utils import check_same_dtype_device, check_tensor, raise_if_nonfinite

# dtype -> (theta, m): ||h A||_1 <= theta, Taylor degree m of E(h) and S(h).  ||L||_1 <= 2 theta, so
# the last term kept is at most (2 theta)^m / (m+1)! ||h Q|| relative to h Q:
#   float32: 1^11 / 12!  = 2.1e-9  <= 2^-24;   float64: 1^18 / 19! = 8.2e-18 <= 2^-53.
# The Triton kernels use m as it stands; the torch path lowers it to what the call needs (``degree``).
TAYLOR = {torch.float32: (0.5, 11), torch.float64: (0.5, 18)}


def doublings(A: torch.Tensor, dt: torch.Tensor) -> tuple[int, float]:
    """(s, nu) of the call, every backend's: nu = the largest ||dt A||_1 over pairs with dt > 0 (one
    host synchronisation; 0 without pairs) and s the smallest number of doublings with
    ||(dt / 2^s) A||_1 <= theta for every pair (0 where nu is not finite: the result is then not
    finite either)."""
    theta, _ = TAYLOR[A.dtype]
    if A.shape[0] == 0 or dt.shape[1] == 0:
        return 0, 0.0
    nu = float((dt.detach().clamp_min(0).amax(1) * operator_norm1(A)).max())
    return (math.ceil(math.log2(nu / theta)) if math.isfinite(nu) and nu > theta else 0), nu


def validate_sde_inputs(A, x0, dt, g, eps):
    """Check types, dtypes, devices and shapes of the SDE step's inputs (x0 or eps None: not given);
    return (B, T, D)."""
    B, T, D = validate_inputs(A, x0, dt)
    check_tensor("g", g, g.dim() if isinstance(g, torch.Tensor) and g.dim() in (1, 2) else 2, "(B, D) or (D,)")
    check_same_dtype_device(A=A, g=g)
    if tuple(g.shape) not in ((B, D), (D,)):
        raise ValueError(f"g must have shape (B, D) = ({B}, {D}) or (D,) = ({D},); got {tuple(g.shape)}")
    if eps is not None:
        check_tensor("eps", eps, 3, "(B, T, D)")
        check_same_dtype_device(A=A, eps=eps)
        if tuple(eps.shape) != (B, T, D):
            raise ValueError(f"eps must have shape (B, T, D) = ({B}, {T}, {D}); got {tuple(eps.shape)}")
    return B, T, D


def check_sde_values(A, x0, dt, g, eps) -> None:
    """Reject NaN/Inf inputs, negative noise scales and ||dt A||_1 beyond NU_MAX (one host sync);
    x0 or eps None: not given."""
    given = {k: v for k, v in dict(x0=x0, eps=eps).items() if v is not None}
    raise_if_nonfinite(A=A, dt=dt, g=g, **given)
    if g.numel() and bool((g < 0).any()):
        raise ValueError(f"g must be non-negative (noise scales); its smallest entry is {g.min().item():.4g}")
    if A.shape[0] and dt.shape[1]:
        nu = (dt.detach().abs().amax(dim=1) * operator_norm1(A)).max().item()
        if nu > NU_MAX:
            raise ValueError(f"dt * A is out of range: max ||dt * A||_1 = {nu:.4g} exceeds {NU_MAX:.0e}")


def psd_cholesky(S: torch.Tensor) -> torch.Tensor:
    """A lower-triangular L with L L^T = S for symmetric positive semi-definite S (..., D, D).

    Plain Cholesky (one batched LAPACK call) where every S is zero or positive definite, zero
    matrices giving L = 0 exactly (no noise, or dt <= 0).  When some S is singular but not zero,
    every factor is taken by ``guarded_cholesky`` instead (one host synchronisation decides).
    Differentiable (autograd).
    """
    if S.numel() == 0:
        return S.clone()
    zero = S.detach().abs().amax((-2, -1)) == 0
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    L, info = torch.linalg.cholesky_ex(S + zero[..., None, None] * eye)
    if bool((info != 0).any()):
        return guarded_cholesky(S)
    return L * (~zero)[..., None, None]


def guarded_cholesky(S: torch.Tensor) -> torch.Tensor:
    """Cholesky of symmetric positive semi-definite S (..., D, D), column by column, except that a
    pivot at or below D * unit roundoff * max diag(S) ends its column (the column is set to zero): a
    singular S gives a factor whose product differs from S by at most that pivot bound.
    Differentiable (autograd; pivots above the bound have finite derivatives)."""
    D = S.shape[-1]
    tol = D * torch.finfo(S.dtype).eps * S.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(0)
    rows = torch.arange(D, device=S.device)
    cols = []
    for j in range(D):
        r = S[..., :, j]
        if j:
            Lp = torch.stack(cols, -1)  # (..., D, j)
            r = r - (Lp * Lp[..., j:j + 1, :]).sum(-1)
        d = r[..., j]
        ok = ~(d <= tol)  # NaN stays NaN
        root = torch.sqrt(torch.where(ok, d, torch.ones_like(d)))
        c = torch.where(ok[..., None] & (rows >= j), r / root[..., None], torch.zeros_like(r))
        cols.append(c)
    return torch.stack(cols, -1)
