"""Test inputs for the ops: operators of chosen spectral types at a chosen ||dt A||_1.

Used by the tests and the accuracy report (``bench/accuracy_local_linear_step.py``).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .ops.utils import HAS_TRITON, triton_usable_on

KINDS = ["random", "decaying", "growing", "mixed", "nonnormal", "rotation", "diagonal"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def backend_param(name: str):
    """A pytest parameter for backend ``name``, skipped (with the reason) where it cannot run."""
    import pytest

    usable = name != "triton" or triton_usable_on(torch.device(DEVICE))
    reason = "triton is not installed" if not HAS_TRITON else "needs CUDA or TRITON_INTERPRET=1"
    return pytest.param(name, marks=[] if usable else pytest.mark.skip(reason=reason), id=name)


def make_operator(rng, D, kind):
    """One D x D operator of a given spectral type, unit scale (rescaled to the wanted norm later)."""
    if kind == "random":
        return rng.standard_normal((D, D))
    if kind == "rotation":
        M = rng.standard_normal((D, D))
        return M - M.T
    if kind == "diagonal":
        return np.diag(rng.uniform(-1.0, 1.0, D))
    if kind == "nonnormal":  # upper triangular, off-diagonal as large as the eigenvalues
        return np.diag(rng.uniform(-1.0, 0.5, D)) + np.triu(rng.uniform(-1.0, 1.0, (D, D)), 1)
    lam = {"decaying": -rng.uniform(0.01, 1.0, D),
           "growing": rng.uniform(0.01, 1.0, D),
           "mixed": rng.choice([-1.0, 1.0], D) * np.geomspace(1.0, 1e-3, D)}[kind]
    S = np.eye(D) + 0.3 * rng.standard_normal((D, D)) / math.sqrt(D)
    return S @ np.diag(lam) @ np.linalg.inv(S)


def build_inputs(seed, B, T, D, kind, nu, sign, dtype, layout="contiguous", device="cpu"):
    """A (B,D,D), x0 (B,D), dt (B,T) with max_k ||dt[b,k] A[b]||_1 = nu for every cell."""
    rng = np.random.default_rng(seed)
    A = np.stack([make_operator(rng, D, kind) for _ in range(B)])
    x0 = rng.standard_normal((B, D))
    dt = rng.uniform(0.05, 1.0, (B, T))
    if sign == "neg":
        dt = -dt
    elif sign == "mixed":
        dt = dt * rng.choice([-1.0, 1.0], (B, T))
        dt[0, 0] = 0.0
    reach = np.abs(dt).max(axis=1) * np.abs(A).sum(axis=1).max(axis=1)
    A = A * np.where(reach > 0, nu / np.where(reach > 0, reach, 1.0), 1.0)[:, None, None]
    A, x0, dt = (torch.tensor(v, dtype=dtype, device=device) for v in (A, x0, dt))
    if layout == "strided":  # same values, non-contiguous storage
        A = A.transpose(1, 2).contiguous().transpose(1, 2)
        big = torch.zeros(B, 2 * D, dtype=dtype, device=device)
        big[:, ::2] = x0
        x0 = big[:, ::2]
        dt = dt.t().contiguous().t()
    return A, x0, dt


def mlp_inputs(seed: int, D: int, width: int, depth: int, n_out: int, E: int, n: int, dtype=torch.float32,
               device="cpu"):
    """shapes, flat (E, P) and x (E, n, D + 1) for ``fused_mlp``: the network on (x, t) of a
    D-dimensional model, its weights uniform at the default initialisation's scale (1/sqrt(fan-in)),
    x standard normal; drawn in float64 from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(D + 1, width)] + [(width, width)] * (depth - 1) + [(width, n_out)]
    P = sum(a * b + b for a, b in shapes)
    parts = [(torch.rand(a * b + b, generator=g, dtype=torch.float64) * 2 - 1) / a ** 0.5
             for _ in range(E) for a, b in shapes]
    flat = torch.cat(parts + [torch.zeros(0, dtype=torch.float64)]).view(E, P)
    x = torch.randn(E, n, D + 1, generator=g, dtype=torch.float64)
    return shapes, flat.to(dtype=dtype, device=device), x.to(dtype=dtype, device=device)


def scaled_examples(n: int) -> int:
    """n hypothesis examples under the default "ci" profile (25 examples), proportionally more
    under a larger profile (HYPOTHESIS_PROFILE=thorough in tests/conftest.py)."""
    from hypothesis import settings

    return max(1, n * settings.default.max_examples // 25)


# A script for ``python -c`` after ``.format(N=..., backend=...)``: prints the peak resident
# memory of one laplace_mmd forward+backward above the resident memory just before it, in MB
# (Linux: the high-water mark is reset through /proc/self/clear_refs).
PEAK_CODE = """
import torch
from cellmnn_kernels import laplace_mmd
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) // 1024
x = torch.randn({N}, 5, requires_grad=True); y = torch.randn({N}, 5)
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS:")
laplace_mmd(x, y, backend="{backend}").backward()
print(status("VmHWM:") - base)
"""


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, rtol: float, name: str = "value", floor: float = 0.0,
                     dim=None) -> None:
    """||got - want|| <= rtol (||want|| + floor), with norms over ``dim`` (None: the whole tensor),
    comparing in float64; the message names the value and the worst ratio to the tolerance."""
    err = (got.double() - want.double()).norm(dim=dim) if dim is not None else (got.double() - want.double()).norm()
    ref = want.double().norm(dim=dim) if dim is not None else want.double().norm()
    tol = rtol * (ref + floor) + 1e-300
    if not bool((err <= tol).all()):
        worst = float((err / tol).max())
        raise AssertionError(f"{name}: error is {worst:.3g} x the tolerance (rtol {rtol:g})")
