"""cellmnn.annotate: read-outs written back into AnnData under documented keys, the .h5ad round trip,
copy semantics, errors before any work and the refusal to overwrite keys annotate did not write."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import cellmnn
from cellmnn.annotate import transform_from_uns

anndata = pytest.importorskip("anndata")

FAST = dict(holdout=None, seed=0, max_epochs=2, check_every=1, patience=2, batch_size=32, verbose=False)
GENES = [f"g{i}" for i in range(6)]
DAYS = (0.0, 1.0, 2.5)


def course(seed=0, n=40):
    """3 timepoints x n cells, 6 named genes drifting in time."""
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.normal(0.0, 1.0, (n, 6)) + t * np.linspace(1.0, -1.0, 6) for t in DAYS])
    ad = anndata.AnnData(X.astype(np.float32))
    ad.var_names = GENES
    ad.obs_names = [f"cell{i}" for i in range(len(X))]
    ad.obs["day"] = np.repeat(DAYS, n)
    ad.obsm["X_pca"] = rng.normal(size=(len(X), 5))
    return ad


@pytest.fixture(scope="module")
def fitted():
    ad = course()
    m = cellmnn.load_marginals(ad, time_key="day", n_components=3)
    return m, cellmnn.fit(m, **FAST)


@pytest.fixture
def ad():
    return course()


def snapshot(a):
    """Everything of an AnnData that annotate could touch, for equality checks."""
    return (a.X.copy(), a.obs.copy(), {k: np.array(v) for k, v in a.obsm.items()}, dict(a.uns), list(a.var_names))


def assert_same(a, b):
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1].equals(b[1]) and list(a[1].columns) == list(b[1].columns)
    assert a[2].keys() == b[2].keys() and all(np.array_equal(a[2][k], b[2][k]) for k in a[2])
    assert a[3].keys() == b[3].keys() and a[4] == b[4]


def assert_tree_equal(a, b, path="uns"):
    """Nested dicts of arrays, strings and numbers equal (arrays exactly)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(np.asarray(a), np.asarray(b)), path
    else:
        assert a == b and type(a) is type(b) or (isinstance(a, (int, float)) and a == b), f"{path}: {a!r} != {b!r}"


# ----------------------------------------------------------------------------- contents

def test_keys_and_shapes(fitted, ad):
    m, model = fitted
    assert cellmnn.annotate(ad, model, genes=["g0", "g2", "g5"]) is None  # in place: None
    n, T, D, F = ad.n_obs, len(m.times), model.dim, 6
    assert ad.obsm["cellmnn_z"].shape == (n, D) and ad.obsm["cellmnn_z"].dtype == np.float64
    assert ad.obsm["cellmnn_pred"].shape == (n, T, D) and ad.obsm["cellmnn_pred"].dtype == np.float32
    assert ad.obsm["cellmnn_pred_features"].shape == (n, T, F)
    for k in ("cellmnn_eigvals_real", "cellmnn_eigvals_imag"):
        assert ad.obsm[k].shape == (n, D) and ad.obsm[k].dtype == np.float64
    for k in ("cellmnn_trace", "cellmnn_spectral_abscissa"):
        assert ad.obs[k].dtype == np.float64 and np.isfinite(ad.obs[k]).all()
    u = ad.uns["cellmnn"]
    np.testing.assert_array_equal(u["pred_times"], m.times)  # default: the model's timepoints
    assert u["format"] == "cellmnn-annotate" and u["cellmnn_version"] == cellmnn.__version__
    assert u["time_key"] == "day" and "embedding" not in u and u["pred_features"] is True
    assert u["model"] == {k: v for k, v in model.config().items() if v is not None}  # None cannot be stored in h5ad
    assert transform_from_uns(u).same_as(m.transform)
    assert u["fit"]["seed"] == 0 and u["fit"]["epochs"] == 2 and "holdout" not in u["fit"]
    assert u["fit"]["hparams"]["batch_size"] == 32 and u["fit"]["history"].shape == (2, 3)
    assert sorted(u["keys"]["obs"]) == ["cellmnn_spectral_abscissa", "cellmnn_trace"]
    assert len(u["keys"]["obsm"]) == 5


def test_predictions_are_model_predict_of_the_same_cells(fitted, ad):
    m, model = fitted
    cellmnn.annotate(ad, model, times=[0.5, 2.5, 4.0])
    z, t, pred = ad.obsm["cellmnn_z"], ad.obs["day"].to_numpy(), ad.obsm["cellmnn_pred"]
    np.testing.assert_array_equal(pred, model.predict(z, t, [0.5, 2.5, 4.0]))  # exact: the same call
    for k, day in enumerate(m.times):  # the loader's path gives the same cells (to float64 rounding)
        sel = t == day
        np.testing.assert_allclose(z[sel], m.data[k], rtol=0, atol=1e-12)
        np.testing.assert_allclose(pred[sel], model.predict(m.data[k], day, [0.5, 2.5, 4.0]), rtol=0, atol=1e-6)
    feats = m.transform.to_features(pred.reshape(-1, model.dim)).reshape(pred.shape[0], 3, 6)
    np.testing.assert_allclose(ad.obsm["cellmnn_pred_features"], feats, rtol=1e-6, atol=1e-5)


def test_operator_summaries_match_model_operator(fitted, ad):
    m, model = fitted
    cellmnn.annotate(ad, model)
    z = torch.as_tensor(ad.obsm["cellmnn_z"], dtype=torch.float32)
    t = torch.as_tensor(ad.obs["day"].to_numpy(), dtype=torch.float64)
    with torch.no_grad():
        A = model.operator(z, t)  # float32
    scale = float(A.abs().max())
    # float32 tolerance: the trace is the float64 sum of the same float32 diagonal: 1e-6 of max |A_ij|
    np.testing.assert_allclose(ad.obs["cellmnn_trace"], A.diagonal(dim1=1, dim2=2).sum(-1).numpy(),
                               rtol=0, atol=1e-6 * scale)
    re, im = ad.obsm["cellmnn_eigvals_real"], ad.obsm["cellmnn_eigvals_imag"]
    np.testing.assert_allclose(re.sum(1), ad.obs["cellmnn_trace"], rtol=0, atol=1e-9 * scale)
    np.testing.assert_allclose(im.sum(1), 0, atol=1e-9 * scale)
    assert (np.diff(re, axis=1) <= 0).all()  # ordered by real part, descending
    np.testing.assert_array_equal(ad.obs["cellmnn_spectral_abscissa"], re[:, 0])
    ev = torch.linalg.eigvals(A.double()).numpy()
    np.testing.assert_allclose(np.sort(ev.real, 1)[:, ::-1], re, rtol=0, atol=1e-9 * scale)


def test_interactions_are_gene_interactions(fitted, ad):
    m, model = fitted
    genes = ["g4", "g0", "g2"]
    cellmnn.annotate(ad, model, genes=genes)
    d = ad.uns["cellmnn"]["interactions"]
    assert list(d["genes"]) == genes and d["kind"] == "weight"
    overall = cellmnn.gene_interactions(model, m, genes=genes, aggregate="all")
    np.testing.assert_allclose(d["weight"], overall.matrix(genes), rtol=1e-9, atol=1e-12)  # row target, col source
    per_t = cellmnn.gene_interactions(model, m, genes=genes, aggregate="timepoint")
    np.testing.assert_allclose(d["weight_per_time"].reshape(3, -1), per_t.values, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(d["fraction_positive_per_time"].reshape(3, -1), per_t.positive)
    np.testing.assert_array_equal(d["times"], m.times)
    np.testing.assert_array_equal(d["n_cells"], [40, 40, 40])


def test_new_cells_matched_by_gene_name_sparse_and_a_loaded_model(fitted, ad, tmp_path):
    import scipy.sparse as sp

    m, model = fitted
    cellmnn.annotate(ad, model)
    order = [3, 0, 5, 1, 4, 2]  # other gene order, an extra gene, a subset of cells, sparse X
    sub = ad[::3]
    X = np.concatenate([sub.X[:, order], np.ones((sub.n_obs, 1), np.float32)], axis=1)
    new = anndata.AnnData(sp.csr_matrix(X), obs=sub.obs[["day"]].copy())
    new.obs["day"] = new.obs["day"].map("{:g}".format).astype("category")  # times as category labels
    new.var_names = [GENES[i] for i in order] + ["extra"]
    cellmnn.save_model(model, tmp_path / "model")
    loaded = cellmnn.load_model(tmp_path / "model")
    cellmnn.annotate(new, loaded)
    np.testing.assert_array_equal(new.obsm["cellmnn_z"], sub.obsm["cellmnn_z"])
    np.testing.assert_array_equal(new.obsm["cellmnn_pred"], sub.obsm["cellmnn_pred"])
    assert new.uns["cellmnn"]["fit"]["epochs"] == 2  # from the saved training record


def test_model_fitted_on_an_embedding(ad):
    m = cellmnn.load_marginals(ad, time_key="day", embedding="X_pca", n_components=3)
    model = cellmnn.fit(m, **FAST)
    cellmnn.annotate(ad, model)  # obsm['X_pca'] by default (the model's record), its first 3 columns
    assert ad.uns["cellmnn"]["embedding"] == "X_pca"
    for k, day in enumerate(m.times):
        np.testing.assert_allclose(ad.obsm["cellmnn_z"][ad.obs["day"] == day], m.data[k], rtol=0, atol=1e-12)
    assert ad.obsm["cellmnn_pred_features"].shape == (ad.n_obs, 3, 3)  # feature space = the embedding's columns
    short = ad.copy()
    short.obsm["X_pca"] = short.obsm["X_pca"][:, :2]
    with pytest.raises(ValueError, match=r"adata.obsm\['X_pca'\] has 2 features; the model was fitted on 3"):
        cellmnn.annotate(short, model, copy=True)
    no_embedding = anndata.AnnData(ad.X.copy(), obs=ad.obs[["day"]].copy())
    with pytest.raises(ValueError, match="adata.X has 6 features; the model was fitted on 3"):
        cellmnn.annotate(no_embedding, model)


# ----------------------------------------------------------------------------- .h5ad, copy, overwrite

def test_h5ad_round_trip(fitted, ad, tmp_path):
    m, model = fitted
    cellmnn.annotate(ad, model, times=2.0, genes=["g1", "g3"])
    path = tmp_path / "annotated.h5ad"
    ad.write_h5ad(path)
    back = anndata.read_h5ad(path)
    for k in ad.obsm:
        assert back.obsm[k].dtype == ad.obsm[k].dtype
        np.testing.assert_array_equal(back.obsm[k], ad.obsm[k])
    for k in ("cellmnn_trace", "cellmnn_spectral_abscissa"):
        np.testing.assert_array_equal(back.obs[k], ad.obs[k])
    assert_tree_equal(ad.uns["cellmnn"], back.uns["cellmnn"])
    assert back.obsm["cellmnn_pred"].shape == (ad.n_obs, 1, model.dim)
    assert transform_from_uns(back.uns["cellmnn"]).same_as(m.transform)
    cellmnn.annotate(back, model, times=[1.0, 3.0])  # the provenance is still recognised: replaced
    assert back.obsm["cellmnn_pred"].shape == (ad.n_obs, 2, model.dim) and "interactions" not in back.uns["cellmnn"]


def test_copy_leaves_the_input_untouched(fitted, ad):
    _, model = fitted
    before = snapshot(ad)
    out = cellmnn.annotate(ad, model, genes=["g0", "g1"], copy=True)
    assert isinstance(out, anndata.AnnData) and out is not ad
    assert_same(before, snapshot(ad))
    assert "cellmnn_pred" in out.obsm and "cellmnn" in out.uns and "cellmnn_trace" in out.obs
    view = ad[:10]
    out = cellmnn.annotate(view, model, copy=True)
    assert out.n_obs == 10 and not out.is_view


def test_refuses_keys_it_did_not_write(fitted, ad):
    _, model = fitted
    for where, key in (("obsm", "cellmnn_pred"), ("obs", "cellmnn_trace"), ("obsm", "cellmnn_eigvals_imag")):
        a = course()
        getattr(a, where)[key] = np.zeros((a.n_obs, 2)) if where == "obsm" else np.zeros(a.n_obs)
        before = snapshot(a)
        with pytest.raises(ValueError, match=rf"adata.{where}\['{key}'\] exists and was not written by cellmnn"):
            cellmnn.annotate(a, model)
        assert_same(before, snapshot(a))
        cellmnn.annotate(a, model, prefix="mnn")  # another prefix is fine
        assert "mnn_pred" in a.obsm
    ad.uns["cellmnn"] = {"mine": 1}
    with pytest.raises(ValueError, match=r"adata.uns\['cellmnn'\] exists and was not written by cellmnn"):
        cellmnn.annotate(ad, model)
    # uns carries our provenance but does not list the key: someone else's, refused
    a = course()
    cellmnn.annotate(a, model)
    a.uns["cellmnn"]["keys"]["obsm"] = [k for k in a.uns["cellmnn"]["keys"]["obsm"] if k != "cellmnn_pred"]
    with pytest.raises(ValueError, match=r"adata.obsm\['cellmnn_pred'\] exists and was not written"):
        cellmnn.annotate(a, model)


def test_reannotation_replaces_and_drops_stale_keys(fitted, ad, monkeypatch):
    _, model = fitted
    cellmnn.annotate(ad, model)
    assert "cellmnn_pred_features" in ad.obsm
    # the module (the name cellmnn.annotate is the function)
    monkeypatch.setattr(sys.modules["cellmnn.annotate"], "MAX_FEATURE_VALUES", 10)
    with pytest.warns(UserWarning, match=r"obsm\['cellmnn_pred_features'\] skipped: 120 cells x 1 times x 6 features"):
        cellmnn.annotate(ad, model, times=[3.0])
    assert "cellmnn_pred_features" not in ad.obsm and ad.uns["cellmnn"]["pred_features"] is False
    assert "cellmnn_pred_features" not in ad.uns["cellmnn"]["keys"]["obsm"]
    assert ad.obsm["cellmnn_pred"].shape[1] == 1
    ad.uns["cellmnn"]["keys"]["obsm"] = list(ad.uns["cellmnn"]["keys"]["obsm"]) + ["X_pca"]  # a tampered record
    monkeypatch.setattr(sys.modules["cellmnn.annotate"], "MAX_FEATURE_VALUES", 10 ** 8)
    cellmnn.annotate(ad, model)
    assert "X_pca" in ad.obsm and "cellmnn_pred_features" in ad.obsm  # only this prefix's own keys are removed


# ----------------------------------------------------------------------------- errors, before any work

def _nan_time(a):
    a.obs["day"] = a.obs["day"].to_numpy().copy()
    a.obs.iloc[5, a.obs.columns.get_loc("day")] = np.nan


def _nan_gene(a):
    a.X[7, 2] = np.inf


def _rename(a):
    a.var_names = ["g0", "g1", "g2", "g3", "g4", "other"]


def _text_time(a):
    a.obs["day"] = ["early"] * a.n_obs


ERRORS = [
    (lambda a, mdl, m: cellmnn.annotate(a.X, mdl), TypeError, "adata must be an AnnData"),
    (lambda a, mdl, m: cellmnn.annotate(a, "model"), TypeError, "model must be a fitted CellMNN"),
    (lambda a, mdl, m: cellmnn.annotate(a, mdl, time_key="when"), ValueError, "time_key 'when' not found in adata.obs"),
    (lambda a, mdl, m: (a.obs.rename(columns={"day": "batch"}, inplace=True), cellmnn.annotate(a, mdl)),
     ValueError, "no time column found in adata.obs"),
    (lambda a, mdl, m: (_nan_time(a), cellmnn.annotate(a, mdl)), ValueError,
     r"adata.obs\['day'\]: 1 cells have a non-finite time"),
    (lambda a, mdl, m: (_text_time(a), cellmnn.annotate(a, mdl)), ValueError, r"adata.obs\['day'\] must be numeric"),
    (lambda a, mdl, m: (_nan_gene(a), cellmnn.annotate(a, mdl)), ValueError,
     r"adata.X: 1 cells have NaN or Inf .*cell7"),
    (lambda a, mdl, m: (_rename(a), cellmnn.annotate(a, mdl)), ValueError,
     r"1 of the model's 6 features are missing from adata.X: \['g5'\]"),
    (lambda a, mdl, m: cellmnn.annotate(a[:, :4].copy(), mdl), ValueError, "missing from adata.X"),
    (lambda a, mdl, m: cellmnn.annotate(a, mdl, embedding="X_pca"), ValueError,
     "embedding 'X_pca': the model was fitted on named features"),
    (lambda a, mdl, m: cellmnn.annotate(a, mdl, times=["one", "two"]), TypeError, "times must be numbers"),
    (lambda a, mdl, m: cellmnn.annotate(a, mdl, times="1"), TypeError, "times must be a number or a sequence"),
    (lambda a, mdl, m: cellmnn.annotate(a, mdl, times=[1.0, np.nan]), ValueError, "times must be finite"),
    (lambda a, mdl, m: cellmnn.annotate(a, mdl, times=[[1.0], [2.0]]), ValueError, "times must be a number or a 1-D"),
    (lambda a, mdl, m: cellmnn.annotate(a, mdl, times=[]), ValueError, "times is empty"),
    (lambda a, mdl, m: cellmnn.annotate(a, mdl, times=[1, 1]), ValueError, "times has repeated values"),
    (lambda a, mdl, m: cellmnn.annotate(a, mdl, genes=["g0", "NOPE"]), ValueError,
     r"genes: 1 not among the model's 6 features: \['NOPE'\]"),
    (lambda a, mdl, m: cellmnn.annotate(a, mdl, genes=["g0", "g0"]), ValueError, "genes has repeated names"),
    (lambda a, mdl, m: cellmnn.annotate(a, mdl, prefix="a/b"), ValueError, "prefix must be a non-empty string"),
    (lambda a, mdl, m: cellmnn.annotate(a, mdl, copy="yes"), TypeError, "copy must be True or False"),
    (lambda a, mdl, m: cellmnn.annotate(a[:10], mdl), ValueError, "adata is a view"),
    (lambda a, mdl, m: cellmnn.annotate(a, mdl, marginals=cellmnn.load_marginals(a, n_components=2)), ValueError,
     "marginals: their transform"),
    (lambda a, mdl, m: cellmnn.annotate(a, mdl, marginals=m.data), TypeError, "marginals must be cellmnn.Marginals"),
    (lambda a, mdl, m: cellmnn.annotate(a, cellmnn.CellMNN(3)), ValueError, "model carries no data transform"),
]


@pytest.mark.parametrize("call,exc,match", ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_errors_name_the_argument_and_change_nothing(fitted, call, exc, match):
    m, model = fitted
    a = course()
    with pytest.raises(exc, match=match):
        call(a, model, m)
    for k in ("cellmnn_pred", "cellmnn_z"):
        assert k not in a.obsm
    assert "cellmnn" not in a.uns and "cellmnn_trace" not in a.obs


def test_a_bare_model_works_with_its_marginals(fitted, ad):
    m, model = fitted
    bare = cellmnn.CellMNN(model.dim, **{k: v for k, v in model.config().items() if k != "dim"})
    bare.load_state_dict(model.state_dict())
    cellmnn.annotate(ad, bare, marginals=m)
    np.testing.assert_array_equal(ad.obsm["cellmnn_pred"], model.predict(ad.obsm["cellmnn_z"], ad.obs["day"].to_numpy(),
                                                                          m.times))
    assert "fit" not in ad.uns["cellmnn"] and list(ad.uns["cellmnn"]["training_times"]) == list(m.times)


def test_an_ensemble_writes_the_mean_and_the_members_spread(fitted, ad):
    m, model = fitted
    other = cellmnn.fit(m, **{**FAST, "seed": 1})
    one, two, both = ad.copy(), ad.copy(), ad.copy()
    kw = dict(times=[1.0, 2.5], genes=GENES[:3])
    cellmnn.annotate(one, model, **kw)
    cellmnn.annotate(two, other, **kw)
    cellmnn.annotate(both, [model, other], **kw)
    each = np.stack([a.obsm["cellmnn_pred"] for a in (one, two)]).astype(np.float64)
    np.testing.assert_allclose(both.obsm["cellmnn_pred"], each.mean(axis=0), rtol=1e-6, atol=1e-6)
    spread = np.sqrt(((each - each.mean(axis=0)) ** 2).sum(axis=-1).mean(axis=0))
    np.testing.assert_allclose(both.obsm["cellmnn_pred_spread"], spread, rtol=1e-5, atol=1e-6)
    assert both.obsm["cellmnn_pred_spread"].shape == (ad.n_obs, 2) and spread.max() > 0
    # the trace is linear in A: the mean operator's trace is the mean of the members' traces
    np.testing.assert_allclose(both.obs["cellmnn_trace"], (one.obs["cellmnn_trace"] + two.obs["cellmnn_trace"]) / 2,
                               rtol=1e-6, atol=1e-9)
    w = [a.uns["cellmnn"]["interactions"]["weight"] for a in (one, two)]
    np.testing.assert_allclose(both.uns["cellmnn"]["interactions"]["weight"], (w[0] + w[1]) / 2, rtol=1e-9)
    assert both.uns["cellmnn"]["members"] == 2 and one.uns["cellmnn"]["members"] == 1
    assert "cellmnn_pred_spread" not in one.obsm and "cellmnn_pred_spread" in both.uns["cellmnn"]["keys"]["obsm"]
    cellmnn.annotate(both, model, **kw)  # re-annotated with one model: its stale spread is removed
    assert "cellmnn_pred_spread" not in both.obsm
    with pytest.raises(TypeError, match=r"model\[1\] must be a fitted CellMNN"):
        cellmnn.annotate(ad.copy(), [model, "m2"])


def test_stochastic_models_write_the_predictive_covariance(ad):
    """A learned diffusion: P_pred is the closed-form predictive mean, P_pred_cov its covariance (the
    model's own), P_pred_spread the square root of its trace; an ensemble adds its members' spread."""
    m = cellmnn.load_marginals(ad, time_key="day", n_components=3)
    fast = dict(max_epochs=2, check_every=1, patience=2, batch_size=32, verbose=False, noise="state", affine=True)
    one, two = cellmnn.fit(m, seed=0, **fast), cellmnn.fit(m, seed=1, **fast)
    out = cellmnn.annotate(ad, one, copy=True)
    z, t = out.obsm["cellmnn_z"], out.obs["day"].to_numpy(dtype=float)
    times = out.uns["cellmnn"]["pred_times"]
    mean, cov = one.predict_distribution(z, t, times)
    np.testing.assert_allclose(out.obsm["cellmnn_pred"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.obsm["cellmnn_pred_cov"], cov, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.obsm["cellmnn_pred_spread"] ** 2, np.trace(cov, axis1=-2, axis2=-1), rtol=1e-4)
    both = cellmnn.annotate(ad, [one, two], copy=True)
    m2, c2 = two.predict_distribution(z, t, times)
    between = np.einsum("nti,ntj->ntij", mean - m2, mean - m2) / 4  # each member is half the difference away
    np.testing.assert_allclose(both.obsm["cellmnn_pred_cov"], (cov + c2) / 2 + between, rtol=1e-4, atol=1e-6)
