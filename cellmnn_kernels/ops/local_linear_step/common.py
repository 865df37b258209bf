"""What every backend of ``local_linear_step`` shares: the scheme's constants and the input checks.

The fast backends (``torch`` and ``triton``) use one scheme, "anchored Taylor steps":

* For cell b, let n = ||A||_1 (max column sum) and h = theta / n.  Along each direction of time
  (dt >= 0 and dt < 0) the cell's exact trajectory is marched in anchor steps of length h:
  y_0 = x0, y_{a+1} = p(sign * h * A) y_a, where p is the degree-m Taylor polynomial of exp.
* A pair (b, k) with nu = |dt| * n sits at anchor a = floor(nu / theta) with remainder
  r = dt - sign * a * h, |r| * n <= theta, and is finished with one more polynomial:
  X = p(r A) y_a, V = A X.
* The backends differ in how they evaluate the polynomials.  The register Triton kernels
  (float32, D <= 5) form the step matrix p(+-Z) once per cell, march the anchors with one
  matvec per level, and finish each pair from its *nearest* anchor (|r| <= h / 2) with a
  Horner polynomial of lower degree (``FINISH``).  The tiled Triton kernels form,
  once per cell and anchor, the Krylov vectors K_j = Z^j y_a / j! of the scaled operator
  Z = h A (every one bounded by theta^j / j! ||y_a||) and finish each pair in O(m D) with
  rho = r / h: X = sum_{j<=m} rho^j K_j and V = (1/h) sum_{j=1}^{m+1} j rho^(j-1) K_j
  (Z K_j = (j+1) K_{j+1}, so V needs no extra product).  The torch path, like the register
  kernels, finishes from the nearest anchor with degree ``FINISH``, by Horner on vectors in
  batched GEMMs.

Every step has ||Z||_1 <= theta, so the relative truncation error of each Taylor polynomial is at
most theta^(m+1) / (m+1)! * e^(2 theta) (remainder bound divided by the smallest possible
||e^Z y|| / ||y|| = e^-theta), which (theta, m) below keep under the unit roundoff.  Anchors
only ever march forward in their own direction, so strongly decaying operators lose no
relative accuracy to cancellation (Al-Mohy & Higham 2011 discuss the same trade-off for the
action of the matrix exponential); the nearest-anchor finish (register kernels, torch path) may
go back at most h / 2 from the next anchor, which can amplify that anchor's relative error by at
most e^(theta / 2).  The anchor spacing h and the split of dt into anchor and remainder do not
change the exact value of X, so gradients treat them as constants.
"""
from __future__ import annotations

import torch

from ..utils import check_same_dtype_device, check_tensor, count_nonfinite, raise_if_nonfinite

# dtype -> (theta, m): step norm bound and Taylor degree.
#   float32: 1.0^12 / 12! * e^2   = 1.5e-8  <= 2^-24 = 6.0e-8
#   float64: 0.5^15 / 15! * e^1   = 6.3e-17 <= 2^-53 = 1.1e-16
TAYLOR = {torch.float32: (1.0, 11), torch.float64: (0.5, 14)}

# Finish degree from the nearest anchor, |r A|_1 <= theta / 2 (the torch path and the register
# Triton kernels):
#   float32: 0.5^9 / 9! * e^1      = 1.5e-8 <= 2^-24
#   float64: 0.25^13 / 13! * e^0.5 = 3.9e-18 <= 2^-53
FINISH = {torch.float32: 8, torch.float64: 12}

# Largest ||dt * A||_1 that is computed.  Work grows with it (about nu / theta anchor steps per
# cell); no trained Cell-MNN operator comes near it.  Beyond it the checks raise ValueError and,
# with checks off, the Triton kernel writes NaN for the offending pairs.
NU_MAX = 1.0e4

MAX_TRITON_D = 64

SECOND_ORDER = ("local_linear_step: the torch and triton backends have first derivatives only; use "
                "backend='reference' for second derivatives (e.g. create_graph=True and a gradient of a gradient)")


def empty_result(A: torch.Tensor, x0: torch.Tensor, dt: torch.Tensor):
    """X, V of shape (B, T, D) when B or T is 0: empty, and tied to every input so that backward
    works (with zero gradients) as it does for the reference."""
    X = torch.einsum("bij,bj->bi", A, x0)[:, None, :] * dt[:, :, None]
    return X, X.clone()


def taylor_params(dtype: torch.dtype) -> tuple[float, int]:
    """(theta, m) of ``dtype``: the anchor steps' norm bound and Taylor degree (``TAYLOR``)."""
    return TAYLOR[dtype]


def launch_scalars(A: torch.Tensor, x0: torch.Tensor, dt: torch.Tensor) -> dict:
    """The run-time scalars every Triton step kernel takes, by its parameter names: B, T, the
    strides of A, x0 and dt, theta and NU_MAX."""
    theta, _ = taylor_params(A.dtype)
    return dict(B=x0.shape[0], T=dt.shape[1], sAb=A.stride(0), sAi=A.stride(1), sAj=A.stride(2),
                sxb=x0.stride(0), sxd=x0.stride(1), stb=dt.stride(0), stt=dt.stride(1), theta=theta, nu_max=NU_MAX)


def operator_norm1(A: torch.Tensor) -> torch.Tensor:
    """||A[b]||_1, the largest absolute column sum, shape (B,)."""
    return A.detach().abs().sum(dim=1).amax(dim=1)


def validate_inputs(A, x0, dt) -> tuple[int, int, int]:
    """Check types, dtypes, devices and shapes (x0 None: an op without states); return (B, T, D)."""
    check_tensor("A", A, 3, "(B, D, D)")
    if x0 is not None:
        check_tensor("x0", x0, 2, "(B, D)")
    check_tensor("dt", dt, 2, "(B, T)")
    check_same_dtype_device(A=A, dt=dt, **({} if x0 is None else {"x0": x0}))
    B, D, D2 = A.shape
    if D != D2:
        raise ValueError(f"A must have shape (B, D, D) with square operators; got {tuple(A.shape)}")
    if D == 0:
        raise ValueError("A must have D >= 1; got D = 0")
    if x0 is not None and tuple(x0.shape) != (B, D):
        raise ValueError(f"x0 must have shape (B, D) = ({B}, {D}) to match A; got {tuple(x0.shape)}")
    if dt.shape[0] != B:
        raise ValueError(f"dt must have shape (B, T) with B = {B} to match A; got {tuple(dt.shape)}")
    return B, dt.shape[1], D


def check_values(A, x0, dt) -> None:
    """Reject NaN/Inf inputs and ||dt * A||_1 beyond NU_MAX (one host synchronisation)."""
    raise_if_nonfinite(A=A, x0=x0, dt=dt)
    if A.shape[0] == 0 or dt.shape[1] == 0:
        return
    nu = (dt.detach().abs().amax(dim=1) * operator_norm1(A)).max().item()
    if nu > NU_MAX:
        raise ValueError(
            f"dt * A is out of range: max ||dt * A||_1 = {nu:.4g} exceeds {NU_MAX:.0e}; "
            "rescale the time axis or the operators"
        )


def check_overflow(X: torch.Tensor, V: torch.Tensor) -> None:
    """Finite inputs whose exact result exceeds the dtype's range: say so instead of returning Inf."""
    counts = count_nonfinite(X=X, V=V)
    if counts["X"] or counts["V"]:
        raise ValueError(
            f"the result overflows {X.dtype}: {counts['X']} entries of X and {counts['V']} of V are "
            "beyond its range (||expm(dt * A) x0|| is too large); use float64 or smaller dt * A"
        )
