"""From per-episode accuracies to the results table: seeds, intervals and paired differences.

Input: a tidy frame with one row per evaluated episode, columns ``setup, method, seed, mode, episode, accuracy``
(accuracy in percent). Every method is evaluated on the same seeded episodes, so the same ``(mode, episode)``
is the same task for every method and seed: differences can be paired by seed and by episode.

* ``accuracy``: mean over seeds of each run's mean over episodes (``average``: the modes weigh the same);
* ``ci95_seeds``: half-width of the 95% t-interval of that mean over seeds (training randomness);
* ``ci95_episodes``: a single run's 95% interval over its test episodes, averaged over seeds (what a paper
  reporting one run prints: evaluation noise only).
"""

from __future__ import annotations

import math

import pandas as pd

__all__ = ["AVERAGE", "ci95", "markdown", "paired_differences", "per_seed", "summary", "t95"]

AVERAGE = "average"
# two-sided 95% Student t quantiles by degrees of freedom (1.96 beyond the table)
_T95 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    12: 2.179,
    15: 2.131,
    20: 2.086,
    30: 2.042,
}


def t95(dof: int) -> float:
    """The 0.975 quantile of Student's t with ``dof`` degrees of freedom (the next smaller tabled value's)."""
    if dof < 1:
        return math.nan
    return _T95[max(k for k in _T95 if k <= dof)] if dof <= 30 else 1.96


def ci95(values: pd.Series) -> float:
    """Half-width of the 95% t-interval of the mean of ``values`` (NaN for fewer than 2)."""
    n = values.count()
    return t95(n - 1) * float(values.std(ddof=1)) / math.sqrt(n) if n > 1 else math.nan


def per_seed(episodes: pd.DataFrame) -> pd.DataFrame:
    """One row per (setup, method, seed, mode) with ``accuracy`` and its episode interval, plus the average mode."""
    keys = ["setup", "method", "seed", "mode"]
    runs = (
        episodes.groupby(keys, sort=False)["accuracy"]
        .agg(accuracy="mean", ci95_episodes=lambda a: 1.96 * float(a.std(ddof=1)) / math.sqrt(a.count()))
        .reset_index()
    )
    average = (
        runs.groupby(keys[:3], sort=False)
        .agg(
            accuracy=("accuracy", "mean"),
            ci95_episodes=("ci95_episodes", lambda c: math.sqrt(float((c**2).sum())) / c.count()),  # independent modes
        )
        .reset_index()
    )
    average["mode"] = AVERAGE
    return pd.concat([runs, average], ignore_index=True)


def summary(episodes: pd.DataFrame) -> pd.DataFrame:
    """One row per (setup, method, mode): ``accuracy, ci95_seeds, ci95_episodes, seeds``."""
    seeds = per_seed(episodes)
    return (
        seeds.groupby(["setup", "method", "mode"], sort=False)
        .agg(
            accuracy=("accuracy", "mean"),
            ci95_seeds=("accuracy", ci95),
            ci95_episodes=("ci95_episodes", "mean"),
            seeds=("seed", "nunique"),
        )
        .reset_index()
    )


def paired_differences(episodes: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Each method minus ``baseline`` per (setup, mode): mean difference with 95% intervals paired by seed
    (over seeds) and by episode (over every seed's episodes: the evaluation noise of the comparison)."""
    seeds = per_seed(episodes)
    base = seeds[seeds["method"] == baseline][["setup", "seed", "mode", "accuracy"]]
    by_seed = seeds[seeds["method"] != baseline].merge(base, on=["setup", "seed", "mode"], suffixes=("", "_base"))
    by_seed["difference"] = by_seed["accuracy"] - by_seed["accuracy_base"]
    rows = (
        by_seed.groupby(["setup", "method", "mode"], sort=False)["difference"]
        .agg(difference="mean", ci95_seeds=ci95, seeds="count")
        .reset_index()
    )
    base_episodes = episodes[episodes["method"] == baseline][["setup", "seed", "mode", "episode", "accuracy"]]
    paired = episodes[episodes["method"] != baseline].merge(
        base_episodes, on=["setup", "seed", "mode", "episode"], suffixes=("", "_base")
    )
    paired["difference"] = paired["accuracy"] - paired["accuracy_base"]
    per_run = paired.groupby(["setup", "method", "seed", "mode"], sort=False)["difference"].mean().reset_index()
    paired_average = per_run.groupby(["setup", "method", "seed"], sort=False)["difference"].mean().reset_index()
    paired_average["mode"] = AVERAGE
    # the episode interval of the average is over each episode's mean across modes: pair episodes by index
    episode_average = (
        paired.groupby(["setup", "method", "seed", "episode"], sort=False)["difference"].mean().reset_index()
    )
    episode_average["mode"] = AVERAGE
    pooled = pd.concat(
        [paired[["setup", "method", "mode", "difference"]], episode_average[["setup", "method", "mode", "difference"]]]
    )
    episode_ci = (
        pooled.groupby(["setup", "method", "mode"], sort=False)["difference"]
        .agg(lambda d: 1.96 * float(d.std(ddof=1)) / math.sqrt(d.count()))
        .rename("ci95_episodes")
        .reset_index()
    )
    rows = rows.merge(episode_ci, on=["setup", "method", "mode"], how="left")
    rows.insert(2, "baseline", baseline)
    return rows


def markdown(
    summary_rows: pd.DataFrame, differences: pd.DataFrame, published: dict[str, dict[str, float]], modes: list[str]
) -> str:
    """Per setup: a methods x modes table (``mean ± seeds (± episodes)``), published rows, then the differences."""
    columns = [*modes, AVERAGE]
    lines = []
    for setup, rows in summary_rows.groupby("setup", sort=False):
        seeds = int(rows["seeds"].max())
        lines += [
            f"### {setup}",
            "",
            f"Accuracy (%) on meta-test episodes: mean over {seeds} seeds ± 95% interval over "
            f"seeds (± a run's 95% interval over its episodes).",
            "",
        ]
        lines += _table(rows, columns, _cell)
        lines += [
            f"| *{method}, published* | " + " | ".join([""] * len(modes)) + f" | *{value:.2f}* |"
            for method, value in published.get(setup, {}).items()
        ]
        diff = differences[differences["setup"] == setup]
        if len(diff):
            lines += [
                "",
                f"Paired differences with {diff['baseline'].iloc[0]} (percentage points; ± 95% interval "
                f"over seeds, then over paired episodes):",
                "",
            ]
            lines += _table(diff, columns, _difference)
        lines.append("")
    return "\n".join(lines)


def _table(rows: pd.DataFrame, columns: list[str], cell) -> list[str]:
    """Markdown lines: a header, then one line per method with ``cell(row)`` under each column it has."""
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, cells in rows.groupby("method", sort=False):
        by_mode = cells.set_index("mode")
        lines.append(
            f"| {method} | " + " | ".join(cell(by_mode.loc[m]) if m in by_mode.index else "" for m in columns) + " |"
        )
    return lines


def _cell(row: pd.Series) -> str:
    seeds = "" if math.isnan(row["ci95_seeds"]) else f" ± {row['ci95_seeds']:.2f}"
    return f"{row['accuracy']:.2f}{seeds} (± {row['ci95_episodes']:.2f})"


def _difference(row: pd.Series) -> str:
    seeds = "" if math.isnan(row["ci95_seeds"]) else f" ± {row['ci95_seeds']:.2f}"
    return f"{row['difference']:+.2f}{seeds} (± {row['ci95_episodes']:.2f})"
