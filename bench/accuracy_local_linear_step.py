"""Measured accuracy of local_linear_step against the float64 matrix-exponential oracle.

    python bench/accuracy_local_linear_step.py [--backends torch triton] [--B 64]

For each backend, dtype, spectral kind and ||dt A||_1 in {1, 10, 30}: the worst per-pair error
in units of the contract's scale (X: ||X_ref|| + 1e-6 ||x0||; V: ||V_ref|| + 1e-6 ||A||_1 ||x0||)
and the relative Frobenius errors of the three gradients.  Prints a Markdown table.
Triton runs interpreted on CPU tensors (set TRITON_INTERPRET=1), so keep --B small there.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cellmnn_kernels import local_linear_step  # noqa: E402
from cellmnn_kernels.ops.local_linear_step import local_linear_step_reference  # noqa: E402
from cellmnn_kernels.testing import KINDS, build_inputs  # noqa: E402


def measure(backend, dtype, kind, nu, B, T, D, device):
    A, x0, dt = build_inputs(1234, B, T, D, kind, nu, "mixed", dtype, device=device)
    ins = [t.detach().clone().requires_grad_() for t in (A, x0, dt)]
    X, V = local_linear_step(*ins, backend=backend)
    ref_in = [t.detach().double().requires_grad_() for t in (A, x0, dt)]
    Xr, Vr = local_linear_step_reference(*ref_in)
    g = torch.Generator().manual_seed(0)
    gX, gV = (torch.randn(X.shape, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    torch.autograd.backward([X, V], [gX.to(dtype), gV.to(dtype)])
    torch.autograd.backward([Xr, Vr], [gX, gV])
    nx0 = x0.double().norm(dim=-1)[:, None]
    nA = A.double().abs().sum(1).amax(1)[:, None]
    ex = ((X.double() - Xr).norm(dim=-1) / (Xr.norm(dim=-1) + 1e-6 * nx0)).max().item()
    ev = ((V.double() - Vr).norm(dim=-1) / (Vr.norm(dim=-1) + 1e-6 * nA * nx0)).max().item()
    eg = [((a.grad.double() - b.grad).norm() / b.grad.norm()).item() for a, b in zip(ins, ref_in)]
    return ex, ev, *eg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=["torch"])
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--T", type=int, default=8)
    ap.add_argument("--D", type=int, default=5)
    ap.add_argument("--nus", type=float, nargs="+", default=[1.0, 10.0, 30.0])
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"B={args.B}, T={args.T}, D={args.D}, device {device}; worst over pairs and over ||dt A||_1 in {args.nus}")
    print("| backend | dtype | kind | X err | V err | dA | dx0 | ddt |")
    print("|---|---|---|---|---|---|---|---|")
    for backend in args.backends:
        for dtype in (torch.float32, torch.float64):
            for kind in KINDS:
                worst = [0.0] * 5
                for nu in args.nus:
                    vals = measure(backend, dtype, kind, nu, args.B, args.T, args.D, device)
                    worst = [max(w, v) for w, v in zip(worst, vals)]
                print(f"| {backend} | {str(dtype)[6:]} | {kind} | " + " | ".join(f"{w:.1e}" for w in worst) + " |")


if __name__ == "__main__":
    main()
