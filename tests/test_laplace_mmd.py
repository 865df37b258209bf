"""laplace_mmd: the torch and triton backends against the dense float64 reference.

Tolerances: MMD^2 is a difference of three weighted means of kernel values in (0, 1], so the
error is measured against their scale s = mean k(X,X) + mean k(Y,Y) + 2 mean k(X,Y) (cancellation
can make MMD^2 itself tiny): |MMD^2 - ref| <= RTOL * s, RTOL = 1e-5 in float32 (roundoff 6e-8,
blocked sums over up to ~10^3 terms here) and 1e-12 in float64.  Gradients: relative Frobenius
error 1e-4 (float32) and 1e-10 (float64).  The oracle runs in float64 on the very inputs the
backend saw.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmnn_kernels import laplace_mmd, laplace_mmd_grouped
from cellmnn_kernels.ops.laplace_mmd import laplace_mmd_reference
from cellmnn_kernels.ops.laplace_mmd.naive import laplace_kernel_dense
from cellmnn_kernels.testing import DEVICE, backend_param, scaled_examples

RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
GRAD_RTOL = {torch.float32: 1e-4, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.float64]
BACKENDS = [backend_param("torch"), backend_param("triton")]


def make_points(seed, N, M, D, dtype, duplicates=True, weighted=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D))
    y = rng.standard_normal((M, D)) + 0.3
    if duplicates:  # zero distances within x and across x, y
        if N > 1:
            x[-1] = x[0]
        y[0] = x[N // 2]
    wx = rng.uniform(0.0, 1.0, N) if weighted else None
    wy = rng.uniform(0.0, 1.0, M) if weighted else None
    if weighted:
        wx[0], wy[-1] = 0.0, 0.0  # zero weights are allowed
        wx[-1] = wy[0] = 0.5      # but never all of them
    t = lambda v: None if v is None else torch.tensor(v, dtype=dtype, device=DEVICE)  # noqa: E731
    return t(x), t(y), t(wx), t(wy)


def scale_of(x, y, wx, wy, sigma):
    p = torch.ones(len(x), dtype=torch.float64, device=x.device) if wx is None else wx.double()
    q = torch.ones(len(y), dtype=torch.float64, device=y.device) if wy is None else wy.double()
    p, q = p / p.sum(), q / q.sum()
    x, y = x.double(), y.double()
    return (p @ laplace_kernel_dense(x, x, sigma) @ p + q @ laplace_kernel_dense(y, y, sigma) @ q
            + 2 * p @ laplace_kernel_dense(x, y, sigma) @ q).item()


def value_and_grads(fn, tensors):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    v = fn(*leaves)
    v.backward()
    return v.detach(), [None if t is None else t.grad for t in leaves]


def assert_grads_close(got, want, rtol):
    # A gradient that vanishes analytically (the weight of a lone point, whose normalised weight
    # is 1 whatever it is) is held to rtol in absolute terms: its rounding noise scales with the
    # 1 / sum(w) ~ 1 - 10 size of the partial derivatives that cancel.
    for name, a, b in zip(("x", "y", "x_weights", "y_weights"), got, want):
        if b is None:
            assert a is None, f"d{name} should not exist"
            continue
        err, scale = (a.double() - b).norm().item(), max(b.norm().item(), 1.0)
        assert err <= rtol * scale, f"d{name}: relative error {err / scale:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=scaled_examples(20))
@given(seed=st.integers(0, 2**32 - 1), N=st.integers(1, 40), M=st.integers(1, 40),
       D=st.sampled_from([1, 2, 3, 5, 8, 17, 64, 128]), sigma=st.floats(0.1, 5.0),
       weighted=st.booleans(), duplicates=st.booleans())
def test_matches_dense_reference(backend, dtype, seed, N, M, D, sigma, weighted, duplicates):
    x, y, wx, wy = make_points(seed, N, M, D, dtype, duplicates, weighted)
    # Through the grouped entry point: laplace_mmd itself would take the dense form at these sizes.
    fn = lambda a, b, wa, wb: laplace_mmd_grouped(  # noqa: E731
        a, [0, N], b, [0, M], [0], [0], None, sigma, wa, wb, backend=backend)[0]
    ref = lambda a, b, wa, wb: laplace_mmd_reference(  # noqa: E731
        a.double(), b.double(), sigma, None if wa is None else wa.double(), None if wb is None else wb.double())
    v, g = value_and_grads(fn, (x, y, wx, wy))
    vr, gr = value_and_grads(ref, (x, y, wx, wy))
    assert v.dtype == dtype and v.shape == ()
    assert abs(v.double().item() - vr.item()) <= RTOL[dtype] * scale_of(x, y, wx, wy, sigma)
    assert_grads_close(g, gr, GRAD_RTOL[dtype])


@st.composite
def grouped_cases(draw):
    n_x = draw(st.integers(1, 4))
    n_y = draw(st.integers(1, 3))
    x_sizes = draw(st.lists(st.integers(1, 12), min_size=n_x, max_size=n_x))
    y_sizes = draw(st.lists(st.integers(1, 12), min_size=n_y, max_size=n_y))
    n_terms = draw(st.integers(1, 6))
    terms_x = draw(st.lists(st.integers(0, n_x - 1), min_size=n_terms, max_size=n_terms))
    terms_y = draw(st.lists(st.integers(0, n_y - 1), min_size=n_terms, max_size=n_terms))
    weights = draw(st.lists(st.floats(0.0, 2.0), min_size=n_terms, max_size=n_terms))
    return dict(x_sizes=x_sizes, y_sizes=y_sizes, terms_x=terms_x, terms_y=terms_y, term_weights=weights,
                seed=draw(st.integers(0, 2**32 - 1)), D=draw(st.sampled_from([1, 3, 5, 20])),
                y_grad=draw(st.booleans()))


def grouped_inputs(case, dtype):
    """A grouped case's offsets, points and x weights (seeded by the case), and its generator."""
    rng = np.random.default_rng(case["seed"])
    D = case["D"]
    x_off = np.concatenate([[0], np.cumsum(case["x_sizes"])]).tolist()
    y_off = np.concatenate([[0], np.cumsum(case["y_sizes"])]).tolist()
    x = torch.tensor(rng.standard_normal((x_off[-1], D)), dtype=dtype, device=DEVICE)
    y = torch.tensor(rng.standard_normal((y_off[-1], D)) + 0.5, dtype=dtype, device=DEVICE)
    wx = torch.tensor(rng.uniform(0.1, 1.0, x_off[-1]), dtype=dtype, device=DEVICE)
    return x_off, y_off, x, y, wx, rng


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=scaled_examples(15))
@given(case=grouped_cases())
def test_grouped_equals_the_sum_of_single_calls(backend, dtype, case):
    x_off, y_off, x, y, wx, rng = grouped_inputs(case, dtype)
    tw = case["term_weights"]

    def run(be, a, b, w):
        return laplace_mmd_grouped(a, x_off, b, y_off, case["terms_x"], case["terms_y"], tw, 1.3,
                                   x_weights=w, backend=be)

    leaves = [x.clone().requires_grad_(), y.clone().requires_grad_(case["y_grad"]), wx.clone().requires_grad_()]
    total, values = run(backend, *leaves)
    assert values.shape == (len(case["terms_x"]),) and total.dtype == dtype
    total.backward()
    ref_leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    rtotal, rvalues = run("reference", *ref_leaves)
    rtotal.backward()
    tol = RTOL[dtype] * 4 * (1 + sum(tw))  # every kernel mean is at most 1
    assert (values.double() - rvalues).abs().max().item() <= RTOL[dtype] * 4
    assert abs(total.double().item() - rtotal.item()) <= tol
    assert_grads_close([a.grad for a in leaves], [b.grad for b in ref_leaves], GRAD_RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=scaled_examples(10))
@given(case=grouped_cases())
def test_given_self_terms_replace_the_yy_means_and_keep_the_gradients(backend, dtype, case):
    # y_self stands in for each y segment's mean k(Y, Y): the values are the reference's with
    # that term swapped, and the gradients in x and its weights are those of the full computation
    # (the y-y term does not depend on x).  Tolerances as in test_grouped_equals_the_sum_of_single_calls.
    x_off, y_off, x, y, wx, rng = grouped_inputs(case, dtype)
    y_self = torch.tensor(rng.uniform(0.0, 1.0, len(y_off) - 1), dtype=dtype, device=DEVICE)
    tw = case["term_weights"]

    def run(be, a, w, given):
        return laplace_mmd_grouped(a, x_off, y.to(a.dtype), y_off, case["terms_x"], case["terms_y"], tw, 1.3,
                                   x_weights=w, backend=be, y_self=given)

    leaves = [x.clone().requires_grad_(), wx.clone().requires_grad_()]
    total, values = run(backend, *leaves, y_self)
    total.backward()
    full = [x.clone().requires_grad_(), wx.clone().requires_grad_()]
    ftotal, fvalues = run(backend, *full, None)
    ftotal.backward()
    ref = [x.double(), wx.double()]
    _, rvalues = run("reference", *ref, y_self.double())
    assert (values.double() - rvalues).abs().max().item() <= RTOL[dtype] * 4
    yy = torch.stack([laplace_kernel_dense(y[a:b].double(), y[a:b].double(), 1.3).mean()
                      for a, b in zip(y_off, y_off[1:])])
    swapped = fvalues.double() - yy[case["terms_y"]] + y_self.double()[case["terms_y"]]
    assert (values.double() - swapped).abs().max().item() <= RTOL[dtype] * 8
    for a, b in zip(leaves, full):
        assert_grads_close([a.grad], [b.grad], GRAD_RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=scaled_examples(10))
@given(case=grouped_cases(), cut=st.floats(0.0, 1.0))
def test_query_rows_split_the_sums_and_the_gradient(backend, dtype, case, cut):
    # Each x segment cut in two at a random row: the two calls' values add up to the full
    # call's (the given y-y term counted once) and their x-gradients to its gradient, each zero
    # off its own rows: what two data-parallel processes compute (group= then adds the sums).
    # Tolerances as in test_grouped_equals_the_sum_of_single_calls.
    x_off, y_off, x, y, _, rng = grouped_inputs(case, dtype)
    y_self = torch.tensor(rng.uniform(0.0, 1.0, len(y_off) - 1), dtype=dtype, device=DEVICE)
    mid = [a + int(round(cut * (b - a))) for a, b in zip(x_off, x_off[1:])]
    parts = [[(a, m) for a, m in zip(x_off, mid)], [(m, b) for m, b in zip(mid, x_off[1:])], None]
    values, grads = [], []
    for rows in parts:
        leaf = x.clone().requires_grad_()
        total, v = laplace_mmd_grouped(leaf, x_off, y, y_off, case["terms_x"], case["terms_y"], case["term_weights"],
                                       1.3, backend=backend, y_self=y_self, x_rows=rows)
        total.backward()
        values.append(v.double())
        grads.append(leaf.grad.double())
    yy = y_self.double()[case["terms_y"]]
    assert (values[0] + values[1] - yy - values[2]).abs().max().item() <= RTOL[dtype] * 8
    assert_grads_close([grads[0] + grads[1]], [grads[2]], GRAD_RTOL[dtype])
    for g, rows in zip(grads[:2], parts[:2]):
        mine = torch.zeros(x_off[-1], dtype=torch.bool, device=DEVICE)
        for a, b in rows:
            mine[a:b] = True
        assert torch.all(g[~mine] == 0)


@st.composite
def batched_cases(draw):
    """Many terms over segments of a few sizes: x segments of size ``a`` at least three times, so
    that the jobs of S(X, X) of shape (a, a) form one group; CHUNK_ELEMS = a^2 or 2 a^2 splits that
    group into sub-batches of 1 or 2 jobs, and cuts jobs with more kernel values into row pieces."""
    a = draw(st.integers(1, 6))
    sizes = [a] + draw(st.lists(st.integers(1, 9), min_size=1, max_size=2))
    x_sizes = draw(st.permutations([a] * 3 + draw(st.lists(st.sampled_from(sizes), max_size=6))))
    y_sizes = draw(st.lists(st.sampled_from(sizes), min_size=1, max_size=5))
    n_x, n_y = len(x_sizes), len(y_sizes)
    # Every x segment in some term (all S(X, X) jobs run), more terms at random; term 0 pairs x
    # segment 0 with y segment 0.
    extra = draw(st.integers(0, n_x + 4))
    terms_x = list(range(n_x)) + draw(st.lists(st.integers(0, n_x - 1), min_size=extra, max_size=extra))
    terms_y = [0] + draw(st.lists(st.integers(0, n_y - 1), min_size=n_x + extra - 1, max_size=n_x + extra - 1))
    weights = draw(st.lists(st.floats(0.0, 2.0), min_size=n_x + extra, max_size=n_x + extra))
    return dict(a=a, chunk=a * a * draw(st.sampled_from([1, 2])), x_sizes=x_sizes, y_sizes=y_sizes,
                terms_x=terms_x, terms_y=terms_y, term_weights=weights, seed=draw(st.integers(0, 2**32 - 1)),
                D=draw(st.sampled_from([1, 3, 5, 10])),
                sigma=draw(st.floats(0.3, 3.0)))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@settings(max_examples=scaled_examples(15))
@given(case=batched_cases())
def test_batched_groups_and_sub_batches_match_the_reference(dtype, case):
    # The torch reducer computes the jobs of one shape as one batch (sub-batches of at most
    # CHUNK_ELEMS kernel values); values and gradients in x, y and both point weights against the
    # dense float64 reference.  Tolerances as in test_grouped_equals_the_sum_of_single_calls: each
    # MMD^2 combines three kernel means in (0, 1] with coefficients 1, 1, 2 (scale <= 4), and
    # batching only changes which rows are reduced together, not the reduction over one row's keys
    # (a sum of at most 9 float32 values here), so RTOL[dtype] * 4 per term and
    # RTOL[dtype] * 4 * (1 + sum of term weights) for the total; GRAD_RTOL for the gradients.
    import cellmnn_kernels.ops.laplace_mmd.torch_impl as ti

    rng = np.random.default_rng(case["seed"])
    D = case["D"]
    x_off = np.concatenate([[0], np.cumsum(case["x_sizes"])]).tolist()
    y_off = np.concatenate([[0], np.cumsum(case["y_sizes"])]).tolist()
    xn = rng.standard_normal((x_off[-1], D))
    yn = rng.standard_normal((y_off[-1], D)) + 0.3
    # Distances below the clamp 1e-8 D that are not zero (the gradient mask matters: sign != 0):
    # x segment 0 against y segment 0 (term 0), and within x segment 0; and an exact duplicate.
    xn[0], yn[0] = 0.0, 1e-10
    if case["x_sizes"][0] > 1:
        xn[1] = -1e-10
    yn[-1] = xn[-1]
    t = lambda v: torch.tensor(v, dtype=dtype, device=DEVICE)  # noqa: E731
    leaves = [t(xn), t(yn), t(rng.uniform(0.1, 1.0, x_off[-1])), t(rng.uniform(0.1, 1.0, y_off[-1]))]
    leaves = [v.requires_grad_() for v in leaves]

    def run(be, x, y, wx, wy):
        return laplace_mmd_grouped(x, x_off, y, y_off, case["terms_x"], case["terms_y"], case["term_weights"],
                                   case["sigma"], wx, wy, backend=be)

    batches = []
    real = ti.launch_batches
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ti, "CHUNK_ELEMS", case["chunk"])
        mp.setattr(ti, "launch_batches", lambda *args: batches.append(real(*args)) or batches[-1])
        total, values = run("torch", *leaves)
        total.backward()
    # The (a, a) jobs of S(X, X) (keys equal to queries) did not fit one batch, and no batch holds
    # more than CHUNK_ELEMS kernel values (but a single row with more keys than that).
    a, chunk = case["a"], case["chunk"]
    assert sum(1 for b in batches for J, nq, nk, *_, same in b if (nq, nk) == (a, a) and same) >= 2
    assert all(J * nq * nk <= chunk or J == nq == 1 for b in batches for J, nq, nk, *_ in b)
    ref_leaves = [v.detach().double().requires_grad_() for v in leaves]
    rtotal, rvalues = run("reference", *ref_leaves)
    rtotal.backward()
    assert values.shape == (len(case["terms_x"]),) and total.dtype == dtype
    assert (values.double() - rvalues).abs().max().item() <= RTOL[dtype] * 4
    assert abs(total.double().item() - rtotal.item()) <= RTOL[dtype] * 4 * (1 + sum(case["term_weights"]))
    assert_grads_close([v.grad for v in leaves], [v.grad for v in ref_leaves], GRAD_RTOL[dtype])


def test_repeated_grouped_call_builds_no_index_tensors(monkeypatch):
    # The plan and what is derived from it (its index tensors, the term weights, the reducer's
    # gather indices) are cached: a second call with the same offsets and terms creates no tensor
    # from host data (on CUDA: no upload).
    x = torch.randn(40, 3, device=DEVICE, requires_grad=True)
    y = torch.randn(30, 3, device=DEVICE, requires_grad=True)
    args = (x, [0, 7, 14, 20, 40], y, [0, 10, 20, 30], [0, 1, 2, 3, 0], [0, 1, 2, 2, 1], [1.0, 0.1, 0.01, 1.0, 2.0])

    def step():
        total, _ = laplace_mmd_grouped(*args, backend="torch", check_finite=False)
        total.backward()

    step()
    made = []
    for name in ("tensor", "as_tensor", "arange"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, _name=name, **k: made.append(_name) or _real(*a, **k))
    step()
    assert made == []


def test_caches_built_under_inference_mode_serve_autograd():
    # A first call under inference_mode builds the cached index tensors as normal tensors: a later
    # call that records a graph can save them for backward.
    # (x needs gradients in both calls: the plan is the same one.)
    x = torch.randn(23, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = torch.randn(17, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    args = (x, [0, 9, 23], y, [0, 4, 17], [0, 1, 1], [1, 0, 1], [0.5, 1.5, 1.0])
    with torch.inference_mode():
        want, _ = laplace_mmd_grouped(*args, backend="torch")
    total, _ = laplace_mmd_grouped(*args, backend="torch")
    total.backward()
    assert total.item() == want.item() and x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_call_is_a_fixed_number_of_launches(backend, monkeypatch):
    import cellmnn_kernels.ops.laplace_mmd as mmd

    calls = []
    real = mmd._reducer(backend)
    monkeypatch.setattr(mmd, "_reducer", lambda be: lambda *a: calls.append(1) or real(*a))
    x, y = torch.randn(60, 3, device=DEVICE, requires_grad=True), torch.randn(40, 3, device=DEVICE)
    for n_terms in (1, 12):
        calls.clear()
        terms_x = [i % 6 for i in range(n_terms)]
        terms_y = [i % 4 for i in range(n_terms)]
        total, _ = laplace_mmd_grouped(x, list(range(0, 61, 10)), y, list(range(0, 41, 10)), terms_x, terms_y,
                                       backend=backend)
        total.backward()
        assert len(calls) == 3  # XX, YY and XY launches; YX only when y needs gradients


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_call_equals_one_term_grouped_call(backend):
    x, y, wx, wy = make_points(1, 30, 20, 3, torch.float64)
    single = laplace_mmd(x, y, 0.8, wx, wy, backend=backend)
    grouped, values = laplace_mmd_grouped(x, [0, 30], y, [0, 20], [0], [0], None, 0.8, wx, wy, backend=backend)
    assert abs(single.item() - grouped.item()) <= 1e-13 and values.shape == (1,)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_sets_and_single_points(backend, dtype):
    x = torch.randn(17, 4, dtype=dtype, device=DEVICE)
    assert abs(laplace_mmd(x, x.clone(), backend=backend).item()) <= 10 * RTOL[dtype]
    p, q = torch.zeros(1, 2, dtype=dtype, device=DEVICE), torch.ones(1, 2, dtype=dtype, device=DEVICE)
    want = 2 * np.exp(-1e-8) - 2 * np.exp(-1.0)  # k(p, p) = exp(-1e-8): the clamp; k(p, q) = exp(-2 / 2)
    assert abs(laplace_mmd(p, q, backend=backend).item() - want) <= 10 * RTOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_and_split_reductions(backend, monkeypatch):
    # Force many small chunks (torch) or several key splits per job (triton).
    import cellmnn_kernels.ops.laplace_mmd.torch_impl as ti

    monkeypatch.setattr(ti, "CHUNK_ELEMS", 64)
    if backend == "triton":
        import cellmnn_kernels.ops.laplace_mmd.triton_impl as tr

        monkeypatch.setattr(tr, "_n_splits", lambda *a: 3)
    x, y, wx, wy = make_points(4, 70, 45, 6, torch.float64)
    v, g = value_and_grads(lambda a, b, wa, wb: laplace_mmd(a, b, 1.0, wa, wb, backend=backend), (x, y, wx, wy))
    vr, gr = value_and_grads(lambda a, b, wa, wb: laplace_mmd_reference(a, b, 1.0, wa, wb), (x, y, wx, wy))
    assert abs(v.item() - vr.item()) <= 1e-12
    assert_grads_close(g, gr, 1e-10)


def test_memory_stays_linear():
    # 10000 x 10000 float32 kernel values would take 400 MB (its gradient as much again); the chunked
    # path keeps a few 16 MB blocks (about 76 MB growth measured, most of it torch's own start-up).
    import subprocess
    import sys

    from cellmnn_kernels.testing import PEAK_CODE

    code = PEAK_CODE.format(N=10000, backend="torch")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) < 256, f"peak grew by {out.stdout.strip()} MB"


def _pts(**over):
    args = dict(x=torch.randn(5, 3), y=torch.randn(4, 3))
    args.update(over)
    return args


@pytest.mark.parametrize("kwargs,exc,match", [
    (_pts(y=torch.randn(4, 2)), ValueError, "same dimension D"),
    (_pts(x=torch.randn(0, 3)), ValueError, "non-empty"),
    (_pts(x=torch.randn(5)), ValueError, r"x must have shape \(N, D\)"),
    (_pts(x=torch.randn(5, 3, dtype=torch.float64)), TypeError, "share one dtype"),
    (_pts(x=torch.ones(5, 3, dtype=torch.int32)), TypeError, "x has dtype torch.int32"),
    (_pts(sigma=0.0), ValueError, "sigma must be positive"),
    (_pts(sigma=-1), ValueError, "sigma must be positive"),
    (_pts(sigma=float("nan")), ValueError, "sigma must be positive"),
    (_pts(sigma="1"), TypeError, "sigma must be a positive real number"),
    (_pts(x_weights=torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0])), ValueError, "x_weights must be non-negative"),
    (_pts(y_weights=torch.zeros(4)), ValueError, "y_weights sum to zero"),
    (_pts(y_weights=torch.ones(3)), ValueError, "one weight per point"),
    (_pts(x=torch.tensor([[float("nan"), 0.0, 0.0]] * 5)), ValueError, "x has 5 non-finite"),
    (_pts(y=torch.tensor([[float("inf"), 0.0, 0.0]] * 4)), ValueError, "y has 4 non-finite"),
    (_pts(x_weights=torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0])), ValueError, "x_weights has 1 non-finite"),
    (_pts(backend="gpu"), ValueError, "backend must be one of"),
])
def test_bad_input_is_refused(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        laplace_mmd(**kwargs)


@pytest.mark.parametrize("over,exc,match", [
    (dict(x_offsets=[1, 10]), ValueError, "x_offsets must start at 0"),
    (dict(x_offsets=[0, 6, 4, 10]), ValueError, "non-decreasing"),
    (dict(y_offsets=[0, 3]), ValueError, "y_offsets must start at 0 and end"),
    (dict(terms_x=[0, 3]), ValueError, "terms_x has segment indices out of range"),
    (dict(terms_x=[0]), ValueError, "same non-zero length"),
    (dict(x_offsets=[0, 0, 10]), ValueError, "empty segment"),
    (dict(term_weights=[1.0]), ValueError, "one weight per term"),
    (dict(term_weights=[1.0, float("nan")]), ValueError, "term_weights has 1 non-finite"),
    (dict(term_weights=["a", 1.0]), TypeError, "term_weights must be numbers"),
    (dict(x_offsets=torch.tensor([0.0, 10.0])), TypeError, "integer tensor"),
    (dict(y_self=torch.ones(2)), ValueError, r"y_self must have one value per y segment: shape \(1,\)"),
    (dict(y_self=torch.ones(1, dtype=torch.float64)), TypeError, "y and y_self must share one dtype"),
    (dict(y_self=torch.tensor([float("nan")])), ValueError, "y_self has 1 non-finite"),
    (dict(y=torch.randn(6, 2, requires_grad=True), y_self=torch.ones(1)), ValueError,
     "y and y_weights must not require gradients"),
    (dict(x_rows=[(0, 4), (4, 10)]), ValueError, "x_rows computes the sums over x's query rows only: it needs y_self"),
    (dict(x_rows=[(0, 4)], y_self=torch.ones(1)), ValueError, "one \\(start, end\\) pair per x segment \\(2\\)"),
    (dict(x_rows=[(0, 5), (4, 10)], y_self=torch.ones(1)), ValueError, r"x_rows of segment\(s\) \[0\] are not inside"),
    (dict(x_rows=[(0, 4), (4, 10)], y_self=torch.ones(1), backend="reference"), ValueError,
     "x_rows needs the torch or triton backend"),
    (dict(group=object()), ValueError, "give x_rows"),
])
def test_bad_grouped_input_is_refused(over, exc, match):
    args = dict(x=torch.randn(10, 2), x_offsets=[0, 4, 10], y=torch.randn(6, 2), y_offsets=[0, 6],
                terms_x=[0, 1], terms_y=[0, 0])
    args.update(over)
    with pytest.raises(exc, match=match):
        laplace_mmd_grouped(**args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivatives_are_refused_not_wrong(backend):
    # The fused backward is first order: a gradient of a gradient raises instead of treating the
    # first gradient as a constant.
    x = torch.randn(10, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = torch.randn(6, 2, dtype=torch.float64, device=DEVICE)
    total, _ = laplace_mmd_grouped(x, [0, 10], y, [0, 6], [0], [0], backend=backend)
    (gx,) = torch.autograd.grad(total, x, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(gx.pow(2).sum(), x)
    total, _ = laplace_mmd_grouped(x, [0, 10], y, [0, 6], [0], [0], backend=backend)
    torch.testing.assert_close(torch.autograd.grad(total, x)[0], gx.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_with_retain_graph(backend):
    # Everything the backward reads is saved with save_for_backward: a second pass works and
    # gives the same gradients.
    x, y, wx, wy = make_points(2, 40, 30, 3, torch.float64)
    x = x.clone().requires_grad_()
    total, _ = laplace_mmd_grouped(x, [0, 40], y, [0, 30], [0], [0], None, 1.0, wx, wy, backend=backend)
    g1, = torch.autograd.grad(total, x, retain_graph=True)
    g2, = torch.autograd.grad(total, x)
    assert torch.equal(g1, g2) and g1.abs().sum() > 0


def test_meta_tensors_infer_shapes_as_torch_ops_do():
    x, y = torch.empty(5, 3, device="meta"), torch.empty(6, 3, device="meta")
    assert laplace_mmd(x, y).shape == () and laplace_mmd(x, y).device.type == "meta"
    total, per_term = laplace_mmd_grouped(x, [0, 2, 5], y, [0, 6], [0, 1], [0, 0])
    assert total.shape == () and per_term.shape == (2,)
