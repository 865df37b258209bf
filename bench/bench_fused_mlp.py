"""fused_mlp: forward and forward+backward of E stacked operator networks (the default network of
a 5-d model: 6 inputs, four hidden layers of 96, 25 outputs), backends side by side.

Weights at the default initialisation's scale, x = randn (``cellmnn_kernels.testing.mlp_inputs``).
Backends: "reference" (one model and one layer at a time), "torch" (one batched product per
layer, what training runs on the CPU) and, on CUDA only, "triton" (the fused kernels; on a
machine without a GPU they would only run interpreted, not a speed measurement).
"""
import pytest
import torch

from cellmnn_kernels import fused_mlp
from cellmnn_kernels.testing import mlp_inputs

from bench_local_linear_step import DEVICE, _sync
from conftest import RESULTS

SIZES = [(1, 200), (9, 200), (1, 4096), (9, 4096)]  # (models E, cells per model n)
BACKENDS = ["reference", "torch"] + (["triton"] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("E,n", SIZES, ids=[f"E{e}x{n}" for e, n in SIZES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_mlp(benchmark, backend, E, n, mode):
    shapes, flat, x = mlp_inputs(0, 5, 96, 4, 25, E, n, device=DEVICE)
    if mode == "fwd+bwd":
        flat.requires_grad_()

    def run():
        y = fused_mlp(flat, shapes, x, backend=backend)
        if mode == "fwd+bwd":
            y.backward(torch.ones_like(y))
        _sync()

    benchmark.pedantic(run, rounds=10, warmup_rounds=1, iterations=1)
    RESULTS.setdefault(("fused_mlp", f"E{E}x{n}", mode), {})[backend] = benchmark.stats.stats.median
