"""fused_mlp: forward and forward+backward of E stacked operator networks (the default network of
a 5-d model: 6 inputs, four hidden layers of 96, 25 outputs), backends side by side.

Weights at the default initialisation's scale, x = randn.  Backends: "reference" (one model and one
layer at a time), "torch" (one batched product per layer, what training runs on the CPU) and, on
CUDA only, "triton" (the fused kernels; on a machine without a GPU they would only run
interpreted, not a speed measurement).
"""
import pytest
import torch

from cellmnn_kernels import fused_mlp

from bench_local_linear_step import DEVICE, _sync
from conftest import RESULTS

SIZES = [(1, 200), (9, 200), (1, 4096), (9, 4096)]  # (models E, cells per model n)
SHAPES = [(6, 96), (96, 96), (96, 96), (96, 96), (96, 25)]
BACKENDS = ["reference", "torch"] + (["triton"] if DEVICE == "cuda" else [])


def make_inputs(E: int, n: int):
    """flat (E, P) and x (E, n, 6) on the benchmark device, seeded."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    parts = [(torch.rand(E, a * b + b, generator=gen) * 2 - 1) / a ** 0.5 for a, b in SHAPES]
    return torch.cat(parts, 1).to(DEVICE), torch.randn(E, n, SHAPES[0][0], generator=gen).to(DEVICE)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("E,n", SIZES, ids=[f"E{e}x{n}" for e, n in SIZES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_mlp(benchmark, backend, E, n, mode):
    flat, x = make_inputs(E, n)
    if mode == "fwd+bwd":
        flat.requires_grad_()

    def run():
        y = fused_mlp(flat, SHAPES, x, backend=backend)
        if mode == "fwd+bwd":
            y.backward(torch.ones_like(y))
        _sync()

    benchmark.pedantic(run, rounds=10, warmup_rounds=1, iterations=1)
    RESULTS.setdefault(("fused_mlp", f"E{E}x{n}", mode), {})[backend] = benchmark.stats.stats.median
