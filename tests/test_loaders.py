"""Loaders on bad and awkward input: every problem is a ValueError/TypeError naming the argument or file
(and line/column), nothing is silently dropped, and times equal up to float rounding are one timepoint."""
from __future__ import annotations

import builtins
import warnings
from collections import Counter

import anndata
import numpy as np
import pandas as pd
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from cellmnn import Transform, load_marginals


def csv_file(tmp_path, text, name="cells.csv", encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return str(path)


# ----------------------------------------------------------------------------- CSV

def test_csv_utf8_with_bom_reads_and_latin1_is_refused(tmp_path):
    m = load_marginals(csv_file(tmp_path, "\ufefftime,x\n0,1\n1,2\n"), n_components=None)
    assert list(m.times) == [0, 1] and m.transform.feature_names == ["x"]
    path = csv_file(tmp_path, "time,x,caf\u00e9\n0,1,2\n1,2,3\n", "latin.csv", "latin-1")
    with pytest.raises(ValueError, match=r"latin\.csv is not UTF-8.*re-save it as UTF-8"):
        load_marginals(path)


def test_csv_header_without_rows(tmp_path):
    path = csv_file(tmp_path, "time,x,y\n")
    with pytest.raises(ValueError, match=r"cells\.csv: .*header but no data rows"):
        load_marginals(path)


def test_csv_non_numeric_value_names_line_column_and_value(tmp_path):
    path = csv_file(tmp_path, "time,x,y\n0,1,2\n0,1,2\n1,3,oops\n")
    with pytest.raises(ValueError, match=r"cells\.csv, line 4, column 'y': 'oops' is not a number"):
        load_marginals(path)


@pytest.mark.parametrize("missing", ["", "NA", "nan", " na "])
def test_csv_missing_values_follow_the_nonfinite_rule(tmp_path, missing):
    path = csv_file(tmp_path, f"time,x,y\n0,1,2\n0,{missing},2\n1,3,4\n1,5,6\n")
    with pytest.raises(ValueError, match=r"1 rows contain NaN or Inf \(t=0: 1\)"):
        load_marginals(path)
    with pytest.warns(UserWarning, match="dropped 1 rows"):
        m = load_marginals(path, drop_nonfinite=True)
    assert m.sizes == [1, 2] and m.dropped == {0.0: 1}


def test_csv_ragged_row_names_the_line(tmp_path):
    path = csv_file(tmp_path, "time,x,y\n0,1,2\n1,3\n")
    with pytest.raises(ValueError, match=r"line 3: 2 fields but the header has 3 columns"):
        load_marginals(path)


@pytest.mark.parametrize("header,match", [
    ("time,x,time", r"time column 'time' appears 2 times"),
    ("time,x,y,x", r"duplicate column names \['x'\]"),
    ("time,x,,y", r"header column 3 has no name"),
])
def test_csv_header_problems(tmp_path, header, match):
    path = csv_file(tmp_path, header + "\n" + "\n".join(",".join("1" * (header.count(",") + 1)) for _ in range(2)))
    with pytest.raises(ValueError, match=match):
        load_marginals(path)


# ----------------------------------------------------------------------------- paths

def test_directory_and_unreadable_file(tmp_path, monkeypatch):
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(ValueError, match=r"folder\.csv is a directory; expected a \.h5ad, \.npz or \.csv file"):
        load_marginals(str(tmp_path / "folder.csv"))
    path = csv_file(tmp_path, "time,x\n0,1\n")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(builtins, "open", refuse)
    with pytest.raises(PermissionError, match=r"cannot read .*cells\.csv: permission denied"):
        load_marginals(path)


# ----------------------------------------------------------------------------- npz

def test_npz_corrupt_object_and_string_arrays(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(np.random.default_rng(0).bytes(200))
    with pytest.raises(ValueError, match=r"bad\.npz is not a valid \.npz file"):
        load_marginals(str(bad))
    np.save(tmp_path / "one.npy", np.ones((3, 3)))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(ValueError, match=r"one\.npz is not a valid \.npz file \(a single \.npy array"):
        load_marginals(str(tmp_path / "one.npz"))
    obj = tmp_path / "obj.npz"
    np.savez(obj, pcs=np.array([[1.0], ["a"], [None]], dtype=object), sample_labels=np.arange(3))
    with pytest.raises(ValueError, match=r"obj\.npz: its arrays must be numeric, not Python objects"):
        load_marginals(str(obj))
    txt = tmp_path / "txt.npz"
    np.savez(txt, pcs=np.array([["1", "2"], ["3", "4"]]), sample_labels=np.arange(2))
    with pytest.raises(ValueError, match=r"txt\.npz\['pcs'\] must be numeric"):
        load_marginals(str(txt))


# ----------------------------------------------------------------------------- h5ad / AnnData

def test_h5ad_corrupt_file(tmp_path):
    path = tmp_path / "bad.h5ad"
    path.write_bytes(b"not an hdf5 file" * 10)
    with pytest.raises(ValueError, match=r"cannot read .*bad\.h5ad as \.h5ad: "):
        load_marginals(str(path))


def test_anndata_duplicate_var_names():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = anndata.AnnData(np.ones((4, 3)), var=pd.DataFrame(index=["g1", "g2", "g1"]))
    ad.obs["day"] = [0, 0, 1, 1]
    with pytest.raises(ValueError, match=r"duplicate var_names \['g1'\].*var_names_make_unique"):
        load_marginals(ad, n_components=None)


@pytest.mark.parametrize("times,ok", [
    (["1.5", "1.5", "2", "2"], True),
    (pd.Categorical([1.5, 1.5, 2.0, 2.0]), True),
    (pd.Categorical(["1.5", "1.5", "2", "2"]), True),
    (pd.array(["1.5", "1.5", "2", "2"], dtype="string"), True),
    (pd.Categorical(["day1", "day1", "day2", "day2"]), False),
    (pd.array(["day1", "day1", "day2", "day2"], dtype="string"), False),
])
def test_anndata_time_encodings(times, ok):
    ad = anndata.AnnData(np.arange(8, dtype=np.float64).reshape(4, 2))
    ad.obs["day"] = times
    if ok:
        assert list(load_marginals(ad, n_components=None).times) == [1.5, 2.0]
    else:
        with pytest.raises(ValueError, match=r"obs\['day'\] must be numeric.*day1"):
            load_marginals(ad, n_components=None)


def test_anndata_missing_time_is_a_non_finite_time_not_a_type_error():
    ad = anndata.AnnData(np.ones((4, 2)))
    ad.obs["day"] = pd.array(["1", None, "2", "2"], dtype="string")
    with pytest.raises(ValueError, match="1 cells have a non-finite time"):
        load_marginals(ad, n_components=None)


# ----------------------------------------------------------------------------- arrays and arguments

@pytest.mark.parametrize("make,exc,match", [
    (lambda: load_marginals([], times=[]), ValueError, "source is an empty list"),
    (lambda: load_marginals([np.ones((2, 2)), np.array([["a", "b"]])], times=[0, 1]), ValueError,
     "array 1 must be numeric"),
    (lambda: load_marginals([np.ones((2, 2)), np.array([[object(), 1]])], times=[0, 1]), ValueError,
     "array 1 must be numeric"),
    (lambda: load_marginals([np.ones((2, 2)), np.ones((2, 2))], times=[0, np.nan]), ValueError, "times must be finite"),
    (lambda: load_marginals([np.ones((2, 2)), np.ones((2, 2))], times=[0, "1"]), ValueError,
     "times must be a list of numbers"),
    (lambda: load_marginals(None, time_key=3), TypeError, "time_key must be a string"),
    (lambda: load_marginals(None, embedding=["X_pca"]), TypeError, "embedding must be a string"),
    (lambda: load_marginals(None, standardize="yes"), TypeError, "standardize must be True or False"),
    (lambda: load_marginals(None, drop_nonfinite=1), TypeError, "drop_nonfinite must be True or False"),
    (lambda: load_marginals(None, n_components="5"), ValueError, "n_components must be a positive integer"),
])
def test_argument_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


# ----------------------------------------------------------------------------- times up to rounding

def test_times_equal_up_to_rounding_are_one_timepoint():
    a = np.ones((2, 1))
    with pytest.warns(UserWarning, match=r"0\.30000000000000004.*-> 0\.3\b"):
        m = load_marginals([a, np.ones((3, 1)), a], times=[0.1 * 3, 0.3, 1.0], n_components=None)
    assert list(m.times) == [0.3, 1.0] and m.sizes == [5, 2]
    with pytest.warns(UserWarning, match=r"-> 0\.30000000000000004"):  # the more frequent value is kept
        m = load_marginals([np.ones((3, 1)), a], times=[0.1 * 3, 0.3], n_components=None)
    assert list(m.times) == [0.1 * 3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for times in ([1e-6, 2e-6], [0.0, 1e-300], [1e12, 1e12 + 1e4]):  # distinct at any time unit
            assert len(load_marginals([a, a], times=times, n_components=None)) == 2


def test_close_times_chain_and_ties_keep_the_smallest():
    a = np.ones((1, 1))
    t0 = 1.0
    t1, t2 = np.nextafter(t0, 2), np.nextafter(np.nextafter(t0, 2), 2)
    with pytest.warns(UserWarning):
        m = load_marginals([a, a, a], times=[t2, t1, t0], n_components=None)
    assert list(m.times) == [1.0] and m.sizes == [3]


# ----------------------------------------------------------------------------- Transform

GOOD = dict(mean=[0.0, 1.0], std=[1.0, 2.0], pca_components=[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
            pca_mean=[0.0, 0.0, 0.0], feature_names=["a", "b", "c"])


@pytest.mark.parametrize("change,match", [
    (dict(std=[1.0, 0.0]), "transform std has 1 zero or non-finite entries"),
    (dict(std=[np.nan, np.inf]), "transform std has 2 zero or non-finite entries"),
    (dict(mean=[0.0, np.inf]), "transform mean has 1 non-finite"),
    (dict(std=[1.0]), "transform std must have the length of mean"),
    (dict(pca_components=[[1.0, 0.0, 0.0]]), "transform pca_components must be"),
    (dict(pca_mean=[0.0, 0.0]), "transform pca_components must be"),
    (dict(pca_mean=[0.0, np.nan, 0.0]), "transform pca_mean has 1 non-finite"),
    (dict(pca_mean=None), "both be given"),
    (dict(feature_names=["a", "b"]), "feature_names has 2 names for 3 features"),
    (dict(feature_names=["a", "b", "a"]), r"feature_names has duplicates: \['a'\]"),
    (dict(feature_names=["a", "b", 3]), "feature_names must be a list of strings"),
    (dict(mean=None), "transform has no mean"),
])
def test_transform_from_dict_validates(change, match):
    assert Transform.from_dict(GOOD).n_features == 3
    with pytest.raises(ValueError, match=match):
        Transform.from_dict({**GOOD, **change})


def test_transform_align():
    tr = Transform.from_dict(GOOD)
    x = np.arange(8.0).reshape(2, 4)
    np.testing.assert_array_equal(tr.align(x, ["c", "z", "a", "b"]), x[:, [2, 3, 0]])
    with pytest.raises(ValueError, match=r"1 of the model's 3 features are missing from DATA: \['c'\]"):
        tr.align(x, ["a", "b", "y", "z"], "DATA")
    with pytest.raises(ValueError, match=r"duplicate feature names: \['a'\]"):
        tr.align(x, ["a", "b", "c", "a"])
    with pytest.raises(ValueError, match=r"the data has 4 features; the model was fitted on 3.*no feature names"):
        tr.align(x)
    np.testing.assert_array_equal(tr.align(x[:, :3]), x[:, :3])
    unnamed = Transform([0.0, 0.0], [1.0, 1.0])
    np.testing.assert_array_equal(unnamed.align(x[:, :2], ["q", "r"]), x[:, :2])
    with pytest.raises(ValueError, match="must be numeric"):
        unnamed.align([["a", "b"]])
    with pytest.raises(ValueError, match="2-D"):
        unnamed.align([1.0, 2.0])


# ----------------------------------------------------------------------------- property: loaders vs an oracle

class Invalid(Exception):
    pass


def oracle(x, t, drop, standardize):
    """Expected (times, data per timepoint, dropped) from float64 features ``x`` and times ``t``; Invalid if bad."""
    if len(x) == 0 or not np.isfinite(t).all():
        raise Invalid
    count, rep, groups = Counter(t.tolist()), {}, []
    for v in sorted(count):
        if groups and v - groups[-1][-1] <= 1e-9 * max(abs(v), abs(groups[-1][-1])):
            groups[-1].append(v)
        else:
            groups.append([v])
    for g in groups:
        best = max(g, key=lambda v: (count[v], -v))
        rep.update({v: best for v in g})
    t = np.array([rep[v] for v in t.tolist()])
    ok = np.isfinite(x).all(axis=1)
    dropped = dict(Counter(t[~ok].tolist()))
    if not ok.all() and (not drop or set(t[ok].tolist()) != set(t.tolist())):
        raise Invalid
    x, t = x[ok], t[ok]
    if standardize:
        std = x.std(axis=0)
        x = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
    times = sorted(set(t.tolist()))
    return times, [x[t == v] for v in times], dropped


def check(load, expect):
    """Either both fail (the loader with ValueError/TypeError) or both agree to float64 precision."""
    try:
        expected = expect()
    except Invalid:
        expected = None
    event("invalid input" if expected is None else "valid input")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if expected is None:
            with pytest.raises((ValueError, TypeError)):
                load()
            return
        m = load()
    times, data, dropped = expected
    assert list(m.times) == times and m.dropped == dropped
    for got, want in zip(m.data, data, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def rare(common, special, one_in=12):
    """``special`` about once in ``one_in`` draws, else ``common``: most generated inputs stay valid."""
    return st.integers(1, one_in).flatmap(lambda i: special if i == 1 else common)


ROUNDING = ["0.3", repr(0.1 * 3), "1", "1.0000000000000002", "1e-300", "0", "1e-6", "2e-6", " 1.5 "]
TIME_TEXT = rare(st.one_of(st.integers(-3, 5).map(str), st.floats(-1e3, 1e3).map(repr), st.sampled_from(ROUNDING)),
                 st.sampled_from(["day1", "", "NA"]), one_in=40)
VALUE_TEXT = rare(st.one_of(st.floats(-1e6, 1e6).map(repr), st.integers(-100, 100).map(str), st.just(" 2 ")),
                  st.sampled_from(["nan", "inf", "-inf", "", "NA", " Na ", "abc"]), one_in=25)


@st.composite
def csv_tables(draw):
    """A header (names possibly duplicated or empty, the time column anywhere) and rows of text fields."""
    feats = draw(rare(st.lists(st.sampled_from(["a", "b", "x y", "g"]), min_size=1, max_size=4, unique=True),
                      st.lists(st.sampled_from(["a", "b", "time", " "]), min_size=1, max_size=4), one_in=6))
    pos = draw(st.integers(0, len(feats)))
    header = feats[:pos] + ["time"] + feats[pos:]
    rows = []
    for _ in range(draw(st.integers(0, 12))):
        row = [draw(VALUE_TEXT) for _ in feats]
        row.insert(pos, draw(TIME_TEXT))
        if draw(st.integers(0, 40)) == 0:
            row = row[:-1] if draw(st.booleans()) else row + ["1"]
        rows.append(row)
    return header, rows


def csv_oracle(header, rows, drop, standardize):
    names = [h.strip() for h in header]
    if "" in names or len(set(names)) < len(names):
        raise Invalid
    rows = [r for r in rows if ",".join(r) != ""]  # blank lines are skipped
    if any(len(r) != len(names) for r in rows):
        raise Invalid

    def num(s):
        if s.strip().lower() in ("", "na", "nan"):
            return np.nan
        try:
            return float(s)
        except ValueError:
            raise Invalid from None

    table = np.array([[num(s) for s in r] for r in rows], dtype=np.float64).reshape(len(rows), len(names))
    ti = names.index("time")
    return oracle(np.delete(table, ti, axis=1), table[:, ti], drop, standardize)


@given(table=csv_tables(), drop=st.booleans(), standardize=st.booleans())
def test_csv_loader_matches_oracle(tmp_path_factory, table, drop, standardize):
    header, rows = table
    path = tmp_path_factory.mktemp("csv") / "t.csv"
    path.write_text("\n".join([",".join(header)] + [",".join(r) for r in rows]) + "\n", encoding="utf-8")
    check(lambda: load_marginals(str(path), n_components=None, drop_nonfinite=drop, standardize=standardize),
          lambda: csv_oracle(header, rows, drop, standardize))


TIME_VALUES = rare(st.sampled_from([0, 1, 2.5, 0.3, 0.1 * 3, 1e-6, 2e-6, -1.0]), st.sampled_from([np.nan, "day1"]), 40)


@st.composite
def adatas(draw):
    """An AnnData with a time column in obs["day"] in one of several encodings; X float32/float64/int."""
    n, F = draw(st.integers(0, 12)), draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.int64]))
    value = st.integers(-100, 100) if dtype is np.int64 else rare(
        st.floats(-1e6, 1e6, width=32 if dtype is np.float32 else 64), st.sampled_from([np.nan, np.inf]), 25)
    X = np.array([draw(value) for _ in range(n * F)], dtype=dtype).reshape(n, F)
    names = draw(rare(st.lists(st.sampled_from(["g1", "g2", "g3", "g4"]), min_size=F, max_size=F, unique=True),
                      st.lists(st.sampled_from(["g1", "g2"]), min_size=F, max_size=F), 6))
    times = [draw(TIME_VALUES) for _ in range(n)]
    kind = draw(st.sampled_from(["plain", "text", "categorical", "categorical_text", "string"]))
    text = [repr(float(v)) if not isinstance(v, str) else v for v in times]
    column = {"plain": lambda: np.array(times, dtype=object if "day1" in times else float),
              "text": lambda: np.array(text, dtype=object),
              "categorical": lambda: pd.Categorical(times if "day1" in times else [float(v) for v in times]),
              "categorical_text": lambda: pd.Categorical(text),
              "string": lambda: pd.array(text, dtype="string")}[kind]()
    obs = pd.DataFrame({"day": column}, index=[f"c{i}" for i in range(n)])
    if draw(st.booleans()) and dtype is not np.int64:
        import scipy.sparse

        X = scipy.sparse.csr_matrix(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = anndata.AnnData(X, obs=obs, var=pd.DataFrame(index=names))
    return ad, times, names


def adata_oracle(ad, times, names, drop, standardize):
    if len(set(names)) < len(names):
        raise Invalid
    try:
        t = np.array([float(v) for v in times], dtype=np.float64)
    except ValueError:
        raise Invalid from None
    X = ad.X.toarray() if hasattr(ad.X, "toarray") else ad.X
    return oracle(np.asarray(X, dtype=np.float64), t, drop, standardize)


@given(data=adatas(), drop=st.booleans(), standardize=st.booleans(), key=st.sampled_from([None, "day"]))
def test_anndata_loader_matches_oracle(data, drop, standardize, key):
    ad, times, names = data
    check(lambda: load_marginals(ad, time_key=key, embedding=None, n_components=None, drop_nonfinite=drop,
                                 standardize=standardize),
          lambda: adata_oracle(ad, times, names, drop, standardize))

