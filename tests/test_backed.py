"""load_marginals(..., backed=True): a .h5ad read in row chunks from the file gives the in-memory
loader's marginals and transform, refuses what it cannot do by name, and never reads X or a wide
embedding whole."""
from __future__ import annotations

import os
import tempfile
import warnings

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

import cellmnn.data.backed
from cellmnn import load_marginals


def write(path, X=None, times=None, obsm=None, var_names=None, time_key="day", obs=None):
    n = len(times) if times is not None else X.shape[0]
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n)]) if obs is None else obs
    if times is not None:
        obs[time_key] = times
    ad = anndata.AnnData(X=X, obs=obs, obsm=obsm or {})
    if var_names is not None:
        ad.var_names = var_names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata: non-unique var names, string columns to categoricals
        ad.write_h5ad(path)
    return str(path)


def course(rng, n, G, days=(0.0, 1.0, 2.5)):
    X = rng.normal(size=(n, G)) * rng.uniform(0.5, 3.0, G) + rng.normal(0, 5, G)
    return X, np.resize(np.asarray(days, dtype=np.float64), n)


def assert_same(backed, memory):
    assert np.array_equal(backed.times, memory.times) and backed.sizes == memory.sizes
    assert backed.dropped == memory.dropped
    for b, m in zip(backed.data, memory.data):
        np.testing.assert_allclose(b, m, rtol=1e-10, atol=1e-10)
    tb, tm = backed.transform, memory.transform
    assert tb.feature_names == tm.feature_names
    for name in ("mean", "std", "pca_components", "pca_mean"):
        a, b = getattr(tb, name), getattr(tm, name)
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=name)
    assert backed.source == memory.source + " (backed)"


def both(path, **kw):
    """(backed, in-memory) results, or the two exceptions' (type, message)."""
    out = []
    for backed in (True, False):
        try:
            out.append(load_marginals(path, backed=backed, **kw))
        except Exception as exc:  # noqa: BLE001 - compared below
            out.append((type(exc), str(exc)))
    return out


@pytest.fixture
def chunk7(monkeypatch):
    monkeypatch.setattr(cellmnn.data.backed, "CHUNK_ROWS", 7)


# ----------------------------------------------------------------------------- equal to in memory

@pytest.mark.parametrize("chunk", [7, None])
def test_obsm_embedding_keeps_the_first_columns(tmp_path, monkeypatch, chunk):
    if chunk:
        monkeypatch.setattr(cellmnn.data.backed, "CHUNK_ROWS", chunk)
    rng = np.random.default_rng(0)
    X, t = course(rng, 93, 4)  # 93 = 13 chunks of 7 and a last one of 2
    path = write(tmp_path / "e.h5ad", X.astype(np.float32), t, {"X_pca": rng.normal(size=(93, 8)).astype(np.float32)})
    b, m = both(path, embedding="X_pca", n_components=3)
    assert_same(b, m)
    assert b.dim == 3 and b.source.endswith("obsm['X_pca'] (backed)")
    for kw in (dict(n_components=None), dict(n_components=20), dict(standardize=False)):
        assert_same(*both(path, embedding="X_pca", **kw))


@pytest.mark.parametrize("n,G", [(300, 12), (60, 25), (40, 3)])  # sklearn's covariance and full-SVD solvers
@pytest.mark.parametrize("sparse", [False, True])
def test_pca_of_x_dense_and_csr(tmp_path, chunk7, n, G, sparse):
    rng = np.random.default_rng(n + G)
    X, t = course(rng, n, G)
    if sparse:
        X[rng.random(X.shape) < 0.6] = 0.0
        X = sp.csr_matrix(X.astype(np.float32))
    else:
        X = X.astype(np.float32)
    path = write(tmp_path / "x.h5ad", X, t, var_names=[f"g{j}" for j in range(G)])
    for k in (2, 5):
        b, m = both(path, n_components=k)
        assert_same(b, m)
        assert b.transform.feature_names == [f"g{j}" for j in range(G)] and b.source.endswith("X (PCA) (backed)")
    assert_same(*both(path, n_components=None))  # no PCA: X itself is the model space


def test_default_chunk_size_and_float64_x(tmp_path):
    rng = np.random.default_rng(3)
    X, t = course(rng, 500, 10, days=(0, 3, 7, 14))
    path = write(tmp_path / "x.h5ad", X, t)
    assert_same(*both(path, n_components=4))


@given(n=st.integers(2, 40), G=st.integers(1, 9), k=st.integers(1, 6), chunk=st.integers(1, 12),
       sparse=st.booleans(), seed=st.integers(0, 2**16))
def test_backed_pca_equals_in_memory_property(n, G, k, chunk, sparse, seed):
    rng = np.random.default_rng(seed)
    X, t = course(rng, n, G, days=(1.0, 2.0))
    X = X.astype(np.float32)
    if sparse:
        X[rng.random(X.shape) < 0.5] = 0.0
        X = sp.csr_matrix(X)
    old = cellmnn.data.backed.CHUNK_ROWS
    cellmnn.data.backed.CHUNK_ROWS = chunk
    try:
        with tempfile.TemporaryDirectory() as d:
            b, m = both(write(os.path.join(d, "p.h5ad"), X, t), n_components=k)
    finally:
        cellmnn.data.backed.CHUNK_ROWS = old
    if isinstance(m, tuple):
        assert b == m
        return
    if min(k, G) >= n - 1:  # rank-deficient: the last components are not unique, compare the rest
        return
    assert_same(b, m)


# ----------------------------------------------------------------------------- NaN, times

@pytest.mark.parametrize("embedding", [None, "X_pca"])
def test_nonfinite_rows_error_and_drop_as_in_memory(tmp_path, chunk7, embedding):
    rng = np.random.default_rng(4)
    X, t = course(rng, 50, 6)
    E = rng.normal(size=(50, 6))
    for i, v in ((0, np.nan), (6, np.inf), (7, np.nan), (49, -np.inf)):  # chunk edges, the last row
        X[i, i % 6] = v
        E[i, i % 6] = v
    path = write(tmp_path / "n.h5ad", X, t, {"X_pca": E})
    b, m = both(path, embedding=embedding, n_components=3)
    assert b == m and b[0] is ValueError and "4 rows contain NaN or Inf" in b[1]
    with warnings.catch_warnings(record=True) as wb:
        warnings.simplefilter("always")
        b = load_marginals(path, embedding=embedding, n_components=3, drop_nonfinite=True, backed=True)
    with warnings.catch_warnings(record=True) as wm:
        warnings.simplefilter("always")
        m = load_marginals(path, embedding=embedding, n_components=3, drop_nonfinite=True)
    assert_same(b, m)
    assert sum(b.sizes) == 46 and b.dropped
    assert [str(w.message) for w in wb] == [str(w.message) for w in wm] and len(wb) == 1
    assert wb[0].filename == wm[0].filename == __file__  # the warning points at the caller


def test_nonfinite_times_and_emptied_timepoint(tmp_path):
    rng = np.random.default_rng(5)
    X, t = course(rng, 20, 4)
    t[3] = np.nan
    path = write(tmp_path / "t.h5ad", X, t)
    b, m = both(path)
    assert b == m and "1 cells have a non-finite time" in b[1]
    X, t = course(rng, 20, 4, days=(0.0, 1.0))
    X[t == 1.0, 0] = np.nan
    path = write(tmp_path / "e.h5ad", X, t)
    b, m = both(path, drop_nonfinite=True)
    assert b == m and "have no cells left" in b[1]


@pytest.mark.parametrize("kind", ["categorical", "string", "int"])
def test_time_column_types(tmp_path, chunk7, kind):
    rng = np.random.default_rng(6)
    X, t = course(rng, 45, 5, days=(0.0, 1.5, 12.0))
    times = {"categorical": pd.Categorical([f"{v:g}" for v in t]), "string": [f"{v:g}" for v in t],
             "int": (t * 2).astype(np.int64)}[kind]
    path = write(tmp_path / "c.h5ad", X, times, {"X_pca": X[:, :4]}, time_key="timepoint")
    for kw in (dict(embedding="X_pca"), dict(n_components=2)):
        assert_same(*both(path, **kw))  # "timepoint" found by the default key search


def test_close_times_merge_with_the_same_warning(tmp_path):
    rng = np.random.default_rng(7)
    X, t = course(rng, 30, 4)
    t[:5] = t[:5] * (1 + 1e-12)
    path = write(tmp_path / "m.h5ad", X, t)
    with pytest.warns(UserWarning, match="times equal up to float rounding") as wb:
        b = load_marginals(path, n_components=2, backed=True)
    with pytest.warns(UserWarning, match="times equal up to float rounding") as wm:
        m = load_marginals(path, n_components=2)
    assert_same(b, m)
    assert [str(w.message) for w in wb] == [str(w.message) for w in wm] and wb[0].filename == __file__


# ----------------------------------------------------------------------------- refusals

def test_backed_applies_to_h5ad_paths_only(tmp_path):
    csv = tmp_path / "c.csv"
    csv.write_text("time,x\n0,1\n1,2\n")
    np.savez(tmp_path / "e.npz", pcs=np.ones((4, 2)), sample_labels=[0, 0, 1, 1])
    ad = anndata.AnnData(np.ones((4, 2)), obs=pd.DataFrame({"day": [0, 0, 1, 1]}, index=list("abcd")))
    for source in (str(csv), tmp_path / "e.npz", [np.ones((3, 2))], ad, None):
        with pytest.raises(ValueError, match=r"backed=True applies to \.h5ad paths only"):
            load_marginals(source, backed=True)
    for bad in ("yes", 1, None):
        with pytest.raises(TypeError, match=r"backed must be True or False, got"):
            load_marginals(str(csv), backed=bad)
    with pytest.raises(FileNotFoundError):
        load_marginals(str(tmp_path / "missing.h5ad"), backed=True)


def test_missing_keys_and_names_as_in_memory(tmp_path):
    rng = np.random.default_rng(8)
    X, t = course(rng, 20, 4)
    path = write(tmp_path / "k.h5ad", X, t, {"X_umap": X[:, :2]}, var_names=["a", "b", "a", "c"])
    cases = [dict(embedding="X_pca"), dict(time_key="stage"), dict()]  # the last: duplicate var_names
    for kw in cases:
        b, m = both(path, **kw)
        assert b == m and b[0] is ValueError, (kw, b, m)
    obs = pd.DataFrame({"batch": ["x"] * 20}, index=[str(i) for i in range(20)])
    nokey = write(tmp_path / "nokey.h5ad", X, obs=obs)
    b, m = both(nokey)
    assert b == m and "no time column found in obs" in b[1]
    bad = tmp_path / "bad.h5ad"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match=r"cannot read .*bad\.h5ad as \.h5ad: "):
        load_marginals(str(bad), backed=True)


def test_csc_x_and_too_many_genes_are_refused_by_name(tmp_path, monkeypatch):
    rng = np.random.default_rng(9)
    X, t = course(rng, 20, 6)
    csc = write(tmp_path / "csc.h5ad", sp.csc_matrix(X), t)
    with pytest.raises(ValueError, match=r"X is stored as csc_matrix; backed=True reads X by rows"):
        load_marginals(csc, backed=True)
    path = write(tmp_path / "wide.h5ad", X, t)
    monkeypatch.setattr(cellmnn.data.backed, "COV_BYTES", 8 * 5 * 5)
    with pytest.raises(ValueError, match=r"backed=True computes the PCA of X from a 6 x 6 covariance .*6 genes.*"
                                         r"pass embedding="):
        load_marginals(path, backed=True)
    assert load_marginals(path, backed=True, embedding=None, n_components=None).dim == 6  # no PCA, no covariance


def test_file_is_closed_after_success_and_error(tmp_path):
    rng = np.random.default_rng(10)
    X, t = course(rng, 20, 4)
    X[0, 0] = np.nan
    path = write(tmp_path / "f.h5ad", X, t)
    with pytest.raises(ValueError, match="rows contain NaN"):
        load_marginals(path, backed=True)
    with h5py.File(path, "a"):  # HDF5 refuses to reopen a file for writing while it is still open
        pass
    load_marginals(path, backed=True, drop_nonfinite=True)
    with h5py.File(path, "a"):
        pass


# ----------------------------------------------------------------------------- what is read

@pytest.fixture
def reads(monkeypatch):
    """Every h5py dataset read as (dataset name, rows, columns of the result)."""
    seen = []
    original = h5py.Dataset.__getitem__

    def getitem(self, args, *rest, **kw):
        out = original(self, args, *rest, **kw)
        shape = np.shape(out)
        seen.append((self.name, shape[0] if shape else 1, shape[1] if len(shape) > 1 else 1))
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", getitem)
    return seen


def test_embedding_reads_never_touch_x_and_come_in_chunks(tmp_path, chunk7, reads):
    rng = np.random.default_rng(11)
    X, t = course(rng, 60, 30)
    path = write(tmp_path / "r.h5ad", X, t, {"X_pca": rng.normal(size=(60, 20))})
    load_marginals(path, embedding="X_pca", n_components=3, backed=True)
    assert not [r for r in reads if r[0].startswith("/X")]
    emb = [r for r in reads if r[0] == "/obsm/X_pca"]
    assert len(emb) == 9 and sum(r[1] for r in emb) == 60  # 8 chunks of 7 and one of 4
    assert max(r[1] for r in emb) == 7 and max(r[2] for r in emb) == 3  # never more rows or columns than that


def test_pca_reads_x_a_chunk_at_a_time(tmp_path, chunk7, reads):
    rng = np.random.default_rng(12)
    X, t = course(rng, 60, 30)
    path = write(tmp_path / "r.h5ad", X, t)
    load_marginals(path, n_components=3, backed=True)
    xr = [r for r in reads if r[0] == "/X"]
    assert sum(r[1] for r in xr) == 120 and max(r[1] for r in xr) == 7  # two passes over 60 rows, 7 at a time


def test_sparse_x_is_read_a_chunk_at_a_time(tmp_path, chunk7, monkeypatch):
    rng = np.random.default_rng(13)
    X, t = course(rng, 60, 30)
    X[rng.random(X.shape) < 0.7] = 0
    path = write(tmp_path / "s.h5ad", sp.csr_matrix(X), t)
    seen, original = [], cellmnn.data.backed._read_rows

    def read_rows(elem, start, stop, ncols=None):
        out = original(elem, start, stop, ncols)
        seen.append(len(out))
        return out

    monkeypatch.setattr(cellmnn.data.backed, "_read_rows", read_rows)
    m = load_marginals(path, n_components=3, backed=True)
    assert sum(seen) == 120 and max(seen) == 7
    monkeypatch.undo()
    assert_same(m, load_marginals(path, n_components=3))


def test_wide_x_chunks_shrink_to_the_byte_cap(monkeypatch):
    monkeypatch.setattr(cellmnn.data.backed, "CHUNK_BYTES", 8 * 100)
    assert cellmnn.data.backed._chunks(25, 10) == [(0, 10), (10, 20), (20, 25)]
    assert cellmnn.data.backed._chunks(3, 1000) == [(0, 1), (1, 2), (2, 3)]
    assert cellmnn.data.backed._chunks(0, 10) == []


def test_cli_fit_reads_backed(tmp_path):
    """`cellmnn fit FILE.h5ad --backed` trains on the chunked read and saves the same transform as
    the in-memory loader."""
    from cellmnn.cli import main
    from cellmnn.model.persist import load_model

    rng = np.random.default_rng(3)
    X, t = course(rng, 90, 8)
    path = write(tmp_path / "a.h5ad", X=X.astype(np.float32), times=t)
    flags = ["--time-key", "day", "--n-components", "3", "--max-epochs", "1", "--backend", "torch", "--quiet"]
    assert main(["fit", path, "--backed", *flags, "--out", str(tmp_path / "m")]) == 0
    saved = load_model(tmp_path / "m").marginals_info
    memory = load_marginals(path, time_key="day", n_components=3)
    assert "(backed)" in saved["source"]
    np.testing.assert_allclose(saved["transform"]["mean"], memory.transform.mean, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.abs(saved["transform"]["pca_components"]), np.abs(memory.transform.pca_components),
                               rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("n_cells", [3, 4])
def test_components_without_variance_are_dropped_not_fabricated(tmp_path, n_cells):
    # n cells span at most n - 1 centred dimensions: with n_components = 5 the PCA's last
    # components are rounding noise (std ~1e-16), which z-scoring would turn into unit-variance
    # coordinates.  They are dropped with a warning saying how many and why, in memory and backed.
    rng = np.random.default_rng(0)
    X, t = course(rng, n_cells, 12, days=(0.0, 1.0))
    path = write(tmp_path / "tiny.h5ad", X=X, times=t)
    kept = min(5, n_cells - 1)
    for backed in (False, True):
        with pytest.warns(UserWarning, match=rf"{min(5, n_cells) - kept} of {min(5, n_cells)} PCA components "
                                             r"have no variance .* model space has \d dimensions"):
            m = load_marginals(path, n_components=5, backed=backed)
        assert m.dim == kept and m.transform.pca_components.shape == (kept, 12)
        z = np.concatenate(m.data)
        np.testing.assert_allclose(z.std(axis=0), 1.0, rtol=1e-6)  # every coordinate carries real variance
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same(*both(path, n_components=5))


def test_constant_features_are_not_scaled_into_noise(tmp_path):
    # A raw feature that is constant up to rounding (std 1e-17 around 1e3) must not become a
    # unit-variance column: it is left unscaled, with a warning naming it.
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=(30, 2)), 1e3 + 1e-13 * rng.normal(size=(30, 1))], axis=1)
    with pytest.warns(UserWarning, match=r"1 of 3 features are constant .*\['c'\]"):
        m = _load_csv(tmp_path, x)
    z = np.concatenate(m.data)
    assert np.abs(z[:, 2]).max() < 1e-9 and np.allclose(z[:, :2].std(axis=0), 1.0)
    with pytest.raises(ValueError, match="cells are all the same"):
        load_marginals(write(tmp_path / "same.h5ad", X=np.ones((6, 8)), times=np.repeat([0.0, 1.0], 3)))


def _load_csv(tmp_path, x):
    path = tmp_path / "cells.csv"
    rows = ["time,a,b,c"] + [f"{float(i >= 15)},{r[0]:.17g},{r[1]:.17g},{r[2]:.17g}" for i, r in enumerate(x)]
    path.write_text("\n".join(rows) + "\n")
    return load_marginals(str(path))
