"""Gene interactions: the gene-space mapping, aggregation, TRRUST validation, ground-truth scores,
the network simulators and the CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import cellmnn
from cellmnn.cli import main as cli_main
from cellmnn.analysis.grn import krumsiek_network, linear_system, sample_linear, simulate_krumsiek

GENES = [f"G{i}" for i in range(8)]


@pytest.fixture(scope="module")
def adata_marginals():
    import anndata

    rng = np.random.default_rng(0)
    mix = rng.normal(size=(8, 8))
    X = np.concatenate([rng.normal(size=(40, 8)) @ mix + t for t in range(3)]).astype(np.float32)
    ad = anndata.AnnData(X)
    ad.var_names = GENES
    ad.obs["day"] = np.repeat([0.0, 1.0, 2.0], 40)
    return ad, cellmnn.load_marginals(ad, n_components=3)


@pytest.fixture(scope="module")
def model(adata_marginals):
    torch.manual_seed(0)
    return cellmnn.CellMNN(3, width=16, depth=2, init_scale=0.5).double()


def test_weights_add_up_to_the_gene_space_velocity_of_the_decoded_trajectory(adata_marginals, model):
    # sum_j w_{j->i} = d/dt of the decoded trajectory mapped back to genes (finite differences).
    _, m = adata_marginals
    res = cellmnn.gene_interactions(model, m, genes=GENES, cells=[1], aggregate=None)
    W = res.values.reshape(-1, 8, 8)  # pairs are (source, target) for target in genes for source in genes
    z = torch.tensor(m.data[1])
    t0 = torch.full((len(z),), 1.0, dtype=torch.float64)
    eps = 1e-5
    X, _ = model(z, t0, t0[:, None] + torch.tensor([[-eps, eps]], dtype=torch.float64))
    xg = [m.transform.to_features(X[:, j].detach().numpy()) for j in range(2)]
    velocity = (xg[1] - xg[0]) / (2 * eps)
    np.testing.assert_allclose(W.sum(-1), velocity, rtol=1e-6, atol=1e-6 * np.abs(velocity).max())


def test_jacobian_is_the_gene_space_operator(adata_marginals, model):
    _, m = adata_marginals
    res = cellmnn.gene_interactions(model, m, pairs=[("G1", "G2"), ("G3", "G0")], cells=[0], aggregate=None,
                                    kind="jacobian")
    z = torch.tensor(m.data[0])
    A = model.operator(z, torch.zeros(len(z), dtype=torch.float64)).detach().numpy()
    W, s = m.transform.pca_components, m.transform.std
    J = np.einsum("da,nde,eb->nab", s[:, None] * W, A, W / s[:, None])  # W^T S A S^-1 W per cell
    np.testing.assert_allclose(res.values[:, 0], J[:, 2, 1], rtol=1e-10)
    np.testing.assert_allclose(res.values[:, 1], J[:, 0, 3], rtol=1e-10)


def test_velocity_jacobian_is_the_gene_space_jacobian_of_the_learned_velocity(adata_marginals, model):
    # d(dx_i/dt)/dx_j of the decoded trajectory's velocity, by central differences in gene space
    # along gene j (moved within the PCA subspace: x -> x + eps * W^T W e_j).
    _, m = adata_marginals
    res = cellmnn.gene_interactions(model, m, pairs=[("G1", "G2"), ("G3", "G0"), ("G5", "G5")], cells=[2],
                                    aggregate=None, kind="velocity_jacobian")
    tr = m.transform
    z0 = torch.tensor(m.data[2])
    t = torch.full((len(z0),), 2.0, dtype=torch.float64)

    def gene_velocity(z):
        v = torch.einsum("bde,be->bd", model.operator(z, t), z)
        return (v * torch.tensor(tr.std)) @ torch.tensor(tr.pca_components)

    eps = 1e-6
    for p, (src, tgt) in enumerate([(1, 2), (3, 0), (5, 5)]):
        e = np.zeros(8)
        e[src] = eps
        dz = torch.tensor((tr.pca_components @ e) / tr.std)  # the model-space image of that move
        fd = (gene_velocity(z0 + dz) - gene_velocity(z0 - dz)).detach().numpy()[:, tgt] / (2 * eps)
        np.testing.assert_allclose(res.values[:, p], fd, rtol=1e-5, atol=1e-7 * np.abs(fd).max())
    # For an operator that does not depend on the cell the two read-outs agree.
    A = np.random.default_rng(1).normal(size=(3, 3))
    const = [cellmnn.gene_interactions(ConstantOperator(A), m, genes=GENES[:4], aggregate="all", kind=k).values
             for k in ("jacobian", "velocity_jacobian")]
    np.testing.assert_allclose(const[0], const[1], rtol=1e-10, atol=1e-12)


def test_twenty_thousand_genes_touch_only_the_requested_entries():
    # genes x genes per cell would be 3.2 GB a cell here; only D x |pairs| numbers are formed.
    rng = np.random.default_rng(5)
    G, D = 20_000, 5
    W = np.linalg.qr(rng.normal(size=(G, D)))[0].T  # orthonormal rows
    names = [f"gene{i}" for i in range(G)]
    tr = cellmnn.Transform(rng.normal(size=D), rng.uniform(0.5, 2.0, D), W, rng.normal(size=G), names)
    m = cellmnn.Marginals([rng.normal(size=(300, D)) for _ in range(3)], np.array([0.0, 1.0, 2.0]), tr)
    torch.manual_seed(0)
    net = cellmnn.CellMNN(D, width=16, depth=2, init_scale=0.5).double()
    pairs = [(names[a], names[b]) for a, b in rng.integers(0, G, size=(40, 2))]
    got = cellmnn.gene_interactions(net, m, pairs=pairs, aggregate=None)
    z = np.concatenate(m.data)
    t = torch.as_tensor(np.repeat(m.times, 300))
    A = net.operator(torch.as_tensor(z), t).detach().numpy()
    src = [names.index(s) for s, _ in pairs]
    tgt = [names.index(g) for _, g in pairs]
    s = tr.std[:, None]
    J = np.einsum("dp,nde,ep->np", s * W[:, tgt], A, W[:, src] / s)
    np.testing.assert_allclose(got.values, J * (z @ (s * W[:, src])), rtol=1e-9, atol=1e-12)
    block = cellmnn.gene_interactions(net, m, genes=names[-30:], aggregate="all", kind="velocity_jacobian")
    assert block.values.shape == (900,) and np.isfinite(block.values).all()


def test_aggregates_agree(adata_marginals, model):
    _, m = adata_marginals
    pairs = [("G1", "G2"), ("G2", "G1")]
    cells = cellmnn.gene_interactions(model, m, pairs=pairs, aggregate=None)
    per_t = cellmnn.gene_interactions(model, m, pairs=pairs, aggregate="timepoint")
    overall = cellmnn.gene_interactions(model, m, pairs=pairs, aggregate="all")
    assert cells.values.shape == (120, 2) and per_t.values.shape == (3, 2) and overall.values.shape == (2,)
    np.testing.assert_allclose(per_t.values[1], cells.values[40:80].mean(0), rtol=1e-12)
    np.testing.assert_allclose(overall.values, cells.values.mean(0), rtol=1e-12)
    np.testing.assert_allclose(overall.positive, (cells.values > 0).mean(0), rtol=1e-12)


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one of genes"),
    (dict(genes=["G1"], pairs=[("G1", "G2")]), "exactly one of genes"),
    (dict(genes=["G1", "NOPE"]), "genes not in the data"),
    (dict(pairs=[("G1", "NOPE")]), "genes not in the data"),
    (dict(pairs=[("G1",)]), "source, target"),
    (dict(genes=["G1"], aggregate="median"), "aggregate must be"),
    (dict(genes=["G1"], kind="effect"), "kind must be"),
    (dict(genes=["G1"], cells=[5]), "timepoint indices"),
])
def test_interaction_errors(adata_marginals, model, kwargs, match):
    _, m = adata_marginals
    with pytest.raises(ValueError, match=match):
        cellmnn.gene_interactions(model, m, **kwargs)


class ConstantOperator(nn.Module):
    """A model whose operator is one fixed matrix for every cell (for exact expectations)."""

    def __init__(self, A):
        super().__init__()
        self.A = nn.Parameter(torch.as_tensor(A, dtype=torch.float64), requires_grad=False)
        self.dim = len(A)

    def operator(self, x, t):
        return self.A.expand(len(x), -1, -1)


def test_trrust_validation_metrics_on_a_known_operator(tmp_path):
    # Genes in model space = genes (no PCA); every cell has x - x* > 0 in gene 0 and gene 1, so
    # w_{j->i} has the sign of J_ij = A_ij s_i / s_j.
    rng = np.random.default_rng(0)
    arrays = [np.abs(rng.normal(size=(20, 3))) + 5.0 for _ in range(2)]
    arrays[0][:, :2] += 10.0  # x above its mean in genes 0, 1 for every cell of timepoint 0
    m = cellmnn.load_marginals(arrays, times=[0, 1], n_components=None)
    m.transform.feature_names = ["TFA", "T1", "T2"]
    A = np.array([[0.0, 0.0, 0.0],     # targets x sources
                  [1.0, 0.0, 0.0],     # TFA -> T1 positive
                  [-1.0, 1.0, 0.0]])   # TFA -> T2 negative, T1 -> T2 positive
    tsv = tmp_path / "t.tsv"
    tsv.write_text("TF\tTarget\tMode\tPMID\nTFA\tT1\tActivation\t1\nTFA\tT2\tActivation\t2\n"
                   "T1\tT2\tRepression\t3\nTFA\tT9\tActivation\t4\nTFA\tT1\tUnknown\t5\n")
    report = cellmnn.trrust_validation(ConstantOperator(A), m, str(tsv), cells=[0])
    scores = {(e["tf"], e["target"]): e["score"] for e in report.edges}
    assert scores == {("TFA", "T1"): 1.0, ("TFA", "T2"): 0.0, ("T1", "T2"): 1.0}
    o = report.overall  # calls: act, rep, act; truth: act, act, rep
    assert o["n_edges"] == 3 and o["sign_accuracy"] == pytest.approx(1 / 3)
    assert o["precision"] == pytest.approx(0.5) and o["recall"] == pytest.approx(0.5)
    # AUROC: positive scores {1, 0} against negative {1}: a tie (1/2) and a loss (0) -> 1/4.
    assert o["f1"] == pytest.approx(0.5) and o["auroc"] == pytest.approx(0.25)
    # The paper's counts: TFA->T1 Activation right (TP), TFA->T2 Activation wrong (FP),
    # T1->T2 Repression wrong (TN); precision 1/2, recall 1/1.
    p = report.paper[-1]
    assert p["tf"] == "all" and (p["tp"], p["fp"], p["tn"], p["fn"]) == (1, 1, 1, 0)
    assert p["precision"] == pytest.approx(0.5) and p["recall"] == 1.0 and p["f1"] == pytest.approx(2 / 3)
    assert "TFA" in report.format() and "paper's definitions" in report.format()


def test_edges_are_judged_on_cells_with_the_tf_above_x_star(tmp_path):
    # Constant A with TF -> T and TF -> U positive: w = J (x_TF - x*_TF) has the sign of the TF's
    # deviation, so over all cells only the fraction above x* is positive; on the cells with the
    # TF above x* every weight is positive: T (Activation) agrees, U (Repression) does not.
    rng = np.random.default_rng(3)
    m = cellmnn.load_marginals([rng.normal(size=(31, 3)) for _ in range(2)], times=[0, 1], n_components=None)
    m.transform.feature_names = ["TF", "T", "U"]
    A = np.zeros((3, 3))
    A[1, 0] = A[2, 0] = 0.7
    model = ConstantOperator(A)
    above = m.data[1][:, 0] > 0
    assert 0 < above.sum() < len(above)
    w = cellmnn.gene_interactions(model, m, pairs=[("TF", "T")], cells=[1], aggregate=None).values[:, 0]
    np.testing.assert_array_equal(w > 0, above)
    rows = [("TF", "T", "Activation"), ("TF", "U", "Repression")]
    report = cellmnn.trrust_validation(model, m, rows, cells=[1])
    by = {e["target"]: e for e in report.edges}
    assert by["T"]["n_cells"] == by["U"]["n_cells"] == above.sum()
    assert by["T"]["score"] == by["U"]["score"] == 1.0
    assert by["T"]["agreement"] == 1.0 and by["U"]["agreement"] == 0.0
    o = report.overall
    assert o["sign_accuracy"] == 0.5 and o["precision"] == 0.5 and o["recall"] == 1.0 and o["auroc"] == 0.5
    p = report.paper[-1]  # T: Activation right (TP); U: Repression wrong (TN)
    assert (p["tp"], p["fp"], p["tn"], p["fn"]) == (1, 0, 1, 0) and p["precision"] == 1.0 and p["recall"] == 1.0
    # The model-free reference: TF-target correlations over the same cells.
    c = [np.corrcoef(m.data[1][:, 0], m.data[1][:, k])[0, 1] for k in (1, 2)]
    assert by["T"]["correlation"] == pytest.approx(c[0]) and by["U"]["correlation"] == pytest.approx(c[1])
    assert o["correlation_sign_accuracy"] == ((c[0] > 0) + (c[1] < 0)) / 2
    assert "reference without a model" in report.format()
    report.to_csv(str(tmp_path / "e.csv"))
    lines = (tmp_path / "e.csv").read_text().splitlines()
    assert lines[0] == "tf,target,mode,score,agreement,n_cells,correlation"
    assert lines[1].split(",")[5] == str(above.sum())


def test_an_edge_no_cell_can_judge_is_reported_and_left_out():
    # The TF never rises above x* in timepoint 0 (all its cells are below the pooled mean).
    rng = np.random.default_rng(4)
    arrays = [rng.normal(size=(20, 2)), rng.normal(size=(20, 2))]
    arrays[1][:, 0] += 50.0
    m = cellmnn.load_marginals(arrays, times=[0, 1], n_components=None)
    m.transform.feature_names = ["TF", "T"]
    A = np.array([[0.0, 0.0], [1.0, 0.0]])
    report = cellmnn.trrust_validation(ConstantOperator(A), m, [("TF", "T", "Activation")], cells=[0])
    assert report.edges[0]["n_cells"] == 0 and np.isnan(report.edges[0]["score"])
    assert report.overall["n_without_cells"] == 1 and report.overall["n_edges"] == 0
    assert "no cell has the TF above x*" in report.format()
    p = report.paper[-1]
    assert (p["tp"], p["fp"]) == (0, 1)  # the authors count it as not correct


def test_centered_expression_is_the_gene_space_image_minus_x_star(adata_marginals):
    _, m = adata_marginals
    got = cellmnn.centered_expression(m, ["G3", "G0", "G3"], cells=[2, 0])
    z = np.concatenate([m.data[2], m.data[0]])
    full = m.transform.to_features(z) - m.transform.to_features(np.zeros((1, m.dim)))
    np.testing.assert_allclose(got, full[:, [3, 0, 3]], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="genes not in the data"):
        cellmnn.centered_expression(m, ["NOPE"])


def test_trrust_files_with_and_without_header(tmp_path):
    body = "JUN\tFOS\tActivation\t1;2\nJUN\tMYC\tRepression\t3\nFOS\tJUN\tUnknown\t4\n"
    (tmp_path / "a.tsv").write_text(body)
    (tmp_path / "b.tsv").write_text("TF\tTarget\tMode of regulation\tReferences (PMID)\n" + body)
    rows = cellmnn.read_trrust(tmp_path / "a.tsv")
    want = [("JUN", "FOS", "Activation"), ("JUN", "MYC", "Repression"), ("FOS", "JUN", "Unknown")]
    assert rows == cellmnn.read_trrust(tmp_path / "b.tsv") == want
    (tmp_path / "c.tsv").write_text(body + "JUN\tX\tMaybe\t5\n")
    with pytest.raises(ValueError, match="mode must be one of"):
        cellmnn.read_trrust(tmp_path / "c.tsv")
    (tmp_path / "d.tsv").write_text("JUN FOS Activation\n")
    with pytest.raises(ValueError, match="tab-separated"):
        cellmnn.read_trrust(tmp_path / "d.tsv")


def test_shipped_trrust_subsets_parse():
    import os

    for tf in ("JUN", "FOS", "POU5F1"):
        path = os.path.join(os.path.dirname(__file__), "data", f"{tf}_targets.human.tsv")
        rows = cellmnn.read_trrust(path)
        assert rows and all(r[0] == tf for r in rows)


def test_recovery_scores_exact_cases():
    truth = linear_system(8, seed=1)
    perfect = cellmnn.recovery_scores(truth, truth)
    assert perfect["auroc"] == 1.0 and perfect["sign_accuracy"] == 1.0 and perfect["auprc"] == 1.0
    flipped = cellmnn.recovery_scores(-truth, truth)
    assert flipped["auroc"] == 1.0 and flipped["sign_accuracy"] == 0.0
    with pytest.raises(ValueError, match="both edges and non-edges"):
        cellmnn.recovery_scores(np.ones((3, 3)), np.ones((3, 3)))


def test_network_simulators():
    genes, rules, C = krumsiek_network()
    assert len(genes) == 11 and (C != 0).sum() == 30 and C[genes.index("Pu.1"), genes.index("Gata1")] < 0
    m = simulate_krumsiek(times=(0.0, 0.5, 1.0), n_cells=30, seed=1)
    assert m.sizes == [30, 30, 30] and m.transform.feature_names == genes
    raw = m.transform.to_features(m.data[2])
    assert np.isfinite(raw).all() and (raw >= 0).all()
    uni = simulate_krumsiek(times=(0.0, 0.5), n_cells=200, seed=1, start="uniform")
    raw0 = uni.transform.to_features(uni.data[0])
    assert raw0.min() >= 0 and raw0.max() <= 1 and raw0.std(axis=0).min() > 0.2  # every gene varies
    with pytest.raises(ValueError, match="start must be"):
        simulate_krumsiek(start="stem")
    M = linear_system(6, seed=2)
    assert np.linalg.eigvals(M).real.max() < 0
    lin = sample_linear(M, times=(0.0, 1.0), n_cells=25)
    assert lin.sizes == [25, 25] and lin.dim == 6
    with pytest.raises(ValueError, match="n_states"):
        sample_linear(M, n_states=0)


def test_cli_interactions(adata_marginals, tmp_path, capsys):
    ad, _ = adata_marginals
    data = tmp_path / "cells.h5ad"
    ad.write_h5ad(data)
    fast = ["--max-epochs", "2", "--check-every", "1", "--batch-size", "32", "--quiet", "--n-components", "3"]
    assert cli_main(["fit", str(data), "--out", str(tmp_path / "model"), *fast]) == 0
    assert cli_main(["interactions", str(tmp_path / "model"), str(data), "--genes", "G0", "G1", "G2",
                     "--out", str(tmp_path / "w.csv"), "--heatmap", str(tmp_path / "w.png")]) == 0
    lines = (tmp_path / "w.csv").read_text().splitlines()
    assert lines[0] == "source,target,time,n_cells,mean_weight,fraction_positive" and len(lines) == 1 + 3 * 9
    assert (tmp_path / "w.png").read_bytes()[:4] == b"\x89PNG"
    tsv = tmp_path / "t.tsv"
    tsv.write_text("G0\tG1\tActivation\t1\nG0\tG2\tRepression\t2\nG3\tG4\tActivation\t3\n")
    assert cli_main(["fit", str(data), "--out", str(tmp_path / "model2"), "--seed", "1", *fast]) == 0
    assert cli_main(["interactions", str(tmp_path / "model"), str(data), "--trrust", str(tsv),
                     "--ensemble", str(tmp_path / "model2"), "--out", str(tmp_path / "v.csv")]) == 0
    out = capsys.readouterr().out
    assert "sign acc" in out and "paper's definitions" in out
    # The ensemble's edge scores are those of the API on the two models.
    models = [cellmnn.load_model(tmp_path / d) for d in ("model", "model2")]
    mm = cellmnn.Marginals([models[0].transform.to_model(ad.X[ad.obs["day"].values == t]) for t in (0.0, 1.0, 2.0)],
                           [0.0, 1.0, 2.0], models[0].transform)
    api = cellmnn.trrust_validation(models, mm, str(tsv))
    rows = (tmp_path / "v.csv").read_text().splitlines()[1:]
    assert [float(r.split(",")[3]) for r in rows] == pytest.approx([e["score"] for e in api.edges], abs=1e-4)
    assert cli_main(["fit", str(data), "--out", str(tmp_path / "model4"), *fast[:-1], "4"]) == 0
    assert cli_main(["interactions", str(tmp_path / "model"), str(data), "--trrust", str(tsv),
                     "--ensemble", str(tmp_path / "model4"), "--out", str(tmp_path / "y.csv")]) == 2
    assert "transform differs" in capsys.readouterr().err
    assert cli_main(["interactions", str(tmp_path / "model"), str(data), "--pairs", "G0:NOPE",
                     "--out", str(tmp_path / "x.csv")]) == 2
