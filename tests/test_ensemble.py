"""Batched ensembles (``cellmnn.train``): the stacked step against a term-by-term reference objective,
the fused AdamW against torch's, members alone against members in an ensemble, per-member early
stopping, the device-side sampler, and the absence of host reads in a training step."""
from __future__ import annotations

import glob
import os
import re
import tempfile
import traceback

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import cellmnn
import cellmnn_kernels
from cellmnn_kernels.ops.laplace_mmd import laplace_mmd_reference
from cellmnn_kernels.ops.laplace_mmd.naive import laplace_kernel_dense
from cellmnn_kernels.testing import backend_param
from cellmnn.train import HParams, Member, train
from cellmnn.train.layout import Layout, Setup
from cellmnn.train import objective
from cellmnn.train.objective import GRID_STEP, expected_self_term
from cellmnn.train.parallel import n_workers, shares
from cellmnn.train.sampling import member_key, slot_hash
from cellmnn_kernels.ops.sample_cells import draw, mix32
from cellmnn.train import step as step_module
from cellmnn.train.step import AdamW, Runner, fused_adamw_available, step_losses
from cellmnn.train.trainer import check_members

FAST = dict(max_epochs=3, check_every=1, patience=2, batch_size=32, verbose=False)


def blobs(n=40, times=(0.0, 1.0, 2.5, 4.0, 5.0), D=2, seed=0):
    rng = np.random.default_rng(seed)
    drift = np.linspace(1.0, -0.5, D)
    return cellmnn.load_marginals([rng.normal(0.0, 0.3, (n + 3 * k, D)) + t * drift for k, t in enumerate(times)],
                                  times=list(times))


def hp(**kw):
    return HParams(**{**FAST, **kw})


# ----------------------------------------------------------------------------- the sampler

def test_mix32_is_one_function_on_ints_and_tensors_and_a_bijection():
    x = torch.arange(1 << 16, dtype=torch.int64) * 65537 + 12345
    h = mix32(x)
    assert int(h.min()) >= 0 and int(h.max()) < 2 ** 32
    assert len(torch.unique(h)) == len(x)  # distinct inputs, distinct outputs
    for v in (0, 1, 12345, 2 ** 32 - 1):
        assert mix32(v) == int(mix32(torch.tensor([v]))[0])


def test_draw_is_uniform_in_range_and_depends_on_key_step_and_slot():
    S, n = 20000, 7
    slots = torch.arange(S, dtype=torch.int64)
    u = slot_hash(torch.full((S,), member_key(3), dtype=torch.int64), slots)
    lens = torch.full((S,), n, dtype=torch.int64)
    a = draw(u, torch.tensor(5), lens)
    assert int(a.min()) == 0 and int(a.max()) == n - 1
    counts = torch.bincount(a, minlength=n).double()
    # chi-square with 6 degrees of freedom: 30 is far beyond its 99.99th percentile (27.9)
    assert float(((counts - S / n) ** 2 / (S / n)).sum()) < 30
    assert torch.equal(a, draw(u, torch.tensor(5), lens))
    # another step, another key: about 6/7 of the draws change (independent uniform draws)
    assert (a != draw(u, torch.tensor(6), lens)).float().mean() > 0.8
    other = slot_hash(torch.full((S,), member_key(4), dtype=torch.int64), slots)
    assert (a != draw(other, torch.tensor(5), lens)).float().mean() > 0.8
    # successive steps of one slot are uncorrelated: lag-1 correlation of 5000 draws
    one = torch.stack([draw(u[:1], torch.tensor(k), torch.tensor([1 << 20])) for k in range(5000)]).double().flatten()
    assert abs(float(torch.corrcoef(torch.stack([one[:-1], one[1:]]))[0, 1])) < 0.06  # 4 sigma at n = 5000


# ----------------------------------------------------------------------------- the stacked step

def batch_per_member(s, L, step) -> list:
    """The cells the step ``step`` of layout ``L`` draws, per member: ({source index: initial
    cells}, {target index: observed cells}), in the layout's order (sources member after member,
    split over the member's sources as the layout does; then every member's targets)."""
    rows = s.pool.index_select(0, L.starts + draw(L.u, step, L.lens))
    cells = s.data[rows].numpy()
    x0, ys = cells[:L.n_src], cells[L.n_src:]
    out, y_at, B = [], 0, s.B
    for el, e in enumerate(L.active):
        kept = s.kept[e]
        n_src = len(kept) - 1
        per_src = [B // n_src + (k < B % n_src) for k in range(n_src)]
        mine, src, a = x0[el * B:(el + 1) * B], {}, 0
        for i, n in zip(kept[:-1], per_src):
            src[i], a = mine[a:a + n], a + n
        obs = {}
        for f in kept[1:]:
            obs[f], y_at = ys[y_at:y_at + B], y_at + B
        out.append((src, obs))
    return out


def reference_objective(model, times, kept, hp, kinetic, unit, src, obs, dataset=None, y_self=None):
    """The objective of one time course term by term, as docs/workflow.md states it: sum over sources s
    and later kept timepoints f of gamma^(r-1) MMD^2 (the dense reference MMD) + velocity_weight *
    the kinetic form + the mean eigen penalty.  Returns (loss, MMD part); the oracle of the tests
    of ``cellmnn.train.objective``.  ``y_self``: {f: the mean k(Y, Y) to use at target f}."""
    sources = kept[:-1]
    kept_t = [times[i] for i in kept]
    grid = []
    if kinetic == "grid":  # every GRID_STEP time units from the first to the last timepoint
        n = int(np.floor((max(times) - min(times)) / (GRID_STEP * unit) + 1e-9)) + 1
        grid = [min(times) + GRID_STEP * unit * k for k in range(n)]
    x0 = torch.as_tensor(np.concatenate([src[i] for i in sources]), dtype=torch.float32)
    t0 = torch.cat([torch.full((len(src[i]),), times[i], dtype=torch.float64) for i in sources])
    t = torch.tensor(kept_t + grid, dtype=torch.float64)[None, :].expand(len(x0), -1)
    X, V, penalty = model(x0, t0, t, return_penalty=True, dataset=dataset)
    mmd, later_v, start = 0.0, [], 0
    for i in sources:
        rows, col = slice(start, start + len(src[i])), kept.index(i)
        for r, f in enumerate(kept[col + 1:], start=1):
            y = torch.as_tensor(obs[f], dtype=torch.float32)
            yy = None if y_self is None else torch.tensor(y_self[f], dtype=torch.float32)
            mmd = mmd + hp.gamma ** (r - 1) * laplace_mmd_reference(X[rows, col + r], y, hp.sigma, y_self=yy)
            later_v.append(V[rows, col + r])
        start += len(src[i])
    if kinetic == "kept_times":
        kin = (V[:, :len(kept)] * unit).pow(2).mean()
    elif kinetic == "future":
        kin = (torch.cat(later_v) * unit).pow(2).sum(-1).mean()
    else:
        kin = (V[:, len(kept):] * unit).pow(2).mean()
    return mmd + hp.velocity_weight * kin + penalty, mmd


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "expected_yy"])
@pytest.mark.parametrize("kinetic", ["kept_times", "future", "grid"])
def test_stacked_step_equals_the_reference_objective(kinetic, exact):
    # Members with different kept timepoints (so different numbers of sources, terms and decode
    # times), sigmas, gammas and velocity weights; each member's loss must be the term-by-term
    # reference objective on the same cells (without ``exact``: with each target's observed term
    # the setup's expectation).  Both in float32: rtol 1e-4 covers the different summation orders
    # of the batched and the per-term reductions.
    m = blobs()
    members = [Member(1, 0, hp(kinetic=kinetic)),
               Member(2, 1, hp(kinetic=kinetic, sigma=0.3, gamma=0.5, velocity_weight=1.0)),
               Member(None, 2, hp(kinetic=kinetic, velocity_weight=0.0, sigma=2.0)),
               Member(3, 3, hp(kinetic=kinetic, init_scale=0.5), exclude=(1,))]
    s = Setup(m, members, torch.device("cpu"))
    flat = s.flat0.clone()
    L = Layout(s, list(range(len(members))))
    step = torch.tensor(7)
    loss, mmd = step_losses(s, L, flat, step, exact=exact)
    for e, (mem, (src, obs)) in enumerate(zip(members, batch_per_member(s, L, step))):
        y_self = None if exact else {f: s.self_term(e, f) for f in obs}
        want_loss, want_mmd = reference_objective(s.model(e, flat[e]), s.times, s.kept[e], mem.hp, kinetic, s.unit,
                                                  src, obs, y_self=y_self)
        torch.testing.assert_close(loss[e], want_loss.detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(mmd[e], want_mmd.detach(), rtol=1e-4, atol=1e-6)


def test_expected_self_term_is_the_mean_over_every_draw():
    # 5 cells, 3 draws: the mean of mean k(Y, Y) over all 5^3 equally likely draws, enumerated.
    rng = np.random.default_rng(1)
    cells = torch.tensor(rng.normal(size=(5, 2)))
    K = laplace_kernel_dense(cells, cells, 0.7).numpy()
    draws = np.stack(np.meshgrid(*[np.arange(5)] * 3, indexing="ij"), -1).reshape(-1, 3)
    want = np.mean([K[np.ix_(d, d)].mean() for d in draws])
    assert abs(expected_self_term(cells, 3, 0.7) - want) < 1e-12
    # above SELF_TERM_CELLS cells: estimated on SELF_TERM_PAIRS random pairs (a 600-cell pool);
    # kernel values in (0, 1] put the standard error below 1 / sqrt(2^18) ~ 2e-3: bound 8e-3
    big = torch.tensor(rng.normal(size=(600, 2)))
    exact = expected_self_term(big, 50, 1.0)
    monkey = pytest.MonkeyPatch()
    monkey.setattr(objective, "SELF_TERM_CELLS", 300)
    try:
        estimate = expected_self_term(big, 50, 1.0)
    finally:
        monkey.undo()
    assert estimate != exact and abs(estimate - exact) < 8e-3


def test_the_training_steps_observed_term_is_the_mean_over_the_steps_draws():
    # The expectation assumes independent uniform draws from the pool; the device sampler is held
    # to it: the batch's mean k(Y, Y) averaged over 300 steps agrees with the setup's value within
    # 4 standard errors of that average.  The gradients are the exact step's, to float32 rounding.
    m = blobs(n=60)
    s = Setup(m, [Member(2, 3, hp(batch_size=24, sigma=0.5))], torch.device("cpu"))
    L = Layout(s, [0])
    per_step = []
    for k in range(300):
        _, obs = batch_per_member(s, L, torch.tensor(k))[0]
        per_step.append([laplace_kernel_dense(torch.tensor(y), torch.tensor(y), 0.5).mean().item()
                         for y in obs.values()])
    per_step = np.array(per_step)
    want = np.array([s.self_term(0, f) for f in obs])
    se = per_step.std(0) / np.sqrt(len(per_step))
    assert np.all(np.abs(per_step.mean(0) - want) <= 4 * se), (per_step.mean(0), want, se)
    grads = []
    for exact in (True, False):
        flat = s.flat0.clone().requires_grad_(True)
        step_losses(s, L, flat, torch.tensor(5), exact=exact)[0].sum().backward()
        grads.append(flat.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("fused", [True, False], ids=["fused_kernel", "tensor_ops"])
@pytest.mark.parametrize("hyper", [([1e-3, 2e-4, 5e-2], [1e-5, 0.0, 0.1]), ([1e-3] * 3, [1e-2] * 3),
                                   ([1e-3, 1e-3, 5e-2], [1e-2, 1e-2, 0.0])], ids=["distinct", "shared", "mixed"])
def test_fused_adamw_is_torch_adamw(fused, hyper):
    # Same gradients, per-member lr and weight decay (each member its own, all one, two sharing):
    # float64, so agreement to 1e-12 relative; both the fused kernel and the tensor operations.
    if fused and not fused_adamw_available(torch.zeros(1, dtype=torch.float64)):
        pytest.skip("this torch has no fused AdamW kernel for the CPU")
    torch.manual_seed(0)
    E, P = 3, 50
    lr, wd = (torch.tensor(v, dtype=torch.float64) for v in hyper)
    flat = torch.randn(E, P, dtype=torch.float64, requires_grad=True)
    ref = [flat[e].detach().clone().requires_grad_(True) for e in range(E)]
    ours = AdamW(flat, lr, wd, fused=fused)
    theirs = [torch.optim.AdamW([r], lr=float(lr[e]), weight_decay=float(wd[e])) for e, r in enumerate(ref)]
    for i in range(6):
        g = torch.randn(flat.shape[0], P, dtype=torch.float64)
        flat.grad = g.clone()
        ours.step()
        for e, (r, opt) in enumerate(zip(ref, theirs)):
            r.grad = g[e].clone()
            opt.step()
        if i == 2:  # member 1 leaves the ensemble
            ours.keep(torch.tensor([0, 2]))
            flat = flat.detach()[[0, 2]].clone().requires_grad_(True)
            ours.param = flat
            ref, theirs = [ref[0], ref[2]], [theirs[0], theirs[2]]
    for e in range(flat.shape[0]):
        torch.testing.assert_close(flat[e].detach(), ref[e].detach(), rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- whole fits

def test_a_member_trains_the_same_alone_and_in_an_ensemble():
    # Different holdouts, seeds, learning rates, sigmas and max_epochs (so the members leave the
    # ensemble at different steps).  Float32: the batched products may round differently with
    # another number of members; over a dozen steps that stays below 1e-4 relative.
    m = blobs()
    members = [Member(1, 0, hp()), Member(2, 5, hp(lr=1e-3, sigma=0.3, max_epochs=2)),
               Member(None, 1, hp(velocity_weight=0.0, max_epochs=4, patience=1)), Member(3, 0, hp(gamma=0.5))]
    together = train(m, members)
    for mem, model in zip(members, together):
        alone = train(m, [mem])[0]
        assert model.fit_info.epochs == alone.fit_info.epochs
        assert model.fit_info.best_epoch == alone.fit_info.best_epoch
        for a, b in zip(model.state_dict().values(), alone.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert [mod.fit_info.epochs for mod in together][:2] == [3, 2]  # each stopped on its own


def test_worker_processes_train_the_same_models_as_one_process(tmp_path, monkeypatch):
    # Four members (one joint model of two of them, trained on two courses) dealt to two worker
    # processes: the same epochs, and the same weights up to the float32 rounding of batched
    # products with another number of members (1e-4 relative, as above); the joint model stays
    # one object; the workers' folder is gone afterwards.  The temporary folder is this test's
    # own, so that another test's workers, running at the same time under pytest-xdist, are not
    # counted.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    a, b = blobs(), blobs(seed=1)
    members = [Member(1, 0, hp()), Member(2, 5, hp(lr=1e-3, max_epochs=2)),
               Member(1, 3, hp(), dataset=0, joint="j"), Member(None, 3, hp(), dataset=1, joint="j")]
    one = train([a, b], members, n_jobs=1)
    two = train([a, b], members, n_jobs=2)
    assert glob.glob(os.path.join(tempfile.gettempdir(), "cellmnn-workers-*")) == []
    assert two[2] is two[3] and two[0] is not two[2]
    for x, y in zip(one, two):
        assert x.fit_info.epochs == y.fit_info.epochs and x.fit_info.holdout == y.fit_info.holdout
        for u, v in zip(x.state_dict().values(), y.state_dict().values()):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-6)


def test_shares_keep_joint_models_together_and_balance_the_work():
    members = [Member(1, 0, hp(max_epochs=100)), Member(1, 1, hp(max_epochs=10), dataset=0, joint="j"),
               Member(1, 1, hp(max_epochs=10), dataset=1, joint="j"), Member(2, 0, hp(max_epochs=100)),
               Member(3, 0, hp(max_epochs=50))]
    assert shares(members, 2) == [[0, 4], [1, 2, 3]]  # 100 + 50 against 100 + 2 x 10
    assert shares(members, 5) == [[0], [3], [4], [1, 2]]  # at most one share per model
    assert n_workers(None, 4) == 1 and n_workers(3, 2) == 2 and 1 <= n_workers(-1, 9) <= 9


def test_an_error_in_a_worker_is_raised_with_its_own_type_and_message():
    m = blobs()
    members = [Member(1, 0, hp(init_scale=1e6)), Member(2, 1, hp(init_scale=1e6))]
    with pytest.raises(ValueError, match="the untrained model is out of range"):
        train(m, members, n_jobs=2)


@pytest.mark.parametrize("n_jobs", [0, -2, 1.5, True, "2"])
def test_a_bad_n_jobs_is_named(n_jobs):
    with pytest.raises(ValueError, match="n_jobs must be a positive integer, -1"):
        HParams(n_jobs=n_jobs)


def test_n_jobs_with_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(ValueError, match="n_jobs=2: a checkpoint covers one process"):
        train(blobs(), [Member(1, 0, hp()), Member(2, 0, hp())], checkpoint=tmp_path / "c.pt", n_jobs=2)


def test_fit_with_seeds_returns_each_seeds_model():
    m = blobs()
    many = cellmnn.fit(m, holdout=2, seeds=[4, 9], **FAST)
    one = cellmnn.fit(m, holdout=2, seed=9, **FAST)
    assert [x.fit_info.seed for x in many] == [4, 9]
    for a, b in zip(many[1].state_dict().values(), one.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(many[0].mlp[0].weight, many[1].mlp[0].weight)


@pytest.mark.parametrize("kwargs,match", [
    (dict(seeds=[1, 1]), "seeds repeats"),
    (dict(seeds=[]), "at least one seed"),
    (dict(seed=3, seeds=[1, 2]), "either seed or seeds"),
    (dict(seeds=[-1]), "seed must be"),
    (dict(cuda_graph="yes"), "cuda_graph must be True, False or None"),
])
def test_fit_seeds_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cellmnn.fit(blobs(), holdout=1, **{**FAST, **kwargs})


def test_members_that_cannot_share_an_ensemble_are_named():
    with pytest.raises(ValueError, match=r"must share \['width'\]"):
        check_members([Member(1, 0, hp()), Member(1, 1, hp(width=8))])
    models = train(blobs(), [Member(1, 0, hp(width=8)), Member(1, 1, hp(width=16))])  # two ensembles
    assert [mod.width for mod in models] == [8, 16]


def test_cuda_graph_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the GPU script tests graph capture")
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        cellmnn.fit(blobs(), holdout=1, cuda_graph=True, **FAST)


def test_cuda_graph_by_default_wherever_a_step_can_be_captured(monkeypatch):
    from cellmnn.train import trainer

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert trainer.use_graph(hp(), 3, cuda, 1)
    assert trainer.use_graph(hp(affine=True, piece_length=1.0), 3, cuda, 1)  # re-linearised, deterministic
    assert not trainer.use_graph(hp(), 3, cpu, 1)
    assert not trainer.use_graph(hp(), 3, cuda, 2)  # data parallel
    assert not trainer.use_graph(hp(backend="torch"), 3, cuda, 1)
    assert not trainer.use_graph(hp(backend="reference"), 3, cuda, 1)  # the dense float64 oracles
    assert not trainer.use_graph(hp(), 65, cuda, 1)  # beyond the Triton step kernels
    assert not trainer.use_graph(hp(noise="state"), 3, cuda, 1)
    assert not trainer.use_graph(hp(cuda_graph=False), 3, cuda, 1)
    assert trainer.use_graph(hp(cuda_graph=True), 3, cuda, 1)
    # asked for where it cannot capture: an error before any work on the (pretended) device
    monkeypatch.setattr(trainer, "resolve_device", lambda device: cuda)
    with pytest.raises(ValueError, match=r"cuda_graph=True cannot capture this step \(backend='auto', D = 2, "
                                         r"noise='state'\): .*deterministic decoder"):
        train(blobs(), [Member(1, 0, hp(cuda_graph=True, noise="state"))])


def test_a_diverging_member_is_named():
    with pytest.raises(FloatingPointError, match=r"diverged .*holdout 2, seed 1") as err:
        train(blobs(), [Member(1, 0, hp()), Member(2, 1, hp(lr=1e30))])
    assert "cuda_graph" not in str(err.value)  # eager steps: no word of graphs
    # after graph replays the message names the graph's bound on the operators as a cause too
    from cellmnn.train.trainer import _diverged

    msg = str(_diverged(7, Member(2, 1, hp(lr=1e30)), "loss nan", graph=True))
    assert re.search(r"diverged at epoch 7 .*CUDA graph replays.*cuda_graph=False.*holdout 2, seed 1", msg)


# ----------------------------------------------------------------------------- host reads

HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu", "tensor",
              "as_tensor", "nonzero", "__len__", "__iter__"}


class HostReads(TorchFunctionMode):
    """Records host reads of tensor values (and host-built tensors) made from this package's code."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in HOST_READS:
            caller = traceback.extract_stack()[-2]
            if "/cellmnn" in caller.filename:  # cellmnn/ or cellmnn_kernels/, not Triton's interpreter
                self.seen.append((name, f"{caller.filename.split('/')[-1]}:{caller.lineno}"))
        return func(*args, **(kwargs or {}))


def test_a_training_step_reads_nothing_back_to_the_host():
    # The device path (triton backend, run here by Triton's interpreter): a step of a 2-member
    # ensemble makes no host read of a tensor value and builds no tensor from host data.
    m = blobs(D=3)
    s = Setup(m, [Member(1, 0, hp(batch_size=16, backend="triton")),
                  Member(2, 1, hp(batch_size=16, backend="triton", sigma=0.5))], torch.device("cpu"))
    runner = Runner(s, s.flat0, False)
    runner.step()  # first call: plans and index tensors are built and cached
    with HostReads() as reads:
        loss = runner.step()
    assert reads.seen == []
    assert loss.shape == (2,) and torch.isfinite(loss).all()


def _syncs(prof) -> list:
    """The host synchronisations (what item(), int() and bool() of a tensor call) in a profile, by
    the operation that made each, leaving out torch's fused AdamW (it reads its step count on the
    host on a CPU, not on CUDA)."""
    out = []
    for e in prof.events():
        if e.name != "aten::_local_scalar_dense":
            continue
        chain, p = [], e.cpu_parent
        while p is not None:
            chain.append(p.name)
            p = p.cpu_parent
        if "aten::_fused_adamw_" not in chain:
            out.append(chain[:3])
    return out


@pytest.mark.parametrize("backend", [backend_param("triton")])
@pytest.mark.parametrize("decoder", [{}, dict(affine=True, piece_length=2.5)], ids=["paper", "affine-pieces"])
def test_a_captured_step_synchronises_nothing(decoder, backend, monkeypatch):
    # What a CUDA graph needs: no synchronisation anywhere in the step, inside torch operations and
    # autograd's backward too (which the host-read test above does not see). Capture is simulated on
    # the CPU (the step's backward sizes its scratch as under capture); eagerly the backward reads
    # its highest anchor level, and the profiler must see that read (the check can fail). The noise
    # decoders are not capturable (trainer.GRAPH_NEEDS: their covariance picks its doublings on the
    # host), and the trainer does not capture them.
    from cellmnn_kernels.ops.local_linear_step import triton_impl

    m = blobs(D=2)
    s = Setup(m, [Member(1, 0, hp(batch_size=16, width=16, backend=backend, **decoder)),
                  Member(2, 1, hp(batch_size=16, width=16, backend=backend, sigma=0.5, **decoder))],
              torch.device("cpu"))
    runner = Runner(s, s.flat0, False)
    runner.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as eager:
        runner.step()
    assert any("LocalLinearStepFunctionBackward" in " ".join(c) for c in _syncs(eager))
    monkeypatch.setattr(triton_impl, "capturing", lambda device: True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as captured:
        loss = runner.step()
    assert _syncs(captured) == []
    assert loss.shape == (2,) and torch.isfinite(loss).all()


@pytest.mark.parametrize("backend", [backend_param("triton")])
@pytest.mark.parametrize("decoder", [{}, dict(affine=True, noise="state", piece_length=1.0)],
                         ids=["paper", "pieces"])
def test_the_step_through_the_fused_network_kernels_equals_the_torch_step(decoder, backend):
    # On CUDA the step's network is fused_mlp's Triton kernels; here they run interpreted in its
    # place (the dispatch sends CPU tensors to torch): losses and the weight gradient agree within
    # the kernels' float32 tolerance (test_fused_mlp.py), with re-linearised pieces calling the
    # network along the path too (measured: losses equal in float32, gradients 1e-6 to 4e-6 apart).
    m = blobs()
    members = [Member(1, 0, hp(width=32, **decoder)), Member(2, 1, hp(width=32, sigma=0.5, **decoder))]
    s = Setup(m, members, torch.device("cpu"))
    L = Layout(s, [0, 1])
    out = {}
    for name in ("torch", backend):
        flat = s.flat0.clone().requires_grad_(True)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(step_module, "stacked_mlp",
                       lambda f, shapes, x, _b, name=name: cellmnn_kernels.fused_mlp(f, shapes, x, backend=name))
            loss, _ = step_losses(s, L, flat, torch.tensor(3))
        loss.sum().backward()
        out[name] = (loss.detach(), flat.grad)
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=5e-5, atol=1e-7)
    torch.testing.assert_close(out["triton"][1], out["torch"][1], rtol=5e-4, atol=1e-6)
