"""The results table as a bar chart: one panel per setup, modes along x, a bar per method with its seed interval."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kml.results.table import AVERAGE

__all__ = ["bar_chart"]


def bar_chart(summary_rows: pd.DataFrame, modes: list[str], path: str | Path) -> Path:
    """Save the chart of :func:`kml.results.table.summary`'s rows to ``path`` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = list(dict.fromkeys(summary_rows["setup"]))
    methods = list(dict.fromkeys(summary_rows["method"]))
    columns = [*modes, AVERAGE]
    width_inches = min(16.0, 2.0 + 0.22 * len(columns) * len(methods))
    figure, axes = plt.subplots(len(setups), 1, figsize=(width_inches, 4.2 * len(setups)), squeeze=False)
    width = 0.8 / max(1, len(methods))
    colours = plt.get_cmap("tab20" if len(methods) > 10 else "tab10").colors
    for axis, setup in zip(axes[:, 0], setups):
        rows = summary_rows[summary_rows["setup"] == setup].set_index(["method", "mode"])
        for i, method in enumerate(methods):
            values = [rows.loc[(method, m)] if (method, m) in rows.index else None for m in columns]
            axis.bar(
                [c + (i - (len(methods) - 1) / 2) * width for c in range(len(columns))],
                [v["accuracy"] if v is not None else 0 for v in values],
                width,
                yerr=[0 if v is None or pd.isna(v["ci95_seeds"]) else v["ci95_seeds"] for v in values],
                capsize=2,
                label=method,
                color=colours[i % len(colours)],
            )
        axis.set_xticks(range(len(columns)), columns)
        axis.set_ylabel("accuracy (%)")
        axis.set_title(f"{setup}: mean over seeds, 95% interval over seeds")
        low = float(summary_rows["accuracy"].min())
        axis.set_ylim(max(0.0, low - 10), 100)
        axis.grid(axis="y", alpha=0.3)
    axes[-1, 0].legend(fontsize="small", ncol=min(len(methods), 7), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
