"""Figures: predicted against observed cells at held-out timepoints, trajectories over the observed
populations, gene-interaction heatmaps, and fate transitions between two times (a heatmap and a
sankey-style flow)."""
from __future__ import annotations

import numpy as np

from .files import FIGURE, check_output, save_figure


def _pyplot():
    """matplotlib's pyplot on the Agg backend (no screen needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_holdouts(marginals, predictions: dict, baselines: dict, path: str, dims=(0, 1)) -> str:
    """One panel per held-out timepoint k: observed cells at t_k, Cell-MNN's prediction from t_{k-1}
    (``predictions[k]``, (n, D)) and the OT-interpolate support (``baselines[k]`` = (points,
    weights)); written atomically to ``path`` (PNG; replaces only an earlier cellmnn figure)."""
    check_output(path, FIGURE)
    plt = _pyplot()

    ks = sorted(predictions)
    a, b = dims if marginals.dim > 1 else (0, 0)
    fig, axes = plt.subplots(1, len(ks), figsize=(4.2 * len(ks), 4.0), squeeze=False)
    for ax, k in zip(axes[0], ks):
        obs = marginals.data[k]
        ax.scatter(obs[:, a], obs[:, b], s=6, c="0.6", label=f"observed t={marginals.times[k]:g}")
        if k in baselines:
            pts, w = baselines[k]
            ax.scatter(pts[:, a], pts[:, b], s=np.clip(3000 * w, 1, 20), c="tab:orange", alpha=0.5,
                       label="OT-interpolate")
        pred = predictions[k]
        ax.scatter(pred[:, a], pred[:, b], s=6, c="tab:blue", alpha=0.6, label="Cell-MNN")
        ax.set_title(f"held-out t = {marginals.times[k]:g}")
        ax.set_xlabel(f"dim {a + 1}")
        ax.set_ylabel(f"dim {b + 1}")
    axes[0][0].legend(loc="best", fontsize=8, markerscale=2)
    fig.tight_layout()
    return _save(fig, plt, path)


def _density(x, y, grid, bandwidth):
    """A Gaussian kernel density of the points (x, y) on ``grid`` (gx, gy meshes), at most 2000 points
    (a seeded subsample beyond)."""
    if len(x) > 2000:
        keep = np.random.default_rng(0).choice(len(x), 2000, replace=False)
        x, y = x[keep], y[keep]
    gx, gy = grid
    d2 = ((gx.ravel()[:, None] - x[None, :]) ** 2 + (gy.ravel()[:, None] - y[None, :]) ** 2) / bandwidth ** 2
    return np.exp(-0.5 * d2).sum(axis=1).reshape(gx.shape)


def plot_trajectories(marginals, model, path: str, dims=(0, 1), n_paths: int = 60, steps: int = 40, seed: int = 0,
                      title: str = "") -> str:
    """The observed populations as density contours (one colour per timepoint) and the paths of
    ``n_paths`` cells of the first timepoint pushed by ``model`` through every later time (``steps``
    points per gap); with a list of models (an ensemble) the mean path.  A model with a learned
    diffusion draws its noise-free path.  Each path is drawn as wide as the predictive spread at
    its end (root mean square distance from the drawn end: between the members of an ensemble,
    plus each stochastic member's own spread, from its covariance, or from 16 draws for
    re-linearised pieces).  Written atomically (PNG)."""
    check_output(path, FIGURE)
    plt = _pyplot()
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    a, b = dims if marginals.dim > 1 else (0, 0)
    times = np.asarray(marginals.times, dtype=np.float64)
    grid_t = np.unique(np.concatenate([np.linspace(times[k], times[k + 1], steps) for k in range(len(times) - 1)]))
    start = marginals.data[0]
    pick = np.random.default_rng(seed).choice(len(start), min(n_paths, len(start)), replace=False)
    paths = np.stack([m.predict(start[pick], times[0], grid_t, noise=False) for m in models])  # (members, n, T, D)
    mean = paths.mean(axis=0)
    var = ((paths[:, :, -1] - mean[:, -1]) ** 2).sum(-1).mean(0)  # (n,) between members, at the last time
    for m in models:
        if m.stochastic:
            var = var + _own_variance(m, start[pick], times[0], times[-1]) / len(models)
    spread = np.sqrt(var)
    everything = np.concatenate(list(marginals.data) + [mean.reshape(-1, mean.shape[-1])])
    lo, hi = everything[:, [a, b]].min(0), everything[:, [a, b]].max(0)
    pad = 0.08 * (hi - lo + 1e-9)
    gx, gy = np.meshgrid(*(np.linspace(lo[i] - pad[i], hi[i] + pad[i], 90) for i in (0, 1)))
    bandwidth = 0.08 * float(np.mean(hi - lo + 1e-9))
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    for k, data in enumerate(marginals.data):
        dens = _density(data[:, a], data[:, b], (gx, gy), bandwidth)
        color = cmap(k / max(len(times) - 1, 1))
        ax.contour(gx, gy, dens, levels=np.quantile(dens[dens > 0], [0.7, 0.9, 0.97]), colors=[color],
                   linewidths=1.0, alpha=0.9)
        ax.plot([], [], color=color, label=f"observed t = {times[k]:g}")
    varied = len(models) > 1 or any(m.stochastic for m in models)
    widths = 0.6 + 2.4 * spread / spread.max() if varied and spread.max() > 0 else np.full(len(pick), 0.8)
    for i in range(len(pick)):
        ax.plot(mean[i, :, a], mean[i, :, b], color="0.25", linewidth=widths[i], alpha=0.55)
    ax.scatter(mean[:, -1, a], mean[:, -1, b], s=8, c="tab:red", zorder=3, label=f"pushed to t = {times[-1]:g}")
    ax.scatter(start[pick, a], start[pick, b], s=8, c="0.25", zorder=3, label=f"start, t = {times[0]:g}")
    ax.set_xlabel(f"dim {a + 1}")
    ax.set_ylabel(f"dim {b + 1}")
    note = ""
    if varied:
        note = "; width: predictive spread" + (f" ({len(models)} members)" if len(models) > 1 else "")
    ax.set_title(title or f"{len(pick)} cells pushed through every time{note}", fontsize=10)
    ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    return _save(fig, plt, path)


def _own_variance(model, x0, t0: float, t1: float, draws: int = 16) -> np.ndarray:
    """A stochastic model's predictive variance (trace of its covariance) of cells x0 at t1, (n,):
    closed form for the single-piece decoder, else from ``draws`` samples."""
    if model.decoder.piece_length is None:
        return np.trace(model.predict_distribution(x0, t0, t1)[1], axis1=-2, axis2=-1)
    samples = model.predict(x0, t0, t1, n_samples=draws)
    return ((samples - samples.mean(0)) ** 2).sum(-1).mean(0) * draws / (draws - 1)


def plot_heatmap(matrix, genes, path: str, title: str = "") -> str:
    """A targets x sources heatmap (diverging colours, NaN blank), written atomically (PNG)."""
    check_output(path, FIGURE)
    plt = _pyplot()

    M = np.asarray(matrix, dtype=np.float64)
    lim = np.nanmax(np.abs(M)) if np.isfinite(M).any() else 1.0
    size = 2.5 + 0.35 * len(genes)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(np.ma.masked_invalid(M), cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(genes)), genes, rotation=90, fontsize=8)
    ax.set_yticks(range(len(genes)), genes, fontsize=8)
    ax.set_xlabel("source gene j")
    ax.set_ylabel("target gene i")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_transitions(table, path: str, title: str = "") -> str:
    """``cell_transition`` tables as heatmaps (source groups x target groups, probabilities written
    in the cells): one table, or a list of them side by side (e.g. consecutive times); written
    atomically (PNG)."""
    check_output(path, FIGURE)
    plt = _pyplot()
    tables = list(table) if isinstance(table, (list, tuple)) else [table]
    width = sum(2.5 + 0.6 * t.shape[1] for t in tables)
    fig, axes = plt.subplots(1, len(tables), figsize=(width, 1.8 + 0.45 * max(t.shape[0] for t in tables)),
                             squeeze=False)
    for ax, t in zip(axes[0], tables):
        M = np.asarray(t, dtype=np.float64)
        im = ax.imshow(M, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
        for i in range(M.shape[0]):
            for j in range(M.shape[1]):
                ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if M[i, j] > 0.6 else "black")
        ax.set_xticks(range(M.shape[1]), [str(v) for v in t.columns], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(M.shape[0]), [str(v) for v in t.index], fontsize=8)
        ax.set_xlabel(t.columns.name or "target group")
        ax.set_ylabel(t.index.name or "source group")
        ax.set_title(title or f"transition probabilities ({t.attrs.get('rule', '')})", fontsize=10)
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
    return _save(fig, plt, path)


def plot_perturbation(result, path: str, top: int = 20) -> str:
    """A ``perturb`` result: the mean shift of the ``top`` most moved genes (bars, with the spread
    over ensemble members as error bars) and, when it has group fractions, the share of the pushed
    cells reaching each group without and with the perturbation; written atomically (PNG)."""
    check_output(path, FIGURE)
    plt = _pyplot()
    order = np.argsort(-np.abs(result.shift))[:top]
    panels = 2 if result.fractions is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.0 * panels + 1.0, 0.9 + 0.28 * len(order) + 1.5), squeeze=False)
    ax = axes[0][0]
    y = np.arange(len(order))[::-1]
    colors = ["tab:red" if result.shift[i] > 0 else "tab:blue" for i in order]
    ax.barh(y, result.shift[order], xerr=result.shift_spread[order], color=colors, alpha=0.8)
    ax.set_yticks(y, [str(result.features[i]) for i in order], fontsize=8)
    ax.axvline(0.0, color="0.3", linewidth=0.8)
    ax.set_xlabel(f"mean shift at t = {result.target:g} (perturbed - control)")
    what = ", ".join(f"{g}: {v}" for g, v in result.spec.get("genes", {}).items()) or "directions"
    ax.set_title(f"{what}; cells of t = {result.source:g}", fontsize=9)
    if result.fractions is not None:
        ax = axes[0][1]
        f = result.fractions
        x = np.arange(len(f))
        ax.bar(x - 0.2, f["control"], width=0.4, color="0.6", label="control")
        ax.bar(x + 0.2, f["perturbed"], width=0.4, color="tab:purple", label="perturbed")
        ax.set_xticks(x, [str(g) for g in f.index], rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(f"share of the pushed cells at t = {result.target:g}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_weights(adata, key: str, path: str, basis=None, dims=(0, 1), title: str = "") -> str:
    """Cells coloured by a per-cell weight column ``obs[key]`` (``push``/``pull`` write them; NaN
    cells grey, underneath), on ``obsm[basis]`` or, by default, the first two columns of ``X``;
    written atomically (PNG)."""
    check_output(path, FIGURE)
    if key not in adata.obs.columns:
        raise ValueError(f"key {key!r} is not a column of adata.obs")
    if basis is not None and basis not in adata.obsm:
        raise ValueError(f"basis {basis!r} is not in adata.obsm; available: {list(adata.obsm.keys())}")
    plt = _pyplot()
    xy = np.asarray(adata.obsm[basis] if basis is not None else
                    (adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X), dtype=np.float64)[:, list(dims)]
    w = adata.obs[key].to_numpy(dtype=np.float64)
    has = np.isfinite(w)
    fig, ax = plt.subplots(figsize=(5.8, 4.8))
    ax.scatter(xy[~has, 0], xy[~has, 1], s=4, c="0.85", label="other times")
    order = np.argsort(w[has])
    sc = ax.scatter(xy[has][order, 0], xy[has][order, 1], s=7, c=w[has][order], cmap="magma_r")
    fig.colorbar(sc, ax=ax, shrink=0.8, label=key)
    ax.set_xlabel(f"{basis or 'X'} {dims[0] + 1}")
    ax.set_ylabel(f"{basis or 'X'} {dims[1] + 1}")
    ax.set_title(title or key, fontsize=10)
    ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    return _save(fig, plt, path)


def _ribbon(ax, x0, x1, y0, y1, color):
    """A band from [y0] at x0 to [y1] at x1 (each a (bottom, top) pair) with smooth S-shaped edges."""
    s = np.linspace(0.0, 1.0, 50)
    ease = 3 * s ** 2 - 2 * s ** 3
    x = x0 + (x1 - x0) * s
    low, high = y0[0] + (y1[0] - y0[0]) * ease, y0[1] + (y1[1] - y0[1]) * ease
    ax.fill_between(x, low, high, color=color, alpha=0.45, linewidth=0)


def plot_flow(tables, path: str) -> str:
    """A sankey-style flow of ``cell_transition`` tables; written atomically (PNG).

    Tables between consecutive times (each one's target time the next one's source time, groups
    matching by name) are threaded into one diagram, a column of groups per time: the first
    column holds the source groups by their share of the cells, and each later column the mass
    that reaches it, the previous column's mass carried by that step's table (a chain of one-step
    transitions: mass is conserved, and the flows from t_k on are read as if a cell's next step
    depended only on its group at t_k).  Otherwise one panel per table: a bar of the source groups
    (their share of the source cells), a bar of the target groups and a ribbon per pair as wide as
    the mass that flows.  A group keeps its colour in every column."""
    check_output(path, FIGURE)
    plt = _pyplot()
    tables = list(tables)
    if not tables:
        raise ValueError("plot_flow needs at least one transition table")
    names = []
    for t in tables:
        names += [str(g) for g in list(t.index) + list(t.columns) if str(g) not in names]
    palette = plt.get_cmap("tab10")
    color = {g: palette(i % 10) for i, g in enumerate(names)}
    if _threaded(tables):
        fig, ax = plt.subplots(figsize=(2.6 * (len(tables) + 1) + 1.0, 4.8))
        tables, masses = chain_flow(tables)
        for k, table in enumerate(tables):
            flow = masses[k][:, None] * np.asarray(table, dtype=np.float64)
            _flow_columns(ax, k, table.index, table.columns, flow, color, left_labels=k == 0)
        times = [tables[0].attrs.get("source_time")] + [t.attrs.get("target_time") for t in tables]
        for k, tt in enumerate(times):
            if tt is not None:
                ax.text(k, -0.06, f"t = {tt:g}", ha="center", va="top", fontsize=9)
        ax.set_xlim(-0.6, len(tables) + 0.6)
        ax.set_ylim(-0.12, None)
        ax.axis("off")
        ax.set_title(f"{tables[0].index.name or 'groups'}: mass carried forward, time by time", fontsize=9)
    else:
        fig, axes = plt.subplots(1, len(tables), figsize=(4.5 * len(tables), 4.5), squeeze=False)
        for ax, table in zip(axes[0], tables):
            flow = _source_shares(table)[:, None] * np.asarray(table, dtype=np.float64)
            _flow_columns(ax, 0, table.index, table.columns, flow, color, left_labels=True)
            ax.set_xlim(-0.45, 1.45)
            ax.axis("off")
            ax.set_title(f"{table.index.name or 'source'}  ->  {table.columns.name or 'target'}", fontsize=9)
    fig.tight_layout()
    return _save(fig, plt, path)


def chain_flow(tables):
    """Tables between consecutive times threaded (``plot_flow``): the tables, each one's rows put in
    the previous one's column order, and the mass per group of every time, (groups,) each: the
    first the source groups' shares of the cells, then mass_{k+1} = mass_k @ table_k (sums to 1)."""
    out = [tables[0]]
    for t in tables[1:]:
        by_name = {str(g): g for g in t.index}
        out.append(t.loc[[by_name[str(h)] for h in out[-1].columns]])
    masses = [_source_shares(out[0])]
    for t in out:
        masses.append(masses[-1] @ np.asarray(t, dtype=np.float64))
    return out, masses


def _source_shares(table) -> np.ndarray:
    """Each source group's share of the source cells (``attrs["source_counts"]``; equal shares
    without it), in the table's row order."""
    counts = table.attrs.get("source_counts") or {}
    share = np.array([counts.get(g, 1) for g in table.index], dtype=np.float64)
    return share / share.sum()


def _threaded(tables) -> bool:
    """Whether consecutive tables chain: one's target time and groups are the next one's source."""
    if len(tables) < 2:
        return False
    for a, b in zip(tables[:-1], tables[1:]):
        ta, sb = a.attrs.get("target_time"), b.attrs.get("source_time")
        if ta is None or sb is None or ta != sb or {str(h) for h in a.columns} != {str(g) for g in b.index}:
            return False
    return True


def _flow_columns(ax, x, rows, cols, flow, color, left_labels, gap=0.02):
    """Bars of ``rows`` at x and of ``cols`` at x + 1 (heights: the row and column sums of ``flow``)
    and a ribbon per pair as wide as its flow, coloured by the row's group."""
    left = np.concatenate([[0.0], np.cumsum(flow.sum(1) + gap)])
    right = np.concatenate([[0.0], np.cumsum(flow.sum(0) + gap)])
    out_at, in_at = left[:-1].copy(), right[:-1].copy()
    for i, g in enumerate(rows):
        ax.bar(x, flow[i].sum(), bottom=left[i], width=0.06, color=color[str(g)])
        if left_labels:
            ax.text(x - 0.05, left[i] + flow[i].sum() / 2, str(g), ha="right", va="center", fontsize=8)
    for j, h in enumerate(cols):
        ax.bar(x + 1, flow[:, j].sum(), bottom=right[j], width=0.06, color=color[str(h)])
        ax.text(x + 1.05, right[j] + flow[:, j].sum() / 2, f"{h}  {flow[:, j].sum():.2f}", ha="left", va="center",
                fontsize=8)
    for i in range(flow.shape[0]):
        for j in range(flow.shape[1]):
            if flow[i, j] > 0:
                _ribbon(ax, x + 0.03, x + 0.97, (out_at[i], out_at[i] + flow[i, j]),
                        (in_at[j], in_at[j] + flow[i, j]), color[str(rows[i])])
                out_at[i] += flow[i, j]
                in_at[j] += flow[i, j]


def _save(fig, plt, path):
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)
