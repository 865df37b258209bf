"""local_linear_step: forward and forward+backward, backends side by side.

Inputs: A = randn(D, D) / sqrt(D) per cell (spectral radius about 1), x0 = randn, dt uniform in
[0, 4] (a time course of four units, like the EMT data's timepoints): ||dt A||_1 up to ~10-20.
"""
import pytest
import torch

from cellmnn_kernels import local_linear_step
from cellmnn_kernels.ops.utils import triton_usable_on

from conftest import RESULTS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [(200, 5, 5), (2048, 16, 5), (2048, 16, 16), (8192, 16, 5)]
BACKENDS = ["reference", "torch"] + (["triton"] if DEVICE == "cuda" and triton_usable_on(torch.device("cuda")) else [])


def make_inputs(B, T, D, dtype=torch.float32, device=DEVICE, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    A = torch.randn(B, D, D, generator=g, dtype=dtype) / D ** 0.5
    x0 = torch.randn(B, D, generator=g, dtype=dtype)
    dt = 4 * torch.rand(B, T, generator=g, dtype=dtype)
    return A.to(device), x0.to(device), dt.to(device)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("B,T,D", SIZES, ids=[f"{b}x{t}x{d}" for b, t, d in SIZES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_local_linear_step(benchmark, backend, B, T, D, mode):
    A, x0, dt = make_inputs(B, T, D)
    if mode == "fwd+bwd":
        A, x0, dt = (t.requires_grad_() for t in (A, x0, dt))

    def run():
        X, V = local_linear_step(A, x0, dt, backend=backend, check_finite=False)
        if mode == "fwd+bwd":
            torch.autograd.backward([X, V], [torch.ones_like(X), torch.ones_like(V)])
        _sync()

    rounds = 3 if backend == "reference" and D >= 16 else 10
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
    RESULTS.setdefault(("local_linear_step", f"{B}x{T}x{D}", mode), {})[backend] = benchmark.stats.stats.median
