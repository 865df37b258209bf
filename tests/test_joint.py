"""Joint training across datasets (``load_joint``, ``fit([...])``, ``leave_one_out([...])``):
the joint step is the sum of each time course's reference objective, a joint model trains the
same alone or beside other models, the dataset embedding, the shared loader, and the errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cellmnn
import cellmnn.files as cfiles
import cellmnn.model.persist as persist
from cellmnn.cli import main as cli_main
from cellmnn.data.joint import load_joint
from cellmnn.train import HParams, Member, train
from cellmnn.train.layout import Setup
from cellmnn.train.step import Runner, step_losses
from test_ensemble import batch_per_member, reference_objective

FAST = dict(max_epochs=3, check_every=1, patience=2, batch_size=32, verbose=False)


def course(times, n=40, seed=0, drift=(1.0, -0.5)):
    """A 2-d time course in raw coordinates (identity transform, so courses share one space)."""
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(0.0, 0.3, (n + 3 * k, 2)) + t * np.asarray(drift) for k, t in enumerate(times)]
    return cellmnn.load_marginals(arrays, times=list(times), standardize=False, n_components=None)


A = course((0.0, 1.0, 2.5, 4.0, 5.0))
B = course((0.0, 2.0, 3.0, 5.0), n=30, seed=1, drift=(-0.5, 1.0))


def hp(**kw):
    return HParams(**{**FAST, **kw})


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("embed", [False, True])
def test_joint_step_is_the_sum_of_each_courses_objective(embed):
    # A joint model on (A without timepoint 1, B whole) beside a model of B alone.  Float32 on
    # both sides: rtol 1e-4 covers the batched vs per-model summation orders.
    members = [Member(1, 0, hp(), dataset=0, joint="j"), Member(None, 0, hp(), dataset=1, joint="j"),
               Member(2, 3, hp(sigma=0.5), dataset=1)]
    s = Setup([A, B], members, torch.device("cpu"), embed=embed)
    assert s.model_members == [[0, 1], [2]]
    runner = Runner(s, s.flat0, False)
    L = runner.layout
    assert L.models == [0, 1] and L.shared
    step = torch.tensor(5)
    loss, _ = step_losses(s, L, runner.flat, step, exact=True)
    for e, (mem, (src, obs)) in enumerate(zip(members, batch_per_member(s, L, step))):
        mi = s.model_of[e]
        want, _ = reference_objective(s.model(mi, runner.flat[mi]), s.times, s.kept[e], mem.hp, "kept_times",
                                      s.unit, src, obs, dataset=mem.dataset if embed else None)
        torch.testing.assert_close(loss[e], want.detach(), rtol=1e-4, atol=1e-6)
    per_model = runner.step()  # the joint model's loss is the sum of its two courses' losses
    assert per_model.shape == (2,)


def test_a_joint_model_trains_the_same_alone_and_beside_others():
    joint = [Member(1, 0, hp(), dataset=0, joint=0), Member(None, 0, hp(), dataset=1, joint=0)]
    others = [Member(2, 4, hp(lr=1e-3, max_epochs=2), dataset=0), Member(1, 1, hp(), dataset=1, joint=1),
              Member(3, 1, hp(), dataset=0, joint=1)]
    alone = train([A, B], joint, embed=True)
    together = train([A, B], others + joint, embed=True)
    assert alone[0] is alone[1] and together[3] is together[4]  # one model per joint key
    torch.testing.assert_close(_flat(alone[0]), _flat(together[3]), rtol=1e-4, atol=1e-6)
    assert alone[0].fit_info.holdout == (1, None) and alone[0].fit_info.epochs == together[3].fit_info.epochs


def test_joint_fit_with_embedding_predicts_per_dataset_and_round_trips(tmp_path):
    models = cellmnn.fit([A, B], holdout=[2, None], seeds=[0, 1], dataset_embedding=True, **FAST)
    assert len(models) == 2 and models[0] is not models[1]
    m = models[0]
    assert m.n_datasets == 2 and m.mlp[0].in_features == 2 + 1 + 2
    x = A.data[0][:5].astype(np.float32)
    p0, p1 = m.predict(x, 0.0, 1.0, dataset=0), m.predict(x, 0.0, 1.0, dataset=1)
    assert not np.allclose(p0, p1)  # the learned embedding moves the operator
    assert m.marginals_info["datasets"][1]["times"] == [0.0, 2.0, 3.0, 5.0]
    persist.save_model(m, tmp_path / "m")
    back = persist.load_model(tmp_path / "m")
    np.testing.assert_array_equal(back.predict(x, 0.0, 1.0, dataset=1), p1)
    with pytest.raises(ValueError, match="pass dataset="):
        m.predict(x, 0.0, 1.0)
    with pytest.raises(ValueError, match="dataset must be an index in 0..1"):
        m.predict(x, 0.0, 1.0, dataset=2)
    plain = cellmnn.fit([A, B], **FAST)
    assert plain.n_datasets == 0 and plain.fit_info.holdout == (None, None)
    with pytest.raises(ValueError, match="only for models trained jointly"):
        plain.predict(x, 0.0, 1.0, dataset=0)


def test_joint_checkpoint_resume_is_identical(tmp_path, monkeypatch):
    kw = dict(holdout=[1, None], dataset_embedding=True, **dict(FAST, max_epochs=4))
    ref = cellmnn.fit([A, B], **kw)
    ck = tmp_path / "j.ckpt"
    real, n = cfiles.save_checkpoint, [0]

    def save(state, path):
        real(state, path)
        n[0] += 1
        if n[0] == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(cfiles, "save_checkpoint", save)
        with pytest.raises(KeyboardInterrupt):
            cellmnn.fit([A, B], checkpoint=ck, **kw)
    assert torch.equal(_flat(ref), _flat(cellmnn.fit([A, B], checkpoint=ck, **kw)))


def test_joint_leave_one_out_scores_each_dataset():
    results, models = cellmnn.leave_one_out([A, B], holdouts=[[1, 3], None], seeds=[0], report=False,
                                            return_models=True, **FAST)
    assert len(results) == 2
    assert sorted({r["holdout"] for r in results[0].rows}) == [1, 3]
    assert sorted({r["holdout"] for r in results[1].rows}) == [1, 2]  # B's interior timepoints
    assert set(models) == {(0, 1, 0), (0, 3, 0), (1, 1, 0), (1, 2, 0)}
    assert models[(1, 2, 0)].fit_info.holdout == (None, 2)
    for res in results:
        assert {r["method"] for r in res.rows} == {"Cell-MNN", "OT-interpolate"}
        assert all(np.isfinite(r["W1"]) for r in res.rows)


def _write_csv(path, times, X, names):
    with open(path, "w") as fh:
        fh.write(",".join(["time"] + names) + "\n")
        for t, row in zip(times, X):
            fh.write(",".join([repr(float(t))] + [repr(float(v)) for v in row]) + "\n")


def test_load_joint_fits_one_space_on_the_pooled_cells(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"g{i}" for i in range(6)]
    Xa, Xb = rng.normal(size=(60, 6)) @ rng.normal(size=(6, 6)), rng.normal(size=(45, 6)) + 1.0
    ta, tb = np.repeat([0.0, 1.0, 2.0], 20), np.repeat([0.0, 1.5, 3.0], 15)
    _write_csv(tmp_path / "a.csv", ta, Xa, names)
    _write_csv(tmp_path / "b.csv", tb, Xb, names)
    a, b = load_joint([str(tmp_path / "a.csv"), str(tmp_path / "b.csv")], time_key="time", n_components=3)
    assert a.transform is b.transform and a.transform.feature_names == names
    from sklearn.decomposition import PCA

    pooled = np.concatenate([Xa, Xb])
    pca = PCA(n_components=3, random_state=0).fit(pooled)
    z = (pooled - pca.mean_) @ pca.components_.T
    z = (z - z.mean(0)) / z.std(0)
    want = np.concatenate([z[:60][ta == t] for t in (0, 1, 2)] + [z[60:][tb == t] for t in (0, 1.5, 3)])
    np.testing.assert_allclose(np.concatenate(a.data + b.data), want, rtol=1e-10, atol=1e-10)
    assert list(b.times) == [0.0, 1.5, 3.0]
    cellmnn.fit([a, b], **FAST)  # they train together

    _write_csv(tmp_path / "c.csv", tb, Xb, names[:5] + ["other"])
    with pytest.raises(ValueError, match="other features"):
        load_joint([str(tmp_path / "a.csv"), str(tmp_path / "c.csv")], time_key="time")
    with pytest.raises(ValueError, match="at least two"):
        load_joint([str(tmp_path / "a.csv")])
    with pytest.raises(FileNotFoundError, match=r"sources\[1\]"):
        load_joint([str(tmp_path / "a.csv"), str(tmp_path / "missing.csv")], time_key="time")


def test_joint_errors():
    with pytest.raises(ValueError, match="at least two datasets"):
        cellmnn.fit([A], **FAST)
    C = cellmnn.load_marginals([d * 2.0 for d in A.data], times=A.times)  # z-scored: another model space
    with pytest.raises(ValueError, match="load_joint"):
        cellmnn.fit([A, C], **FAST)
    D3 = cellmnn.load_marginals([np.ones((10, 3)) * k for k in range(3)], times=[0, 1, 2], standardize=False,
                                n_components=None)
    with pytest.raises(ValueError, match="model dimensions"):
        cellmnn.fit([A, D3], **FAST)
    with pytest.raises(ValueError, match="list of 2 entries"):
        cellmnn.fit([A, B], holdout=1, **FAST)
    with pytest.raises(ValueError, match=r"holdout\[1\]"):
        cellmnn.fit([A, B], holdout=[1, 3], **FAST)  # B has 4 timepoints: 3 is not interior
    with pytest.raises(ValueError, match="needs a list of datasets"):
        cellmnn.fit(A, dataset_embedding=True, **FAST)
    with pytest.raises(TypeError, match="dataset_embedding must be True or False"):
        cellmnn.fit([A, B], dataset_embedding=1, **FAST)
    with pytest.raises(ValueError, match="not supported with joint training"):
        cellmnn.fit([A, B], select="inner", **FAST)
    with pytest.raises(ValueError, match="must share the seed and every hyperparameter"):
        train([A, B], [Member(1, 0, hp(), dataset=0, joint=0), Member(1, 0, hp(lr=1e-3), dataset=1, joint=0)])
    with pytest.raises(ValueError, match="lists a dataset twice"):
        train([A, B], [Member(1, 0, hp(), dataset=0, joint=0), Member(2, 0, hp(), dataset=0, joint=0)])


def test_annotate_and_interactions_of_a_joint_model(tmp_path):
    import anndata

    model = cellmnn.fit([A, B], holdout=[1, None], dataset_embedding=True, **FAST)
    persist.save_model(model, tmp_path / "m")
    x = np.concatenate(B.data)
    t = np.concatenate([np.full(len(d), tt) for d, tt in zip(B.data, B.times)])
    ad = anndata.AnnData(X=x.astype(np.float32))
    ad.obs["day"] = t
    for m in (model, persist.load_model(tmp_path / "m")):
        out = cellmnn.annotate(ad, m, times=[2.0], dataset=1, copy=True)
        want = model.predict(x.astype(np.float32), t, [2.0], dataset=1)
        np.testing.assert_allclose(out.obsm["cellmnn_pred"], want, rtol=1e-6, atol=1e-6)
        assert list(out.uns["cellmnn"]["fit"]["holdout"]) == [1, -1]
        out.write_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(ValueError, match="dataset"):
        cellmnn.annotate(ad, model, times=[2.0], copy=True)
    plain = cellmnn.fit([A, B], **FAST)
    with pytest.raises(ValueError, match="only for models trained jointly"):
        cellmnn.annotate(ad, plain, times=[2.0], dataset=0, copy=True)


def test_cli_fits_and_evaluates_several_datasets_in_one_space(tmp_path, capsys):
    rng = np.random.default_rng(2)
    names = ["g0", "g1", "g2"]
    ta, tb = np.repeat([0.0, 1.0, 2.0, 3.0], 25), np.repeat([0.0, 1.5, 3.0], 25)
    _write_csv(tmp_path / "a.csv", ta, rng.normal(size=(100, 3)) + ta[:, None], names)
    _write_csv(tmp_path / "b.csv", tb, rng.normal(size=(75, 3)) - tb[:, None], names)
    data = [str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]
    fast = ["--time-key", "time", "--n-components", "3", "--max-epochs", "2", "--check-every", "1",
            "--batch-size", "32", "--quiet"]
    assert cli_main(["fit", *data, "--holdout", "2", "none", "--dataset-embedding", "--out", str(tmp_path / "m"),
                     *fast]) == 0
    model = persist.load_model(tmp_path / "m")
    a, b = load_joint(data, time_key="time", n_components=3)
    assert model.n_datasets == 2 and model.transform.same_as(a.transform)
    assert model.training_info["holdout"] == [2, None]
    assert cli_main(["evaluate", *data, "--seeds", "0", "--json", str(tmp_path / "r.json"), *fast]) == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [d["source"] for d in doc["datasets"]] == [a.source, b.source]
    assert sorted({r["holdout"] for r in doc["datasets"][0]["rows"]}) == [1, 2]
    assert sorted({r["holdout"] for r in doc["datasets"][1]["rows"]}) == [1]
    for argv, message in ((["fit", *data, "--holdout", "2", "--out", str(tmp_path / "m2")], "one value per DATA"),
                          (["fit", data[0], "--dataset-embedding", "--out", str(tmp_path / "m3")], "several DATA"),
                          (["evaluate", *data, "--holdouts", "1"], "--holdouts is for one DATA")):
        assert cli_main(argv + fast) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m3").exists()
