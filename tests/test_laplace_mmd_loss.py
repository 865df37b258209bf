"""laplace_mmd_loss: the torch and triton backends against the dense reference in float64.

Tolerances: a group's MMD part is a sum of weighted differences of kernel means in (0, 1], so its
error is measured against 4 * (sum of the group's term weights) + |energy| + |penalty| (the floor
of ``assert_rel_close``): 1e-5 relative in float32 (as laplace_mmd: roundoff 6e-8 over blocked sums
of up to ~10^3 values), 1e-12 in float64.  Gradients: relative Frobenius error 1e-4 (float32) and
1e-10 (float64), floor 1.  The oracle runs in float64 on the very inputs the backend saw.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmnn_kernels.ops.laplace_mmd_loss import LossPlan, laplace_mmd_loss
from cellmnn_kernels.testing import DEVICE, assert_rel_close, backend_param, scaled_examples

RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
GRAD_RTOL = {torch.float32: 1e-4, torch.float64: 1e-10}
BACKENDS = [backend_param("torch"), backend_param("triton")]


def layout(seed: int, G: int, T: int, sigma=0.8, shared_y: bool = False, penalty: bool = True):
    """A training step's layout: group g has n_g cells of T decoded columns (X rows cell-major),
    terms from column 0 to some later columns, each with its own y segment (or, ``shared_y``,
    one y segment for all of a group's terms)."""
    rng = np.random.default_rng(seed)
    n = rng.integers(1, 7, G)
    rows, x_off, tx, ty, tg, w, y_off = [], [0], [], [], [], [], [0]
    r0 = 0
    for g in range(G):
        cols = [c for c in range(1, T) if rng.random() < 0.7] if g else list(range(1, T))  # group 0 has terms
        for k, col in enumerate(cols):
            rows += (r0 + np.arange(n[g]) * T + col).tolist()
            x_off.append(x_off[-1] + int(n[g]))
            tx.append(len(tx))
            if not shared_y or k == 0:
                y_off.append(y_off[-1] + int(rng.integers(1, 12)))
            ty.append(len(y_off) - 2)
            tg.append(g)
            w.append(float(rng.uniform(0.1, 2.0)))
        r0 += int(n[g]) * T
    N = r0
    energy = rng.uniform(0, 1, N) * (rng.random(N) < 0.8)
    pen = (np.repeat(np.arange(G), n), 1.0 / np.repeat(n, n)) if penalty else (None, None)
    plan = LossPlan(rows, x_off, y_off, tx, ty, w, tg, G, N, np.repeat(np.arange(G), n * T), sigma, energy, *pen)
    return plan, rng


def inputs(plan: LossPlan, rng, D: int, dtype, y_self: bool, penalty: bool):
    t = lambda a, grad=False: torch.tensor(a, dtype=dtype, device=DEVICE).requires_grad_(grad)  # noqa: E731
    X = t(rng.normal(size=(plan.N, D)), True)
    X.data[: plan.N // 3] = X.data[plan.N // 3: 2 * (plan.N // 3)]  # repeated points: distance 0, the clamp
    y = t(rng.normal(size=(plan.y_off[-1], D)))
    ys = t(rng.uniform(0.05, 1, len(plan.y_off) - 1)) if y_self else None
    pen = t(rng.uniform(0, 1, plan.pen_group.shape[0]), True) if penalty else None
    return X, y, ys, t(rng.normal(size=(plan.N, D)), True), pen


def run(plan, args, backend, up):
    """loss, mmd and the gradients of up[0] . loss + up[1] . mmd in X, V and the penalty."""
    X, y, y_self, V, pen = args
    loss, mmd = laplace_mmd_loss(plan, X, y, y_self, V, pen, backend=backend)
    leaves = [a for a in (X, V, pen) if a is not None]
    grads = torch.autograd.grad((loss * up[0]).sum() + (mmd * up[1]).sum(), leaves)
    return loss, mmd, grads


def check_against_reference(plan, args, backend, dtype):
    G = plan.G
    up = torch.randn(2, G, dtype=torch.float64, generator=torch.Generator().manual_seed(G))
    loss, mmd, grads = run(plan, args, backend, up.to(dtype).to(DEVICE))
    ref_args = [None if a is None else a.detach().double().requires_grad_(a.requires_grad) for a in args]
    rl, rm, rg = run(plan, ref_args, "reference", up.to(DEVICE))
    floor = 4 * float(sum(plan.w)) + float(rl.detach().abs().sum())
    assert_rel_close(loss.detach(), rl.detach(), RTOL[dtype], "loss", floor)
    assert_rel_close(mmd.detach(), rm.detach(), RTOL[dtype], "mmd", floor)
    for name, a, b in zip(("X", "V", "penalty"), grads, rg):
        assert_rel_close(a, b, GRAD_RTOL[dtype], f"d{name}", 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
@settings(deadline=None, max_examples=scaled_examples(12))
@given(seed=st.integers(0, 2 ** 32 - 1), G=st.integers(1, 4), T=st.integers(2, 4), D=st.sampled_from([1, 3, 5, 9]),
       y_self=st.booleans(), penalty=st.booleans(), shared_y=st.booleans(), per_group=st.booleans())
def test_loss_and_gradients_are_the_references(backend, dtype, seed, G, T, D, y_self, penalty, shared_y, per_group):
    sigma = np.random.default_rng(seed + 1).uniform(0.3, 2.0, G).tolist() if per_group else 0.8
    plan, rng = layout(seed, G, T, sigma, shared_y=shared_y, penalty=penalty)
    check_against_reference(plan, inputs(plan, rng, D, dtype, y_self, penalty), backend, dtype)


@pytest.mark.parametrize("backend", [backend_param("triton")])
def test_key_splits_are_added_by_the_finish_and_the_backward(backend, monkeypatch):
    # On a GPU a row reduction splits its keys over programs when there are few rows; the finish
    # and the backward add the partial rows.  Forced here (the CPU never splits).
    from cellmnn_kernels.ops.laplace_mmd import triton_impl

    monkeypatch.setattr(triton_impl, "_n_splits", lambda *a: 3)
    plan, rng = layout(7, 3, 3)
    check_against_reference(plan, inputs(plan, rng, 3, torch.float64, True, True), backend, torch.float64)
    loss, _, grads = run(plan, inputs(plan, np.random.default_rng(1), 3, torch.float64, True, True), backend,
                         torch.ones(2, 3, dtype=torch.float64, device=DEVICE))
    monkeypatch.setattr(triton_impl, "_n_splits", lambda *a: 1)
    loss1, _, grads1 = run(plan, inputs(plan, np.random.default_rng(1), 3, torch.float64, True, True), backend,
                           torch.ones(2, 3, dtype=torch.float64, device=DEVICE))
    assert_rel_close(loss, loss1, 1e-13, "loss with and without splits")
    assert_rel_close(grads[0], grads1[0], 1e-13, "dX with and without splits")


@pytest.mark.parametrize("output", [0, 1], ids=["loss only", "mmd only"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_output_alone_has_the_references_gradients(backend, output):
    # An unused output's upstream gradient stays None in the backward (no zeros are made for it).
    plan, rng = layout(9, 2, 3)
    args = inputs(plan, rng, 3, torch.float64, True, True)
    ref = [None if a is None else a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    got = laplace_mmd_loss(plan, *args, backend=backend)[output].sum()
    want = laplace_mmd_loss(plan, *ref, backend="reference")[output].sum()
    for a, b in zip(torch.autograd.grad(got, [args[0], args[3], args[4]], allow_unused=True),
                    torch.autograd.grad(want, [ref[0], ref[3], ref[4]], allow_unused=True)):
        if b is None:
            assert a is None or float(a.abs().max()) == 0.0
        else:
            assert_rel_close(a, b, 1e-10, "gradient", 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_are_read_as_their_values(backend):
    # Column-major V, a penalty with stride 2, y_self a strided view: the values, not the memory.
    plan, rng = layout(6, 2, 3)
    X, y, y_self, V, pen = inputs(plan, rng, 3, torch.float64, True, True)
    V2 = V.detach().t().contiguous().t().requires_grad_()
    pen2 = torch.stack([pen.detach(), pen.detach()], 1)[:, 0].requires_grad_()
    ys2 = torch.stack([y_self, y_self], 1)[:, 1]
    assert V2.stride(1) != 1 and pen2.stride(0) == 2 and ys2.stride(0) == 2
    check_against_reference(plan, (X, y, ys2, V2, pen2), backend, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_same_inputs_give_the_same_bits(backend):
    plan, rng = layout(3, 3, 4)
    args = inputs(plan, rng, 3, torch.float32, True, True)
    up = torch.ones(2, 3, device=DEVICE)
    a, b = run(plan, args, backend, up), run(plan, args, backend, up)
    assert torch.equal(a[0], b[0]) and all(torch.equal(u, v) for u, v in zip(a[2], b[2]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sigma_per_group_is_each_groups_own_sigma(backend):
    # A group's loss under per-group sigmas is its loss under a plan with its sigma for every group
    # (the scaling of the points is the bandwidth), but for the clamp, which then applies to the
    # scaled distance: the zero-distance pairs (i, i) of S(X, X) get exp(-1e-8 / sigma) for exp(-1e-8),
    # a change below 1e-8 * |1 - 1 / sigma| <= 1.5e-8 per unit of term weight (hence 1e-7 here).
    # No repeated points otherwise, and no gradient at the clamp, so the gradients agree to 1e-10.
    sig = [0.4, 1.0, 2.5]
    plan, rng = layout(11, 3, 3, sig)
    X, y, y_self, V, pen = inputs(plan, rng, 3, torch.float64, True, True)
    X = torch.randn(X.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    X.requires_grad_(True)
    loss, _ = laplace_mmd_loss(plan, X, y, y_self, V, pen, backend=backend)
    gX = torch.autograd.grad(loss.sum(), X)[0]
    for g, s in enumerate(sig):
        one, _ = layout(11, 3, 3, s)
        lg, _ = laplace_mmd_loss(one, X, y, y_self, V, pen, backend=backend)
        gg = torch.autograd.grad(lg[g], X)[0]
        rows = torch.as_tensor(plan.row_group == g, device=DEVICE)
        assert abs(float(lg[g].detach() - loss[g].detach())) <= 1e-7 * (1 + abs(float(lg[g].detach())))
        assert_rel_close(gX[rows], gg[rows], 1e-10, f"dX of group {g}", 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shares_of_split_query_rows_add_up_to_the_whole_loss(backend):
    # The data-parallel form: two plans whose x_rows split every x segment, each with share 1/2,
    # give values that add up to the whole loss, X-gradients that add up to the whole one, and
    # each the whole loss's gradients in V and the penalty.
    plan, rng = layout(5, 3, 4, [0.5, 1.0, 1.5])
    args = inputs(plan, rng, 3, torch.float64, True, True)
    X, y, y_self, V, pen = args
    cut = [(a + b) // 2 for a, b in zip(plan.x_off, plan.x_off[1:])]
    halves = [[(a, c) for a, c in zip(plan.x_off, cut)], [(c, b) for c, b in zip(cut, plan.x_off[1:])]]
    whole, _, wg = run(plan, args, backend, torch.ones(2, 3, dtype=torch.float64, device=DEVICE))
    parts = []
    for rows in halves:
        p = layout(5, 3, 4, [0.5, 1.0, 1.5])[0]
        p = LossPlan(p.rows, p.x_off, p.y_off, p.tx, p.ty, p.w, p.term_group, p.G, p.N, p.row_group,
                     p.group_sigma, p.energy, p.pen_group, p.pen_w, x_rows=rows, share=0.5)
        parts.append(run(p, args, backend, torch.ones(2, 3, dtype=torch.float64, device=DEVICE)))
    assert_rel_close(parts[0][0] + parts[1][0], whole, 1e-12, "loss", 1.0)
    assert_rel_close(parts[0][2][0] + parts[1][2][0], wg[0], 1e-10, "dX", 1.0)
    for part in parts:
        assert_rel_close(part[2][1], wg[1], 1e-12, "dV", 1.0)
        assert_rel_close(part[2][2], wg[2], 1e-12, "dpenalty", 1.0)
    one_sided = parts[0][2][0]  # X rows queried only by the other half get no MMD gradient here
    assert float(one_sided.abs().sum()) > 0 and not torch.allclose(one_sided, wg[0])


def test_the_reference_is_the_formula_by_hand():
    # One group, one term, one point each side, D = 2: MMD^2 = k(0) + y_self - 2 k(x, y).
    plan = LossPlan([0], [0, 1], [0, 1], [0], [0], [1.5], [0], 1, 2, [0, 0], 0.5, [0.0, 2.0], [0], [0.25])
    X = torch.tensor([[0.0, 1.0], [3.0, 3.0]], dtype=torch.float64)
    y, V = torch.tensor([[1.0, -1.0]], dtype=torch.float64), torch.tensor([[9.0, 9.0], [1.0, 2.0]], dtype=torch.float64)
    k = lambda d: np.exp(-max(d / 2, 1e-8) / 0.5)  # noqa: E731
    mmd = 1.5 * (k(0.0) + 0.3 - 2 * k(3.0))
    for backend in ("reference", "torch"):
        loss, m = laplace_mmd_loss(plan, X, y, torch.tensor([0.3], dtype=torch.float64), V,
                                   torch.tensor([4.0], dtype=torch.float64), backend=backend)
        assert abs(float(m) - mmd) < 1e-14 and abs(float(loss) - (mmd + 2.0 * 5 + 0.25 * 4)) < 1e-13


@pytest.mark.parametrize("bad, match", [
    (dict(rows=[0, 0]), "rows must be distinct"),
    (dict(rows=[0, 9]), r"rows must be rows of X"),
    (dict(row_group=[1, 0, 0, 0]), "row_group must be non-decreasing"),
    (dict(term_group=[1, 0]), "term_group must be non-decreasing"),
    (dict(terms_y=[0, 0]), "segment 0 is used by terms of groups 0 and 1"),
    (dict(row_group=[0, 0, 0, 0]), "rows of x segment 1 lie in group"),
    (dict(n_groups=0), "n_groups must be a positive integer"),
    (dict(term_weights=[1.0, float("nan")]), "term_weights has 1 non-finite"),
    (dict(penalty_group=[0]), "penalty_group and penalty_weight come together"),
    (dict(sigma=-1.0), "sigma must be positive"),
    (dict(x_rows=[(0, 1)]), "x_rows must have one"),
    (dict(x_rows=[(0, 2), (1, 2)]), r"x_rows of segment\(s\) \[0\]"),
    (dict(share=0.0), r"share must lie in \(0, 1\]"),
])
def test_a_bad_plan_names_its_argument(bad, match):
    args = dict(rows=[0, 2], x_offsets=[0, 1, 2], y_offsets=[0, 2, 3], terms_x=[0, 1], terms_y=[0, 1],
                term_weights=[1.0, 1.0], term_group=[0, 1], n_groups=2, n_points=4, row_group=[0, 0, 1, 1])
    with pytest.raises((ValueError, TypeError), match=match):
        LossPlan(**{**args, **bad})


def test_a_bad_call_names_its_argument():
    plan = LossPlan([0, 2], [0, 1, 2], [0, 2, 3], [0, 1], [0, 1], [1.0, 1.0], [0, 1], 2, 4, [0, 0, 1, 1],
                    energy_weight=[1.0] * 4)
    X, y, V = torch.randn(4, 2), torch.randn(3, 2), torch.randn(4, 2)
    cases = [((torch.randn(5, 2), y, None, V, None), "X must have 4 rows"),
             ((X, torch.randn(3, 2).requires_grad_(), None, V, None), "y must not require gradients"),
             ((X, y, torch.ones(3), V, None), r"y_self must be a constant \(2,\)"),
             ((X, y, None, None, None), "V is given exactly when the plan has energy_weight"),
             ((X, y, None, V, torch.ones(2)), "penalty needs a plan with penalty_group"),
             ((X.double(), y, None, V, None), "y must match X's dimension, dtype and device")]
    for args, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            laplace_mmd_loss(plan, *args, backend="torch")
    with pytest.raises(ValueError, match="X has 1 non-finite"):
        laplace_mmd_loss(plan, torch.tensor([[np.nan, 0.0], [0, 0], [0, 0], [0, 0]]), y, None, V, backend="torch")
    split = LossPlan([0, 2], [0, 1, 2], [0, 2, 3], [0, 1], [0, 1], [1.0, 1.0], [0, 1], 2, 4, [0, 0, 1, 1],
                     energy_weight=[1.0] * 4, x_rows=[(0, 1), (1, 1)], share=0.5)
    with pytest.raises(ValueError, match="a plan with x_rows needs y_self"):
        laplace_mmd_loss(split, X, y, None, V, backend="torch")
    with pytest.raises(ValueError, match="needs the torch or triton backend"):
        laplace_mmd_loss(split, X, y, torch.ones(2), V, backend="reference")
    with pytest.raises(ValueError, match="group adds up the shares of plans with x_rows"):
        laplace_mmd_loss(plan, X, y, None, V, backend="torch", group=object())
    with pytest.raises(TypeError, match="plan must be a LossPlan"):
        laplace_mmd_loss(None, X, y, None, V)

