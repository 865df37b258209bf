"""laplace_mmd: forward and forward+backward, backends side by side (N = M, D = 5).

x ~ N(0, I), y ~ N(0.2, I); gradients with respect to x (the predictions), as in training.
The dense reference runs only where its N x M matrices fit comfortably (N <= 4096).
"""
import subprocess
import sys

import pytest
import torch

from cellmnn_kernels import laplace_mmd
from cellmnn_kernels.ops.utils import triton_usable_on
from cellmnn_kernels.testing import PEAK_CODE

from conftest import RESULTS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [200, 4096, 20000]
BACKENDS = ["reference", "torch"] + (["triton"] if DEVICE == "cuda" and triton_usable_on(torch.device("cuda")) else [])


def make_points(N, D=5, dtype=torch.float32, device=DEVICE, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=dtype)
    y = torch.randn(N, D, generator=g, dtype=dtype) + 0.2
    return x.to(device), y.to(device)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("N", SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_laplace_mmd(benchmark, backend, N, mode):
    if backend == "reference" and N > 4096:
        pytest.skip("dense N x N matrices: several GB")
    x, y = make_points(N)
    x.requires_grad_(mode == "fwd+bwd")

    def run():
        v = laplace_mmd(x, y, backend=backend, check_finite=False)
        if mode == "fwd+bwd":
            v.backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    rounds = 3 if N >= 4096 else 50
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
    RESULTS.setdefault(("laplace_mmd", f"N=M={N}", mode), {})[backend] = benchmark.stats.stats.median


@pytest.mark.parametrize("backend,N", [("torch", 20000), ("reference", 4096), ("torch", 4096)])
def test_peak_memory(backend, N):
    """Growth of the peak resident memory of a fresh process over one forward+backward (MB)."""
    code = PEAK_CODE.format(N=N, backend=backend)
    mb = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    print(f"\npeak memory growth, {backend}, N = M = {N}, fwd+bwd: {mb} MB")
