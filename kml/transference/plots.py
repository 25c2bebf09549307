"""Plots of transference: mode-by-mode heatmap, Z over training, distributions per pair."""

from __future__ import annotations

import os
from pathlib import Path

# No backend is forced: matplotlib picks Agg on a machine without a display, and notebooks keep inline.
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from kml.transference.aggregate import cross_pairs, mode_matrix, mode_pair_stats

__all__ = ["distributions", "heatmap", "over_training", "save_all"]


def heatmap(records: pd.DataFrame, stat: str = "mean", title: str | None = None, ax=None):
    """Annotated mode-by-mode heatmap of ``stat`` of Z (rows: source, columns: target)."""
    matrix = mode_matrix(records, stat)
    counts = mode_matrix(records, "count")
    if ax is None:
        _, ax = plt.subplots(figsize=(1.4 * len(matrix.columns) + 2.5, 1.2 * len(matrix) + 1.5))
    values = matrix.to_numpy(dtype=float)
    limit = np.nanmax(np.abs(values)) if np.isfinite(values).any() else 1.0
    image = ax.imshow(values, cmap="RdBu", vmin=-limit, vmax=limit)
    ax.set_xticks(range(len(matrix.columns)), matrix.columns, rotation=30, ha="right")
    ax.set_yticks(range(len(matrix.index)), matrix.index)
    ax.set_xlabel("target mode j")
    ax.set_ylabel("source mode i")
    for r in range(values.shape[0]):
        for c in range(values.shape[1]):
            if np.isfinite(values[r, c]):
                ax.text(c, r, f"{values[r, c]:+.3f}\nn={int(counts.iat[r, c])}", ha="center", va="center", fontsize=8)
    ax.figure.colorbar(image, ax=ax, label=f"{stat} Z (>0: step on i helps j)")
    ax.set_title(title or f"task transference, {stat} Z")
    ax.figure.tight_layout()
    return ax.figure


def over_training(records: pd.DataFrame, ax=None):
    """Mean Z (with a band of one standard error) per mode pair against the training step."""
    stats = mode_pair_stats(records, by_step=True)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    for (source, target), pair in stats.groupby(["mode_i", "mode_j"]):
        error = pair["std"].fillna(0) / np.sqrt(pair["count"])
        ax.plot(pair["step"], pair["mean"], marker="o", label=f"{source} -> {target}")
        ax.fill_between(pair["step"], pair["mean"] - error, pair["mean"] + error, alpha=0.15)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("mean Z")
    ax.set_title("task transference over training")
    ax.legend(fontsize=7, ncol=2)
    ax.figure.tight_layout()
    return ax.figure


def distributions(records: pd.DataFrame, bins: int = 30, ratio: bool = False):
    """Histogram of Z (or of the paper's ratio LR = 1 - Z) for every ordered mode pair."""
    modes = list(dict.fromkeys([*records["mode_i"], *records["mode_j"]]))
    frame = cross_pairs(records)
    values = 1 - frame["Z"] if ratio else frame["Z"]
    edges = np.histogram_bin_edges(values, bins=bins) if len(values) else bins
    fig, axes = plt.subplots(
        len(modes), len(modes), figsize=(2.6 * len(modes), 2.2 * len(modes)), squeeze=False, sharex=True
    )
    for r, source in enumerate(modes):
        for c, target in enumerate(modes):
            ax = axes[r][c]
            pair = frame[(frame["mode_i"] == source) & (frame["mode_j"] == target)]
            data = 1 - pair["Z"] if ratio else pair["Z"]
            ax.hist(data, bins=edges, color="tab:blue" if source == target else "tab:orange")
            ax.axvline(1.0 if ratio else 0.0, color="black", linewidth=0.8)
            ax.set_title(f"{source} -> {target}", fontsize=8)
    fig.supxlabel("LR = L_j(after) / L_j(before)" if ratio else "Z(i -> j)")
    fig.tight_layout()
    return fig


def save_all(records: pd.DataFrame, folder: str | os.PathLike, prefix: str = "transference") -> list[Path]:
    """Write the heatmap, the curves (when several steps) and the distributions as PNG files."""
    folder = Path(folder)
    figures = {"heatmap": heatmap(records), "distributions": distributions(records)}
    if records["step"].nunique() > 1:
        figures["over_training"] = over_training(records)
    paths = []
    for name, figure in figures.items():
        path = folder / f"{prefix}_{name}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(path)
    return paths
