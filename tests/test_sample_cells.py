"""``sample_cells``: the batch draw (hash, segment, gather), held to a Python-integer oracle, and
the Triton kernel to the torch path bit for bit (integers and copied values: no tolerance)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmnn_kernels.ops.sample_cells import draw, sample_cells, sample_cells_torch
from cellmnn_kernels.testing import DEVICE, backend_param, scaled_examples

M32 = 0xFFFFFFFF


def oracle_draw(u: int, step: int, n: int) -> int:
    """The draw in Python integers, written from the hash's definition (lowbias32, C. Wellons'
    hash-prospector): x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16
    (mod 2^32), of (u + step * 0x9E3779B9) mod 2^32; the index is floor(h n / 2^32)."""
    x = (u + step * 0x9E3779B9) & M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    x ^= x >> 16
    return (x * n) >> 32


def inputs(seed: int, S: int, D: int, segments: int, dtype=torch.float32, device=DEVICE):
    """data (N, D), a shuffled pool of its rows cut into ``segments`` segments, and S slots with
    random segments and 32-bit keys."""
    g = torch.Generator().manual_seed(seed)
    N = 3 * segments + 40
    data = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    pool = torch.randperm(N, generator=g)[: 2 * segments + 30]
    cuts = torch.sort(torch.randperm(pool.shape[0] - 1, generator=g)[: segments - 1] + 1).values
    seg_start = torch.cat([torch.zeros(1, dtype=torch.int64), cuts])
    seg_len = torch.cat([cuts, torch.tensor([pool.shape[0]])]) - seg_start
    which = torch.randint(0, segments, (S,), generator=g)
    u = torch.randint(0, 2 ** 32, (S,), generator=g, dtype=torch.int64)
    return [t.to(device) for t in (data, pool, seg_start[which], seg_len[which], u)]


@settings(deadline=None, max_examples=scaled_examples(25))
@given(u=st.lists(st.integers(0, M32), min_size=1, max_size=40), step=st.integers(0, 2 ** 31),
       n=st.integers(1, 2 ** 31 - 1))
def test_draw_is_the_integer_oracle(u, step, n):
    got = draw(torch.tensor(u), torch.tensor(step), torch.full((len(u),), n))
    assert got.tolist() == [oracle_draw(v, step, n) for v in u]


@pytest.mark.parametrize("backend", [backend_param("torch"), backend_param("triton")])
@settings(deadline=None, max_examples=scaled_examples(10))
@given(seed=st.integers(0, 2 ** 16), S=st.integers(1, 300), D=st.sampled_from([1, 3, 5, 17]),
       segments=st.integers(1, 9), step=st.integers(0, 2 ** 31), f64=st.booleans())
def test_cells_are_the_oracles_rows(backend, seed, S, D, segments, step, f64):
    data, pool, starts, lens, u = inputs(seed, S, D, segments, torch.float64 if f64 else torch.float32)
    got = sample_cells(data, pool, starts, lens, u, torch.tensor(step, device=data.device), backend=backend)
    rows = [int(pool[a + oracle_draw(k, step, n)]) for a, n, k in zip(starts.tolist(), lens.tolist(), u.tolist())]
    assert got.dtype == data.dtype and got.shape == (S, D)
    assert torch.equal(got, data[rows])


@pytest.mark.parametrize("backend", [backend_param("triton")])
def test_kernel_equals_the_torch_path_on_a_strided_pool_and_a_view_of_data(backend):
    # a pool that is a strided view and data that is a column slice with unit column stride: the
    # launcher passes the row stride, the index tensors are made contiguous
    data, pool, starts, lens, u = inputs(7, 257, 4, 5)
    wide = torch.cat([data, torch.randn_like(data)], 1)
    pool2 = torch.stack([pool, pool], 1)[:, 0]
    step = torch.tensor(12345, device=data.device)
    got = sample_cells(wide[:, :4], pool2, starts, lens, u, step, backend=backend)
    assert torch.equal(got, sample_cells_torch(data, pool, starts, lens, u, step))


@pytest.mark.parametrize("backend", [backend_param("torch"), backend_param("triton")])
def test_no_slots_or_no_coordinates(backend):
    data, pool, starts, lens, u = inputs(0, 4, 3, 2)
    step = torch.tensor(0, device=data.device)
    assert sample_cells(data, pool, starts[:0], lens[:0], u[:0], step, backend=backend).shape == (0, 3)
    assert sample_cells(data[:, :0], pool, starts, lens, u, step, backend=backend).shape == (4, 0)


def test_bad_input_is_named():
    data, pool, starts, lens, u = inputs(0, 6, 2, 2, device="cpu")
    step = torch.tensor(3)
    cases = [
        (dict(pool=pool.int()), TypeError, "pool must be a 1-d torch.int64"),
        (dict(step=torch.tensor([3])), TypeError, "step must be a 0-d torch.int64"),
        (dict(data=data[0]), TypeError, "data must be a floating-point"),
        (dict(lens=lens[:3]), ValueError, "starts, lens and u must have one shape"),
        (dict(lens=lens * 0), ValueError, "lens must lie in"),
        (dict(starts=starts + pool.shape[0]), ValueError, "within pool"),
        (dict(u=u - 2 ** 40), ValueError, "u must lie in"),
        (dict(pool=pool + 1000), ValueError, "pool must hold row indices of data"),
    ]
    base = dict(data=data, pool=pool, starts=starts, lens=lens, u=u, step=step)
    for change, err, match in cases:
        with pytest.raises(err, match=match):
            sample_cells(**{**base, **change})
    with pytest.raises(ValueError, match="backend must be one of"):
        sample_cells(**base, backend="fast")
