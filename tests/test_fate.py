"""Fate read-outs (``cellmnn.analysis.fate``): cell_transition, push and pull against known answers
on simulated courses whose true fates are known, their algebra against the coupling, errors naming
the argument, and the ``transitions`` and ``annotate`` commands."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cellmnn
import cellmnn.files as files
from cellmnn.analysis import fate
from cellmnn.analysis.fate import cell_transition, coupling, pull, push
from cellmnn.cli import main as cli_main
from cellmnn.data.simulate import advance, rotation, simulate
from cellmnn.model.persist import save_model
from cellmnn.plots import plot_trajectories

anndata = pytest.importorskip("anndata")
pd = pytest.importorskip("pandas")

N_CELLS = 300  # per snapshot, as bench/fate_transitions.py
FAST = dict(max_epochs=2, check_every=1, patience=2, batch_size=32, verbose=False)


def course_anndata(arrays, times, labels):
    t = np.repeat(np.asarray(times, dtype=np.float64), [len(a) for a in arrays])
    obs = pd.DataFrame({"day": t, "group": np.concatenate(labels)}, index=[f"c{i}" for i in range(len(t))])
    return anndata.AnnData(np.concatenate(arrays).astype(np.float32), obs=obs)


def side(x):
    return np.where(x[:, 0] < 0, "left", "right")


@pytest.fixture(scope="module")
def bifurcation():
    """The simulated pitchfork (cellmnn.data.simulate, data seed 0), every cell labelled by the
    sign of its first coordinate, and an ensemble of three models fitted with the defaults."""
    arrays, times = simulate("bifurcation", N_CELLS, seed=0)
    ad = course_anndata(arrays, times, [side(a) for a in arrays])
    m = cellmnn.load_marginals(ad, time_key="day", n_components=None)
    return arrays, times, ad, cellmnn.fit(m, seeds=[0, 1, 2], verbose=False)


@pytest.fixture(scope="module")
def quick():
    """A small three-time course with two groups and a barely trained model (for the algebra)."""
    rng = np.random.default_rng(3)
    arrays = [rng.normal(0.0, 1.0, (40, 3)) + t for t in range(3)]
    ad = course_anndata(arrays, [0.0, 1.0, 2.0], [np.where(a[:, 1] < a[:, 1].mean(), "a", "b") for a in arrays])
    m = cellmnn.load_marginals(ad, time_key="day", n_components=None)
    return ad, cellmnn.fit(m, **FAST)


def test_simulated_courses_are_seeded_and_advance_carries_given_cells():
    a, times = simulate("bifurcation-5d", 40, seed=0)
    b, _ = simulate("bifurcation-5d", 40, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and times == [0, 1, 2, 3, 4]
    Q = rotation("bifurcation-5d", 0)
    np.testing.assert_allclose(Q @ Q.T, np.eye(5), atol=1e-12)
    again, _ = simulate("bifurcation-5d", 4000, seed=7, rotation_seed=0)  # another draw, the same rotation
    latent = again[4] @ Q  # back to the simulator's coordinates: the pitchfork's two fates at x = +-1
    assert np.abs(np.abs(latent[:, 0]).mean() - 1.0) < 0.05 and abs(latent[:, 0].mean()) < 0.1
    np.testing.assert_allclose(advance("bifurcation-5d", a[2], 0.0, seed=1)[0], a[2])
    ends = advance("bifurcation", a[0][:, :2] * 0 + [[0.5, 0.0]], 3.0, seed=1, repeats=20)
    assert ends.shape == (20, 40, 2) and (ends[..., 0] > 0.5).mean() > 0.95  # x = 0.5 flows to the +1 fate
    with pytest.raises(ValueError, match="case must be one of"):
        simulate("spiral", 10, 0)
    with pytest.raises(ValueError, match=r"x must have shape \(n, 2\)"):
        advance("cycle", np.zeros((3, 5)), 1.0, seed=0)


@pytest.mark.parametrize("source, target", [(1.0, 2.0), (1.0, 4.0), (2.0, 4.0)])
def test_fate_probabilities_match_the_simulator(bifurcation, source, target):
    # Truth: the source cells themselves carried forward by the simulator (50 noise draws each) and
    # labelled by their side at the target time.  From t = 1 on, the side is mostly decided, and a
    # deterministic decoder can know it; at t = 0 the noise still decides about 15% of the fates,
    # which only a stochastic decoder can show (bench/fate_transitions.py reports t = 0 too).
    arrays, times, ad, models = bifurcation
    xs = arrays[times.index(source)]
    ends = advance("bifurcation", xs, target - source, seed=7, repeats=50)
    true_side = side(ends.reshape(-1, 2)).reshape(50, -1)
    table = cell_transition(models, ad, "group", source, target)
    np.testing.assert_allclose(table.sum(axis=1), 1.0, atol=1e-12)
    for g in table.index:
        truth = np.array([(true_side[:, side(xs) == g] == h).mean() for h in table.columns])
        tv = 0.5 * np.abs(table.loc[g].to_numpy() - truth).sum()
        assert tv <= 0.1, (g, table.loc[g].to_dict(), truth)
    # the late groups are recovered: both sides receive the mass they hold in the observed snapshot
    counts = np.array([table.attrs["source_counts"][g] for g in table.index], dtype=float)
    reached = counts / counts.sum() @ table.to_numpy()
    observed = np.array([(side(arrays[times.index(target)]) == h).mean() for h in table.columns])
    assert list(table.columns) == ["left", "right"]
    np.testing.assert_allclose(reached, observed, atol=0.1)


@pytest.fixture(scope="module")
def stochastic_bifurcation():
    """The same course and labels as ``bifurcation``, one model with a learned diffusion
    (noise="state", training seed 0)."""
    arrays, times = simulate("bifurcation", N_CELLS, seed=0)
    ad = course_anndata(arrays, times, [side(a) for a in arrays])
    m = cellmnn.load_marginals(ad, time_key="day", n_components=None)
    return arrays, ad, cellmnn.fit(m, seed=0, noise="state", verbose=False)


@pytest.mark.parametrize("target", [2.0, 4.0])
def test_fates_from_the_start_need_and_get_the_stochastic_decoder(stochastic_bifurcation, target):
    # At t = 0 the noise still decides about one fate in eight: a cell's fate is a distribution,
    # which the learned diffusion's draws (FATE_SAMPLES per cell) give (the deterministic decoder
    # is off by 0.10-0.14 here, bench/fate_transitions.py).  Same truth and bound as above (the
    # simulator, 50 draws per cell; total variation <= 0.1 per source group).
    arrays, ad, model = stochastic_bifurcation
    xs = arrays[0]
    ends = advance("bifurcation", xs, target, seed=13, repeats=50)
    true_side = side(ends.reshape(-1, 2)).reshape(50, -1)
    table = cell_transition(model, ad, "group", 0.0, target)
    assert table.attrs["n_samples"] == fate.FATE_SAMPLES
    for g in table.index:
        truth = np.array([(true_side[:, side(xs) == g] == h).mean() for h in table.columns])
        assert 0.5 * np.abs(table.loc[g].to_numpy() - truth).sum() <= 0.1, (g, table.loc[g].to_dict(), truth)


def test_pull_traces_a_branch_back_to_its_ancestors(bifurcation):
    # The left branch at t = 4 traced back to t = 1: the share of its ancestry on the cells that
    # are left at t = 1, against the simulator (the t = 1 cells carried to t = 4, 50 draws each).
    arrays, times, ad, models = bifurcation
    w = pull(models, ad, "group", "left", 1.0, 4.0, key_added=None)
    at1 = ad.obs["day"].to_numpy() == 1.0
    ends_left = (side(advance("bifurcation", arrays[1], 3.0, seed=11, repeats=50).reshape(-1, 2)) == "left")
    p_left = ends_left.reshape(50, -1).mean(axis=0)  # per t = 1 cell: the chance it ends left
    truth = p_left[side(arrays[1]) == "left"].sum() / p_left.sum()
    assert w[at1].sum() == pytest.approx(1.0) and np.isnan(w[~at1]).all()
    assert abs(w[at1][side(arrays[1]) == "left"].sum() - truth) <= 0.1


def test_pull_of_the_single_late_fate_recovers_both_starting_clusters():
    # Two clusters (y = -1 and y = +1) drawn to one fate at (2, 0): every cell at t = 4 is in the
    # fate, so its ancestry is every cell at t = 0, both clusters by their share of the cells.
    # (With one group holding every late cell, any coupling whose rows sum to 1 gives this; the
    # ancestry check that can fail is the bifurcation's, above.)
    arrays, times = simulate("converging", 200, seed=0)
    labels = [np.full(len(a), "fate") for a in arrays]
    labels[0] = np.where(arrays[0][:, 1] < 0, "lower", "upper")
    ad = course_anndata(arrays, times, labels)
    model = cellmnn.fit(cellmnn.load_marginals(ad, time_key="day", n_components=None), **FAST)
    first = ad.obs["day"].to_numpy() == 0.0
    for rule in fate.RULES:
        w = pull(model, ad, "group", "fate", 0.0, 4.0, rule=rule)
        for g in ("lower", "upper"):
            share = w[first & (ad.obs["group"].to_numpy() == g)].sum()
            assert share == pytest.approx((labels[0] == g).mean(), abs=1e-9) and share > 0.3
        assert np.isnan(w[~first]).all()
        np.testing.assert_array_equal(ad.obs["cellmnn_pull"].to_numpy(), w)


@pytest.mark.parametrize("rule", fate.RULES)
def test_table_push_and_pull_are_sums_of_the_coupling(quick, rule):
    ad, model = quick
    c = coupling(model, ad, "group", 0, 2, rule=rule, k=4)
    assert hasattr(c.P, "toarray") == (rule == "knn")  # knn: sparse, k entries a row; ot: dense
    P = c.P.toarray() if rule == "knn" else c.P
    np.testing.assert_allclose(P.sum(axis=1), 1.0, atol=1e-12)
    if rule == "ot":  # balanced: every observed cell receives the same mass
        np.testing.assert_allclose(P.sum(axis=0), len(c.source_cells) / len(c.target_cells), atol=1e-9)
    else:  # each pushed cell's 4 nearest observed cells, 1/4 each
        assert ((P > 0).sum(axis=1) == 4).all()
    table = cell_transition(model, ad, "group", 0, 2, rule=rule, k=4)
    for g in table.index:
        for h in table.columns:
            expect = P[c.source_labels == g][:, c.target_labels == h].sum() / (c.source_labels == g).sum()
            assert table.loc[g, h] == pytest.approx(expect, abs=1e-12)
    w = push(model, ad, "group", "a", 0, 2, rule=rule, k=4, key_added=None)
    at2 = ad.obs["day"].to_numpy() == 2.0
    np.testing.assert_allclose(w[at2], P[c.source_labels == "a"].mean(axis=0), atol=1e-12)
    assert np.isnan(w[~at2]).all() and w[at2].sum() == pytest.approx(1.0)
    v = pull(model, ad, "group", "b", 0, 2, rule=rule, k=4, key_added=None)
    mass = P[:, c.target_labels == "b"].sum(axis=1)
    np.testing.assert_allclose(v[ad.obs["day"].to_numpy() == 0.0], mass / mass.sum(), atol=1e-12)
    assert "cellmnn_push" not in ad.obs and "cellmnn_pull" not in ad.obs  # key_added=None writes nothing


def test_a_stochastic_model_couples_every_draw_and_a_deterministic_one_each_cell_once(quick):
    # A learned diffusion: each source cell is pushed n_samples times (seeds seed, seed + 1, ...) and
    # P is the mean of the draws' matches; a deterministic model pushes once whatever n_samples says.
    ad, model = quick
    noisy = cellmnn.fit(cellmnn.load_marginals(ad, time_key="day", n_components=None), noise="state", **FAST)
    c = coupling(noisy, ad, "group", 0, 2, k=4, n_samples=3, seed=5)
    draws = [fate.push_cells(noisy, c.z_source, 0.0, 2.0, seed=5 + r) for r in range(3)]
    assert not np.allclose(draws[0], draws[1])  # the draws differ
    expect = sum(fate.match(d, c.z_target, "knn", 4).toarray() for d in draws) / 3
    np.testing.assert_allclose(c.P.toarray(), expect, atol=1e-12)
    np.testing.assert_allclose(c.P.toarray().sum(axis=1), 1.0, atol=1e-12)
    again = coupling(noisy, ad, "group", 0, 2, k=4, n_samples=3, seed=5)
    np.testing.assert_array_equal(again.P.toarray(), c.P.toarray())  # reproducible from the seed
    table = cell_transition(noisy, ad, "group", 0, 2, k=4)
    assert table.attrs["n_samples"] == fate.FATE_SAMPLES
    one = cell_transition(model, ad, "group", 0, 2, k=4, n_samples=7)
    assert one.attrs["n_samples"] == 1
    pd.testing.assert_frame_equal(one, cell_transition(model, ad, "group", 0, 2, k=4))
    # an ensemble mixing the two: the deterministic member's one push weighs as much as all draws
    mixed = coupling([model, noisy], ad, "group", 0, 2, k=4, n_samples=3, seed=5)
    det = coupling(model, ad, "group", 0, 2, k=4)
    np.testing.assert_allclose(mixed.P.toarray(), (det.P.toarray() + expect) / 2, atol=1e-12)
    with pytest.raises(ValueError, match="n_samples must be"):
        cell_transition(noisy, ad, "group", 0, 2, n_samples=0)


@given(n=st.integers(1, 30), m=st.integers(1, 30), k=st.integers(1, 40), seed=st.integers(0, 2 ** 16))
def test_knn_match_gives_each_pushed_cell_to_its_nearest_observed_cells(n, m, k, seed):
    # Against a float64 brute force: the k (or all m) nearest observed cells of each pushed cell
    # share its unit of mass.  Ties are broken arbitrarily, so distances are drawn continuous.
    rng = np.random.default_rng(seed)
    pushed, observed = rng.normal(size=(n, 3)), rng.normal(size=(m, 3))
    P = fate.match(pushed, observed, "knn", k).toarray()
    d = np.linalg.norm(pushed[:, None] - observed[None], axis=2)
    kk = min(k, m)
    for i in range(n):
        nearest = set(np.argsort(d[i])[:kk])
        assert set(np.flatnonzero(P[i])) == nearest
        np.testing.assert_allclose(P[i][list(nearest)], 1.0 / kk)


def test_knn_match_in_blocks_is_the_same_match(monkeypatch):
    # Large populations are matched in row blocks of KNN_BLOCK // n_observed pushed cells, so that
    # the distances held at once stay bounded; the blocks must not change the result.
    rng = np.random.default_rng(5)
    pushed, observed = rng.normal(size=(37, 3)), rng.normal(size=(23, 3))
    whole = fate.match(pushed, observed, "knn", 5).toarray()
    monkeypatch.setattr(fate, "KNN_BLOCK", 50)  # 2 rows a block
    np.testing.assert_array_equal(fate.match(pushed, observed, "knn", 5).toarray(), whole)


@given(n=st.integers(1, 25), m=st.integers(1, 25), seed=st.integers(0, 2 ** 16))
def test_ot_match_is_an_optimal_balanced_plan(n, m, seed):
    # Marginals exact; optimality against a float64 LP-free check: no cheaper plan among the
    # plan's own support swaps (2-cycle improvements) -- the cyclical monotonicity of an optimal plan.
    rng = np.random.default_rng(seed)
    pushed, observed = rng.normal(size=(n, 2)), rng.normal(size=(m, 2))
    P = fate.match(pushed, observed, "ot", 0)
    np.testing.assert_allclose(P.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(P.sum(axis=0), n / m, atol=1e-9)
    C = ((pushed[:, None] - observed[None]) ** 2).sum(-1)
    support = np.argwhere(P > 1e-12)
    for i, j in support:
        for a, b in support:
            assert C[i, j] + C[a, b] <= C[i, b] + C[a, j] + 1e-9


def test_push_writes_into_obs_and_never_over_a_column_it_did_not_write(quick):
    ad, model = quick
    ad = ad.copy()
    w = push(model, ad, "group", "b", 1, 2)
    np.testing.assert_array_equal(ad.obs["cellmnn_push"].to_numpy(), w)
    assert ad.uns["cellmnn_fate"]["cellmnn_push"]["group"] == "b"
    push(model, ad, "group", "a", 1, 2)  # its own column: replaced
    assert ad.uns["cellmnn_fate"]["cellmnn_push"]["group"] == "a"
    ad.obs["mine"] = 1.0
    with pytest.raises(ValueError, match=r"obs\['mine'\] exists and was not written"):
        push(model, ad, "group", "a", 1, 2, key_added="mine")
    with pytest.raises(ValueError, match="view"):
        push(model, ad[:50], "group", "a", 0, 1)


@pytest.mark.parametrize("call, exc, match", [
    (lambda m, ad: cell_transition(m, ad, "celltype", 0, 2), ValueError, "annotation 'celltype' is not a column"),
    (lambda m, ad: cell_transition(m, ad, "group", 0.5, 2), ValueError, "source 0.5 is not a time of the data"),
    (lambda m, ad: cell_transition(m, ad, "group", 0, 7), ValueError, "target 7 is not a time"),
    (lambda m, ad: cell_transition(m, ad, "group", 2, 1), ValueError, "must be a later time than source"),
    (lambda m, ad: cell_transition(m, ad, "group", 0, 2, rule="sinkhorn"), ValueError, "rule must be one of"),
    (lambda m, ad: cell_transition(m, ad, "group", 0, 2, k=0), ValueError, "k must be"),
    (lambda m, ad: cell_transition(m, ad, "group", 0, 2, target_annotation="nope"), ValueError, "'nope'"),
    (lambda m, ad: cell_transition([], ad, "group", 0, 2), ValueError, "empty list"),
    (lambda m, ad: cell_transition(m, ad.X, "group", 0, 2), TypeError, "adata must be an AnnData"),
    (lambda m, ad: push(m, ad, "group", "zz", 0, 2), ValueError, "group 'zz' has no cells at time 0"),
    (lambda m, ad: pull(m, ad, "group", "zz", 0, 2), ValueError, r"groups there are \['a', 'b'\]"),
    (lambda m, ad: push(m, ad, "group", "a", 0, 2, key_added=""), ValueError, "key_added"),
])
def test_bad_input_names_the_argument(quick, call, exc, match):
    ad, model = quick
    with pytest.raises(exc, match=match):
        call(model, ad)


def test_unlabelled_cells_an_oversized_match_and_mixed_ensembles_are_errors(quick, monkeypatch):
    ad, model = quick
    holes = ad.copy()
    holes.obs["group"] = holes.obs["group"].astype(object)
    holes.obs.iloc[45, holes.obs.columns.get_loc("group")] = None  # a cell at t = 1
    with pytest.raises(ValueError, match="1 cells at time 1 have no label"):
        cell_transition(model, holes, "group", 1, 2)
    push(model, holes, "group", "a", 1, 2, key_added=None)  # push/pull: an unlabelled cell is in no group
    monkeypatch.setattr(fate, "MAX_OT_ENTRIES", 100)
    with pytest.raises(ValueError, match="40 x 40 cells is more than one exact OT match"):
        cell_transition(model, ad, "group", 0, 2, rule="ot")
    other = cellmnn.fit(cellmnn.load_marginals(ad[ad.obs["day"] < 2].copy(), time_key="day", n_components=None),
                        **FAST)
    with pytest.raises(ValueError, match=r"model\[1\]: its data transform differs"):
        cell_transition([model, other], ad, "group", 0, 2)


def test_every_error_comes_before_the_model_runs(quick, monkeypatch):
    ad, model = quick

    def no_model_call(*args, **kwargs):
        raise AssertionError("the model ran before the arguments were checked")

    monkeypatch.setattr(fate, "push_cells", no_model_call)
    holes = ad.copy()
    holes.obs["group"] = holes.obs["group"].astype(object)
    holes.obs.iloc[0, holes.obs.columns.get_loc("group")] = None
    ad2 = ad.copy()
    ad2.obs["mine"] = 0.0
    for call, match in ((lambda: push(model, ad, "group", "zz", 0, 2), "group 'zz' has no cells"),
                        (lambda: pull(model, ad, "group", "zz", 0, 2), "group 'zz' has no cells"),
                        (lambda: push(model, ad2, "group", "a", 0, 2, key_added="mine"), "was not written"),
                        (lambda: cell_transition(model, holes, "group", 0, 2), "have no label"),
                        (lambda: push(model, "adata", "group", "a", 0, 2), "adata must be an AnnData")):
        with pytest.raises((ValueError, TypeError), match=match):
            call()


def test_trajectory_picture_of_one_model_and_of_an_ensemble(quick, tmp_path):
    ad, model = quick
    m = cellmnn.load_marginals(ad, time_key="day", n_components=None)
    for name, models in (("one.png", model), ("two.png", [model, model])):
        plot_trajectories(m, models, tmp_path / name, n_paths=10, steps=5)
        assert files.png_software(str(tmp_path / name)).startswith("cellmnn")
    (tmp_path / "mine.png").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        plot_trajectories(m, model, tmp_path / "mine.png")


def test_flow_threads_consecutive_tables_and_conserves_mass(quick, tmp_path):
    from cellmnn import plots

    ad, model = quick
    a, b = cell_transition(model, ad, "group", 0, 1, k=4), cell_transition(model, ad, "group", 1, 2, k=4)
    b = b.iloc[::-1]  # the next table's groups in another order: threaded by name
    assert plots._threaded([a, b]) and not plots._threaded([a, cell_transition(model, ad, "group", 0, 2, k=4)])
    tables, masses = plots.chain_flow([a, b])
    assert list(tables[1].index) == list(a.columns)
    counts = np.array([a.attrs["source_counts"][g] for g in a.index], dtype=float)
    np.testing.assert_allclose(masses[0], counts / counts.sum())
    np.testing.assert_allclose(masses[1], masses[0] @ a.to_numpy())
    np.testing.assert_allclose(masses[2], masses[1] @ b.loc[list(a.columns)].to_numpy())
    np.testing.assert_allclose([m.sum() for m in masses], 1.0, atol=1e-12)
    plots.plot_flow([a, b], tmp_path / "chain.png")
    assert files.png_software(str(tmp_path / "chain.png")).startswith("cellmnn")
    with pytest.raises(ValueError, match="at least one transition table"):
        plots.plot_flow([], tmp_path / "none.png")


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_transitions_and_annotate(quick, tmp_path, capsys):
    ad, model = quick
    data, mdir = tmp_path / "course.h5ad", tmp_path / "model"
    ad.write_h5ad(data)
    save_model(model, mdir)
    before = _sha(data)
    out = ["--out", str(tmp_path / "t.csv"), "--heatmap", str(tmp_path / "t.png"), "--flow", str(tmp_path / "f.png")]
    assert cli_main(["transitions", str(mdir), str(data), "--annotation", "group", "--source", "0", "--target", "2",
                     "--ensemble", str(mdir), *out]) == 0
    rows = (tmp_path / "t.csv").read_text().splitlines()
    assert rows[0] == "source_group,target_group,probability,source_time,target_time,n_source_cells,rule,n_samples"
    table = cell_transition(model, ad, "group", 0, 2)
    got = {(r.split(",")[0], r.split(",")[1]): float(r.split(",")[2]) for r in rows[1:]}
    assert got == pytest.approx({(g, h): table.loc[g, h] for g in table.index for h in table.columns}, abs=1e-5)
    for png in ("t.png", "f.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli_main(["transitions", str(mdir), str(data), "--annotation", "kind", "--source", "0", "--target", "2",
                     "--out", str(tmp_path / "t2.csv")]) == 2
    assert "annotation 'kind' is not a column of adata.obs" in capsys.readouterr().err

    weights = ["--push", "a", "--pull", "b", "--weights", str(tmp_path / "w.csv"),
               "--weights-plot", str(tmp_path / "w.png")]
    assert cli_main(["transitions", str(mdir), str(data), "--annotation", "group", "--source", "0", "--target", "2",
                     "--out", str(tmp_path / "t3.csv"), *weights]) == 0
    rows = [r.split(",") for r in (tmp_path / "w.csv").read_text().splitlines()]
    assert rows[0] == ["cell", "time", "push_a", "pull_b"] and len(rows) == 1 + 80  # the cells of t = 0 and t = 2
    want_push = push(model, ad.copy(), "group", "a", 0, 2, key_added=None)
    want_pull = pull(model, ad.copy(), "group", "b", 0, 2, key_added=None)
    index = {name: i for i, name in enumerate(ad.obs_names)}
    for cell, _, p, q in rows[1:]:
        i = index[cell]
        assert (float(p) if p else np.nan) == pytest.approx(want_push[i], abs=1e-6, nan_ok=True)
        assert (float(q) if q else np.nan) == pytest.approx(want_pull[i], abs=1e-6, nan_ok=True)
    assert files.png_software(str(tmp_path / "w.png")).startswith("cellmnn")
    assert cli_main(["transitions", str(mdir), str(data), "--annotation", "group", "--source", "0", "--target", "2",
                     "--out", str(tmp_path / "t4.csv"), "--push", "a"]) == 2
    assert "need --weights" in capsys.readouterr().err
    assert cli_main(["transitions", str(mdir), str(data), "--annotation", "group", "--source", "0", "--target", "2",
                     "--out", str(tmp_path / "t6.csv"), "--samples", "0"]) == 2
    assert "--samples must be a positive integer, got 0" in capsys.readouterr().err
    chain = ["--out", str(tmp_path / "t5.csv"), "--flow", str(tmp_path / "f5.png"),
             "--heatmap", str(tmp_path / "h5.png")]
    assert cli_main(["transitions", str(mdir), str(data), "--annotation", "group", "--source", "0", "--target", "1",
                     "2", *chain]) == 0  # consecutive times: 0 -> 1 and 1 -> 2 in one CSV and one figure each
    pairs = {tuple(r.split(",")[3:5]) for r in (tmp_path / "t5.csv").read_text().splitlines()[1:]}
    assert pairs == {("0", "1"), ("1", "2")}
    second = cell_transition(model, ad, "group", 1, 2)
    got = {(r.split(",")[0], r.split(",")[1]): float(r.split(",")[2])
           for r in (tmp_path / "t5.csv").read_text().splitlines()[1:] if r.split(",")[3] == "1"}
    assert got == pytest.approx({(g, h): second.loc[g, h] for g in second.index for h in second.columns}, abs=1e-5)
    assert files.png_software(str(tmp_path / "f5.png")).startswith("cellmnn")
    assert cli_main(["transitions", str(mdir), str(data), "--annotation", "group", "--source", "0", "--target", "1",
                     "2", "--out", str(tmp_path / "t6.csv"), "--push", "a", "--weights", str(tmp_path / "w6.csv")]) == 2
    assert "one --target time" in capsys.readouterr().err

    assert cli_main(["annotate", str(mdir), str(data), "--out", str(tmp_path / "new.h5ad"), "--times", "1", "3"]) == 0
    new = anndata.read_h5ad(tmp_path / "new.h5ad")
    assert new.obsm["cellmnn_pred"].shape == (120, 2, 3) and list(new.uns["cellmnn"]["pred_times"]) == [1.0, 3.0]
    assert cli_main(["annotate", str(mdir), str(tmp_path / "new.h5ad"), "--out", str(tmp_path / "new.h5ad")]) == 2
    assert "never changes DATA" in capsys.readouterr().err
    assert cli_main(["annotate", str(mdir), str(data), "--out", str(data)]) == 2  # not an annotated file: refused
    assert "refusing to overwrite" in capsys.readouterr().err
    assert cli_main(["annotate", str(mdir), str(data), "--out", str(tmp_path / "new.h5ad"),  # its own: replaced
                     "--ensemble", str(mdir)]) == 0
    new = anndata.read_h5ad(tmp_path / "new.h5ad")
    assert new.uns["cellmnn"]["members"] == 2 and new.obsm["cellmnn_pred_spread"].max() == 0.0  # one model twice
    assert _sha(data) == before  # the input file is never changed
