"""laplace_mmd: forward and forward+backward, backends side by side (N = M, D = 5).

x ~ N(0, I), y ~ N(0.2, I); gradients with respect to x (the predictions), as in training.
The dense reference runs only where its N x M matrices fit comfortably (N <= 4096).

laplace_mmd_grouped: one training step of an ensemble of E models (forward+backward, D = 3),
where per-call overhead of many small terms matters: per model, 3 source segments of 67, 67, 66
points each decoded to every later target among 3 (6 terms, each with its own x segment),
y segments of 200 points per (model, target), term weights 0.1 ** (steps ahead - 1).

laplace_mmd_loss: the same step's whole loss per model (its MMD terms with the observed cells'
own term given, as training steps give it, a velocity term on every point and the backward into
both), against the composition it replaced: laplace_mmd_grouped, then the per-model sums.
"""
import subprocess
import sys

import pytest
import torch

from cellmnn_kernels import laplace_mmd, laplace_mmd_grouped
from cellmnn_kernels.ops.laplace_mmd_loss import LossPlan, laplace_mmd_loss
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


def ensemble_step(E, D=3, dtype=torch.float32, device=DEVICE, seed=0):
    """Points, offsets, terms and term weights of one ensemble training step (module docstring)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    source = [67, 67, 66]
    x_sizes, y_sizes, terms_x, terms_y, weights = [], [], [], [], []
    for e in range(E):
        for s in range(3):
            for f in range(s + 1, 4):  # targets 1..3 after source s
                terms_x.append(len(x_sizes))
                x_sizes.append(source[s])
                terms_y.append(3 * e + f - 1)
                weights.append(0.1 ** (f - s - 1))
        y_sizes += [200] * 3
    x_off, y_off = [0], [0]
    for n in x_sizes:
        x_off.append(x_off[-1] + n)
    for n in y_sizes:
        y_off.append(y_off[-1] + n)
    x = torch.randn(x_off[-1], D, generator=g, dtype=dtype)
    y = torch.randn(y_off[-1], D, generator=g, dtype=dtype) + 0.2
    return x.to(device), x_off, y.to(device), y_off, terms_x, terms_y, weights


@pytest.mark.parametrize("E", [1, 9])
@pytest.mark.parametrize("backend", BACKENDS)
def test_laplace_mmd_grouped_ensemble(benchmark, backend, E):
    x, x_off, y, y_off, terms_x, terms_y, weights = ensemble_step(E)
    x.requires_grad_()

    def run():
        total, _ = laplace_mmd_grouped(x, x_off, y, y_off, terms_x, terms_y, weights, 1.0, backend=backend,
                                       check_finite=False)
        total.backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=50, warmup_rounds=3, iterations=1)
    RESULTS.setdefault(("laplace_mmd_grouped", f"ensemble E={E}", "fwd+bwd"), {})[backend] = \
        benchmark.stats.stats.median


@pytest.mark.parametrize("E", [1, 9])
@pytest.mark.parametrize("form", ["laplace_mmd_loss", "composition"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_laplace_mmd_loss_ensemble(benchmark, backend, form, E):
    x, x_off, y, y_off, terms_x, terms_y, weights = ensemble_step(E)
    n_terms, N = len(terms_x), x.shape[0]
    member = [t // 6 for t in range(n_terms)]  # 6 terms per model
    rows_member = torch.repeat_interleave(torch.arange(E), torch.tensor([x_off[6 * (e + 1)] - x_off[6 * e]
                                                                         for e in range(E)])).to(DEVICE)
    plan = LossPlan(range(N), x_off, y_off, terms_x, terms_y, weights, member, E, N, rows_member.tolist(),
                    energy_weight=[0.1] * N)
    y_self = torch.full((len(y_off) - 1,), 0.3, device=DEVICE)
    V = torch.randn_like(x).requires_grad_()
    x.requires_grad_()
    tm, w = torch.tensor(member, device=DEVICE), torch.tensor(weights, device=DEVICE)

    def run():
        if form == "laplace_mmd_loss":
            loss, _ = laplace_mmd_loss(plan, x, y, y_self, V, backend=backend, check_finite=False)
        else:
            _, per_term = laplace_mmd_grouped(x, x_off, y, y_off, terms_x, terms_y, None, 1.0, backend=backend,
                                              check_finite=False, y_self=y_self)
            loss = x.new_zeros(E).index_add(0, tm, per_term * w) + \
                x.new_zeros(E).index_add(0, rows_member, 0.1 * (V * V).sum(1))
        loss.sum().backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=50, warmup_rounds=3, iterations=1)
    RESULTS.setdefault((form, f"ensemble E={E}", "fwd+bwd"), {})[backend] = benchmark.stats.stats.median


@pytest.mark.parametrize("backend,N", [("torch", 20000), ("reference", 4096), ("torch", 4096)])
def test_peak_memory(backend, N):
    """Growth of the peak resident memory of a fresh process over one forward+backward (MB)."""
    code = PEAK_CODE.format(N=N, backend=backend)
    mb = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    print(f"\npeak memory growth, {backend}, N = M = {N}, fwd+bwd: {mb} MB")
