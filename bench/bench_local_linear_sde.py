"""local_linear_sde_step: forward and forward+backward of the SDE step (mean, drift and a sample)
beside the deterministic step it extends, at the same sizes.

Inputs as bench_local_linear_step.py (A = randn / sqrt(D), dt uniform in [0, 4]) and a per-cell noise
scale g uniform in [0.1, 1].  Backends: "reference" (Van Loan's dense block exponential per pair),
"torch" (Taylor and doubling), and "step" — ``local_linear_step`` alone (no noise): the ratio
torch / step is what the noise costs.
"""
import pytest
import torch

from cellmnn_kernels import local_linear_sde_step, local_linear_step

from bench_local_linear_step import DEVICE, _sync, make_inputs
from conftest import RESULTS

SIZES = [(200, 5, 5), (1800, 5, 5), (2048, 16, 5), (2048, 5, 10)]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("B,T,D", SIZES, ids=[f"{b}x{t}x{d}" for b, t, d in SIZES])
@pytest.mark.parametrize("backend", ["reference", "torch", "step"])
def test_local_linear_sde_step(benchmark, backend, B, T, D, mode):
    A, x0, dt = make_inputs(B, T, D)
    gen = torch.Generator(device="cpu").manual_seed(1)
    g = (0.1 + 0.9 * torch.rand(B, D, generator=gen)).to(DEVICE)
    eps = torch.randn(B, T, D, generator=gen).to(DEVICE)
    if mode == "fwd+bwd":
        A, x0, dt, g = (t.requires_grad_() for t in (A, x0, dt, g))

    def run():
        if backend == "step":
            X, V = local_linear_step(A, x0, dt, check_finite=False)
            Y = X
        else:
            X, V, Y = local_linear_sde_step(A, x0, dt, g, eps, backend=backend, check_finite=False)
        if mode == "fwd+bwd":
            torch.autograd.backward([Y, V], [torch.ones_like(Y), torch.ones_like(V)])
        _sync()

    benchmark.pedantic(run, rounds=3 if backend == "reference" else 10, warmup_rounds=1, iterations=1)
    RESULTS.setdefault(("local_linear_sde_step", f"{B}x{T}x{D}", mode), {})[backend] = benchmark.stats.stats.median
