"""Plots of transference: mode-by-mode heatmaps with intervals, two runs compared, Z over training, histograms
(of Z per mode pair, and of the paper's ratio LR per training stage) and the linearisation check.

Every cell and panel says how many pairs (and sampling units) it rests on; a mode pair without records is grey
and labelled ``n = 0``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

# No backend is forced: matplotlib picks Agg on a machine without a display, and notebooks keep inline.
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from kml.transference.aggregate import UNIT, cross_pairs, mode_matrix, mode_pair_stats, source_modes, target_modes
from kml.transference.compare import paired_comparison
from kml.transference.stats import mean_estimate

__all__ = [
    "compare_heatmaps",
    "distributions",
    "heatmap",
    "linearity",
    "lr_histograms",
    "over_training",
    "save_all",
]

EMPTY = "0.85"  # the grey of a cell without records


def _grid(ax, values: np.ndarray, rows: list[str], columns: list[str], limit: float, label: str):
    """A diverging image of ``values`` ``[R, C]`` on ``[-limit, limit]``, NaN cells grey; returns the image."""
    cmap = plt.get_cmap("RdBu").with_extremes(bad=EMPTY)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=-limit, vmax=limit)
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("target mode j")
    ax.set_ylabel("source mode i")
    ax.figure.colorbar(image, ax=ax, label=label, shrink=0.85)
    return image


def _limit(*arrays: np.ndarray) -> float:
    """The symmetric colour limit covering every finite value of ``arrays`` (1 when there is none)."""
    finite = [np.abs(a[np.isfinite(a)]) for a in arrays]
    largest = max((float(f.max()) for f in finite if f.size), default=0.0)
    return largest if largest > 0 else 1.0


def _ink(value: float, limit: float) -> str:
    """Black text, white on the darkest cells of the diverging map."""
    return "white" if np.isfinite(value) and abs(value) > 0.6 * limit else "black"


def _cell_text(mean: float, low: float, high: float, count: int, units: int) -> str:
    if count == 0:
        return "n = 0"
    interval = f"[{low:+.3f}, {high:+.3f}]" if np.isfinite(low) else "[no interval]"
    return f"{mean:+.3f}\n{interval}\nn={count} ({units} units)"


def heatmap(
    records: pd.DataFrame,
    stat: str = "mean",
    title: str | None = None,
    ax=None,
    limit: float | None = None,
    modes: list[str] | None = None,
):
    """Mode-by-mode heatmap of the mean Z (or ``stat``) with its 95% interval and ``n`` in every cell.

    Rows: source mode i, columns: target mode j; ``limit`` fixes the colour scale (shared by several heatmaps),
    ``modes`` the axes. Cells show ``mean [ci_low, ci_high] n=pairs (units)``; an empty cell is grey, ``n = 0``.
    """
    matrix = mode_matrix(records, stat, modes=modes)
    low, high = (mode_matrix(records, s, modes=modes) for s in ("ci_low", "ci_high"))
    counts, units = (mode_matrix(records, s, modes=modes) for s in ("count", "n"))
    values = matrix.to_numpy(dtype=float)
    limit = limit or _limit(values)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.9 * len(matrix.columns) + 2.8, 1.3 * len(matrix) + 1.6))
    _grid(ax, values, list(matrix.index), list(matrix.columns), limit, f"{stat} Z (>0: i helps j)")
    for r in range(values.shape[0]):
        for c in range(values.shape[1]):
            text = _cell_text(values[r, c], low.iat[r, c], high.iat[r, c], int(counts.iat[r, c]), int(units.iat[r, c]))
            ax.text(c, r, text, ha="center", va="center", fontsize=7, color=_ink(values[r, c], limit))
    ax.set_title(title or f"task transference, {stat} Z (95% interval)")
    ax.figure.tight_layout()
    return ax.figure


def compare_heatmaps(a: pd.DataFrame, b: pd.DataFrame, names: Sequence[str] = ("A", "B"), modes=None):
    """Two runs' mean-Z heatmaps on one colour scale, and their paired difference ``B - A`` per cell (paired t
    test over identical episodes: the interval, ``p`` and ``n``)."""
    modes = modes or list(dict.fromkeys([*source_modes(a), *target_modes(a), *source_modes(b), *target_modes(b)]))
    means = [mode_matrix(r, modes=modes).to_numpy(dtype=float) for r in (a, b)]
    limit = _limit(*means)
    fig, axes = plt.subplots(1, 3, figsize=(5.6 * 3, 1.3 * len(modes) + 2.2))
    for ax, records, name in zip(axes, (a, b), names):
        heatmap(records, ax=ax, limit=limit, modes=modes, title=f"{name}: mean Z (95% interval)")
    table = paired_comparison(a, b).set_index(["mode_i", "mode_j"])
    difference = np.full((len(modes), len(modes)), np.nan)
    texts = {}
    for r, source in enumerate(modes):
        for c, target in enumerate(modes):
            if (source, target) not in table.index:
                texts[r, c] = "n = 0"
                continue
            row = table.loc[(source, target)]
            difference[r, c] = row["difference"]
            interval = f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]" if np.isfinite(row["ci_low"]) else ""
            p = f"p={row['p']:.2g}" if np.isfinite(row["p"]) else "p: n<2"
            texts[r, c] = f"{row['difference']:+.3f}\n{interval}\n{p}, n={int(row['n'])}"
    ax, spread = axes[2], _limit(difference)
    _grid(ax, difference, modes, modes, spread, f"mean Z, {names[1]} - {names[0]}")
    for (r, c), text in texts.items():
        ax.text(c, r, text, ha="center", va="center", fontsize=7, color=_ink(difference[r, c], spread))
    ax.set_title(f"{names[1]} - {names[0]}, paired on the same episodes")
    fig.tight_layout()
    return fig


def over_training(records: pd.DataFrame, ax=None):
    """Mean Z per mode pair against the training step, with its 95% interval as a band."""
    stats = mode_pair_stats(records, by_step=True)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    for (source, target), pair in stats.groupby(["mode_i", "mode_j"]):
        line = ax.plot(pair["step"], pair["mean"], marker="o", label=f"{source} -> {target}")[0]
        ax.fill_between(pair["step"], pair["ci_low"], pair["ci_high"], alpha=0.15, color=line.get_color())
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("mean Z (band: 95% interval)")
    ax.set_title("task transference over training")
    ax.legend(fontsize=7, ncol=2)
    ax.figure.tight_layout()
    return ax.figure


def distributions(records: pd.DataFrame, bins: int = 30, ratio: bool = False):
    """Histograms (counts) of Z, or of the paper's ratio LR = 1 - Z, for every ordered mode pair; each panel
    names its number of pairs, and a pair without records is a grey ``n = 0`` panel."""
    rows, columns = source_modes(records), target_modes(records)
    frame = cross_pairs(records)
    values = 1 - frame["Z"] if ratio else frame["Z"]
    edges = np.histogram_bin_edges(values, bins=bins) if len(values) else bins
    fig, axes = plt.subplots(
        len(rows), len(columns), figsize=(2.8 * len(columns), 2.3 * len(rows)), squeeze=False, sharex=True
    )
    for r, source in enumerate(rows):
        for c, target in enumerate(columns):
            ax = axes[r][c]
            pair = frame[(frame["mode_i"] == source) & (frame["mode_j"] == target)]
            if pair.empty:
                ax.set_facecolor(EMPTY)
                ax.text(0.5, 0.5, "n = 0", transform=ax.transAxes, ha="center", va="center")
            else:
                data = 1 - pair["Z"] if ratio else pair["Z"]
                ax.hist(data, bins=edges, color="tab:blue" if source == target else "tab:orange")
            ax.axvline(1.0 if ratio else 0.0, color="black", linewidth=0.8)
            ax.set_title(f"{source} -> {target} (n={len(pair)})", fontsize=8)
    fig.supxlabel("LR = L_j(after) / L_j(before)" if ratio else "Z(i -> j)")
    fig.supylabel("pairs")
    fig.tight_layout()
    return fig


def lr_histograms(records: pd.DataFrame, bins: int = 30, steps: Sequence[int] | None = None, title: str | None = None):
    """The paper's figure: histograms (counts) of ``LR = L_j(after) / L_j(before)`` at each training stage, one
    panel per step on shared bins. Each panel gives the number of pairs, the mean LR with its 95% interval (over
    sampling units) and the fraction of LR < 1 (positive transfer)."""
    frame = cross_pairs(records)
    stages = sorted(frame["step"].unique()) if steps is None else list(steps)
    ratios = 1 - frame["Z"]
    edges = np.histogram_bin_edges(ratios, bins=bins) if len(ratios) else bins
    fig, axes = plt.subplots(
        1, max(len(stages), 1), figsize=(3.3 * max(len(stages), 1), 3.2), squeeze=False, sharex=True
    )
    for ax, step in zip(axes[0], stages):
        stage = frame[frame["step"] == step]
        lr = (1 - stage["Z"]).to_numpy(dtype=float)
        estimate = mean_estimate(lr, list(zip(*(stage[c] for c in UNIT))))
        ax.hist(lr, bins=edges, color="tab:purple")
        ax.axvline(1.0, color="black", linewidth=0.8)
        interval = f"[{estimate.low:.3f}, {estimate.high:.3f}]" if np.isfinite(estimate.low) else "[n<2]"
        positive = float((lr < 1).mean()) if len(lr) else float("nan")
        ax.set_title(
            f"step {int(step)}: n={len(lr)} pairs ({estimate.n} units)\nmean LR {estimate.mean:.3f} {interval}\n"
            f"LR<1: {positive:.0%}",
            fontsize=8,
        )
    axes[0][0].set_ylabel("pairs")
    pairs = ", ".join(f"{s} -> {t}" for s, t in dict.fromkeys(zip(frame["mode_i"], frame["mode_j"])))
    if "lookahead" in frame and len(frame):
        rates = ", ".join(f"{r:g}" for r in sorted(set(frame["rate"])))
        pairs += f" ({', '.join(sorted(set(frame['lookahead'].astype(str))))} lookahead, rate {rates})"
    fig.supxlabel("LR = L_j(after) / L_j(before)  (< 1: the step on the source helps the target)")
    fig.suptitle(title or f"transference over training: {pairs}", fontsize=10)
    fig.tight_layout()
    return fig


def linearity(records: pd.DataFrame, ax=None):
    """Measured Z against its first-order prediction ``-<g_j, Delta_i> / L_j``: on the diagonal in the linear
    regime; off it, curvature (a rate too large for the loss) sets Z. Self pairs are marked apart."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4.8, 4.4))
    known = records[np.isfinite(records["Z_linear"].to_numpy(dtype=float))]
    for self_pair, marker, label in ((False, "o", "pairs i != j"), (True, "x", "self pairs")):
        part = known[known["self_pair"].astype(bool) == self_pair]
        if len(part):
            ax.scatter(part["Z_linear"], part["Z"], s=12, marker=marker, alpha=0.6, label=f"{label} (n={len(part)})")
    if len(known):
        span = np.nanmax(np.abs(known[["Z", "Z_linear"]].to_numpy(dtype=float)))
        ax.plot([-span, span], [-span, span], color="black", linewidth=0.8, label="Z = Z_linear")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.axvline(0, color="grey", linewidth=0.5)
    ax.set_xlabel("first-order prediction Z_linear")
    ax.set_ylabel("measured Z")
    ax.set_title("linearisation check")
    ax.legend(fontsize=7)
    ax.figure.tight_layout()
    return ax.figure


def save_all(
    records: pd.DataFrame, folder: str | os.PathLike, prefix: str = "transference", bins: int = 30
) -> list[Path]:
    """Write the heatmap, the histograms of Z, the LR histograms per step, the curves (when several steps) and the
    linearisation check (when the table has it) as ``<prefix>_<figure>.png`` in ``folder``."""
    folder = Path(folder)
    figures = {
        "heatmap": lambda: heatmap(records),
        "distributions": lambda: distributions(records, bins),
        "lr": lambda: lr_histograms(records, bins),
    }
    if records["step"].nunique() > 1:
        figures["over_training"] = lambda: over_training(records)
    if "Z_linear" in records and np.isfinite(records["Z_linear"].to_numpy(dtype=float)).any():
        figures["linearity"] = lambda: linearity(records)
    paths = []
    for name, draw in figures.items():
        figure = draw()
        path = folder / f"{prefix}_{name}.png"
        try:
            figure.savefig(path, dpi=120)
        finally:
            plt.close(figure)
        paths.append(path)
    return paths
