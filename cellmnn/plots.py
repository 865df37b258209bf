"""Figures: predicted against observed cells at held-out timepoints."""
from __future__ import annotations

import numpy as np

from .files import FIGURE, check_output, save_figure


def plot_holdouts(marginals, predictions: dict, baselines: dict, path: str, dims=(0, 1)) -> str:
    """One panel per held-out timepoint k: observed cells at t_k, Cell-MNN's prediction from t_{k-1}
    (``predictions[k]``, (n, D)) and the OT-interpolate support (``baselines[k]`` = (points,
    weights)); written atomically to ``path`` (PNG; replaces only an earlier cellmnn figure)."""
    check_output(path, FIGURE)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def plot_heatmap(matrix, genes, path: str, title: str = "") -> str:
    """A targets x sources heatmap (diverging colours, NaN blank), written atomically (PNG)."""
    check_output(path, FIGURE)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def _save(fig, plt, path):
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)
