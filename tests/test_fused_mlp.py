"""fused_mlp (E stacked LeakyReLU MLPs) against its float64 reference, and its kernels' fit.

Tolerances, Frobenius error of float32 results against the float64 reference relative to the
reference's norm plus the norm of its magnitudes (the same sums over the terms' absolute values:
a result that cancels to near zero, one cell with one output say, keeps errors of that scale):
- torch backend 2e-5: float32 products (unit roundoff 6e-8) summed over at most 128 terms in each
  of at most five layers, LeakyReLU's slope 0.01 shrinking nothing that grows.
- triton backend 5e-5: on a GPU each product is three tf32 products (``triton_impl``): the operands'
  low parts keep 10 of their bits, so each product carries up to ~3 x 2^-20 = 3e-6 relative error
  against fp32's 6e-8, and the dropped a_lo w_lo is below 2^-20 too; summed as above that stays
  under 5e-5 where a layer's sum cancels by up to ~10x; ``test_three_tf32_products_keep_float32_accuracy``
  emulates the tensor cores' truncation in torch on the default network (measured 3.7e-7; one tf32
  product alone 8.7e-4, float32 1.2e-7).  Under the interpreter (CPU) tl.dot multiplies in float32,
  so the same tolerance holds there with room.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmnn_kernels import fused_mlp
from cellmnn_kernels.ops.fused_mlp import fused_mlp_reference, has_tf32_tensor_cores, triton_serves
from cellmnn_kernels.ops.utils import HAS_TRITON
from cellmnn_kernels.testing import assert_rel_close, backend_param, mlp_inputs, scaled_examples

RTOL = {"torch": 2e-5, "triton": 5e-5}


def magnitudes(flat, shapes, x, gy):
    """The network and its gradients on |flat|, |x| and |gy| (float64): every sum of the result
    with its terms' absolute values, the scale that rounding errors are relative to (a result
    that cancels to near zero has errors of this scale, not of its own)."""
    f, z = flat.double().abs().requires_grad_(), x.double().abs().requires_grad_()
    m = fused_mlp_reference(f, shapes, z)  # LeakyReLU is the identity on these
    m.backward(gy.abs())
    return float(m.norm()), float(f.grad.norm()), float(z.grad.norm())


def check_against_reference(backend, shapes, flat, x, seed):
    """Values and the gradients in flat and x of <gy, y> against float64 autograd of the
    reference, each within RTOL of its own norm plus its magnitudes' (``magnitudes``)."""
    f, z = flat.clone().requires_grad_(), x.clone().requires_grad_()
    y = fused_mlp(f, shapes, z, backend=backend)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y.backward(gy.to(y.dtype))
    f64, z64 = flat.double().requires_grad_(), x.double().requires_grad_()
    want = fused_mlp_reference(f64, shapes, z64)
    want.backward(gy)
    rtol, (my, mf, mz) = RTOL[backend], magnitudes(flat, shapes, x, gy)
    assert_rel_close(y, want.detach(), rtol, "y", floor=my)
    assert_rel_close(f.grad, f64.grad, rtol, "d flat", floor=mf + 1e-30)
    assert_rel_close(z.grad, z64.grad, rtol, "dx", floor=mz + 1e-30)


@pytest.mark.parametrize("backend", ["torch", backend_param("triton")])
@given(seed=st.integers(0, 2**31 - 1), D=st.integers(1, 12), width=st.sampled_from([8, 20, 32, 40, 64, 96, 128]),
       depth=st.integers(1, 4), n_out=st.integers(1, 70), E=st.integers(1, 3), n=st.integers(0, 140))
@settings(max_examples=scaled_examples(6))
def test_matches_float64_reference(backend, seed, D, width, depth, n_out, E, n):
    # cells across several blocks of the kernels (128 / 64 a program), widths of one to four
    # 32-column tiles, outputs across 32-column chunks, no cells at all
    shapes, flat, x = mlp_inputs(seed, D, width, depth, n_out, E, n)
    check_against_reference(backend, shapes, flat, x, seed)


@pytest.mark.parametrize("backend", ["torch", backend_param("triton")])
def test_default_network_with_many_cells(backend):
    # the model's network for a 5-d course, the cells of several backward programs per model
    shapes, flat, x = mlp_inputs(7, 5, 96, 4, 25, 2, 300)
    check_against_reference(backend, shapes, flat, x, 7)


def _tf32(v: torch.Tensor) -> torch.Tensor:
    """v truncated to tf32 (10 mantissa bits), as the tensor cores read an fp32 operand."""
    return (v.view(torch.int32) & -8192).view(torch.float32)


def emulated(flat, shapes, x, products: int):
    """The kernels' arithmetic on a GPU, emulated: every layer's product as ``products`` (1 or 3)
    tf32 products (operands truncated as the tensor cores do) accumulated in float32."""
    out = []
    for e in range(flat.shape[0]):
        h, o = x[e], 0
        for k, (n_in, n_out) in enumerate(shapes):
            W = flat[e, o:o + n_in * n_out].view(n_in, n_out)
            b = flat[e, o + n_in * n_out:o + n_in * n_out + n_out]
            o += n_in * n_out + n_out
            ah, wh = _tf32(h), _tf32(W)
            z = ah @ wh
            if products == 3:
                z = _tf32(h - ah) @ wh + ah @ _tf32(W - wh) + z
            h = z + b
            if k < len(shapes) - 1:
                h = torch.nn.functional.leaky_relu(h, 0.01)
        out.append(h)
    return torch.stack(out)


def test_three_tf32_products_keep_float32_accuracy():
    # The default network: three products stay within the triton tolerance of the float64 result;
    # one tf32 product (what input_precision="tf32" alone would give) does not.
    shapes, flat, x = mlp_inputs(3, 5, 96, 4, 25, 2, 500)
    want = fused_mlp_reference(flat.double(), shapes, x.double())
    assert_rel_close(emulated(flat, shapes, x, 3), want, RTOL["triton"], "three tf32 products")
    one = emulated(flat, shapes, x, 1)
    assert float((one.double() - want).norm() / want.norm()) > 4 * RTOL["triton"]


def test_auto_is_torch_off_cuda_and_errors_name_the_argument():
    shapes, flat, x = mlp_inputs(0, 3, 16, 2, 9, 2, 5)
    if not torch.cuda.is_available():
        assert torch.equal(fused_mlp(flat, shapes, x), fused_mlp(flat, shapes, x, backend="torch"))
    with pytest.raises(ValueError, match="flat has"):
        fused_mlp(flat[:, 1:], shapes, x)
    with pytest.raises(ValueError, match=r"x must have shape \(E, n, in\)"):
        fused_mlp(flat, shapes, x[:, :, 1:])
    with pytest.raises(ValueError, match="layer 1 takes"):
        fused_mlp(flat, [(4, 16), (15, 16), (16, 9)], x)
    with pytest.raises(TypeError, match="x has dtype"):
        fused_mlp(flat, shapes, x.half())
    with pytest.raises(TypeError, match="share one dtype"):
        fused_mlp(flat.double(), shapes, x)
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_mlp(flat, shapes, x, backend="cuda")
    if HAS_TRITON:
        with pytest.raises(ValueError, match="backend='triton' takes float32"):
            fused_mlp(flat.double(), shapes, x.double(), backend="triton")
        wide = mlp_inputs(0, 3, 160, 2, 9, 1, 5)
        with pytest.raises(ValueError, match="width <= 128"):
            fused_mlp(wide[1], wide[0], wide[2], backend="triton")
    assert triton_serves([(6, 96), (96, 96), (96, 25)], torch.float32)
    assert not triton_serves([(6, 96), (96, 25)], torch.float64)
    assert not triton_serves([(40, 96), (96, 25)], torch.float32)
    assert not triton_serves([(6, 25)], torch.float32)  # no hidden layer


def test_gpus_without_tf32_tensor_cores_take_the_torch_backend(monkeypatch):
    # a T4 (7.5) or V100 (7.0) has no tf32 products: "auto" must not send the network there
    cuda = torch.device("cuda", 0)
    for capability, ok in (((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert has_tf32_tensor_cores(cuda) is ok
    assert has_tf32_tensor_cores(torch.device("cpu"))


@pytest.mark.parametrize("backend", ["torch", backend_param("triton")])
def test_no_models_or_no_cells(backend):
    for E, n in ((0, 5), (2, 0)):
        shapes, flat, x = mlp_inputs(0, 3, 32, 2, 9, E, n)
        f, z = flat.clone().requires_grad_(), x.clone().requires_grad_()
        y = fused_mlp(f, shapes, z, backend=backend)
        assert y.shape == (E, n, 9)
        y.sum().backward()
        assert f.grad.shape == f.shape and not f.grad.any() and z.grad.shape == z.shape


@pytest.mark.parametrize("backend", [backend_param("triton")])
def test_triton_backend_refuses_a_second_derivative(backend):
    shapes, flat, x = mlp_inputs(1, 2, 32, 2, 4, 1, 6)
    f = flat.clone().requires_grad_()
    (g,) = torch.autograd.grad(fused_mlp(f, shapes, x, backend=backend).square().sum(), f, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        g.sum().backward()


FIT = """
import json, torch
from cellmnn_kernels.compile_check import compile_one, spec_of
from cellmnn_kernels.ops.fused_mlp import triton_impl as T
out = []
for arch, kind, n_in, width in {cases}:
    cfg = T.config(kind, n_in - 1, width=width, n_in=n_in, arch=arch)
    r = compile_one(spec_of(T.VARIANT, kind, torch.float32, cfg), arch)
    out.append(dict(arch=arch, kind=kind, n_in=n_in, width=width, **{{k: r.get(k) for k in
               ("ok", "registers", "spill_stores", "error")}}))
print(json.dumps(out))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_fit_the_register_file_at_every_width():
    # The configurations ``config`` chooses, compiled for sm_90 (and sm_80 at the default width) in
    # a fresh interpreter without TRITON_INTERPRET: no spills for one and four tiles of width (the
    # 128-cell forward's limit) and inputs padded to 32 columns (the default network's kernels:
    # test_sass_cost; widths of two tiles and the rest measured in docs/cost-model.md).
    cases = [(90, kind, n_in, w) for kind in ("fwd", "bwd") for n_in, w in ((3, 32), (6, 128), (20, 96))] \
        + [(80, kind, 6, 96) for kind in ("fwd", "bwd")]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", FIT.format(cases=cases)], capture_output=True, text=True,
                         env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    for r in json.loads(res.stdout.strip().splitlines()[-1]):
        assert r["ok"], r
        assert r["spill_stores"] == 0, r
