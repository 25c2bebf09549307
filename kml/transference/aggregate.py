"""Aggregating transference records (pandas) into mode-by-mode tables and matrices with 95% intervals.

The pairs of one meta-batch share its tasks, so they are not independent draws: a cell's interval counts each
sampling unit once (the ``(step, batch)`` of the records: a meta-batch, or one source task in the paper's
design) with the cluster-robust t interval of :func:`kml.transference.stats.mean_estimate`. ``count`` is the
number of pairs, ``n`` the number of units behind the interval.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from kml.errors import KMLError
from kml.transference.analyzer import DIAGNOSTIC_COLUMNS, REQUIRED_COLUMNS
from kml.transference.stats import mean_estimate

__all__ = ["UNIT", "cross_pairs", "load_records", "mode_matrix", "mode_pair_stats", "source_modes", "target_modes"]

# The columns that name a sampling unit: the meta-batch the records came from (in the paper's design, the source).
UNIT = ("step", "batch")


def load_records(path: str | os.PathLike) -> pd.DataFrame:
    """Read ``transference.csv`` (a file, or a run folder holding one).

    Tables written before the diagnostics existed load with those columns empty (``lookahead``: ``sgd``, the
    only lookahead then).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "transference.csv"
    if not path.is_file():
        raise KMLError(f"no transference table at {path}; record one with kml-train --transference-every N")
    frame = pd.read_csv(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise KMLError(f"{path} lacks transference columns {missing}; it is not a table kml wrote")
    for column in DIAGNOSTIC_COLUMNS:
        if column not in frame.columns:
            frame[column] = "sgd" if column == "lookahead" else math.nan
    frame["self_pair"] = frame["self_pair"].astype(bool)
    return frame


def cross_pairs(records: pd.DataFrame, include_self: bool = False) -> pd.DataFrame:
    """The records without self pairs (a task's transference onto itself), unless ``include_self``."""
    return records if include_self else records[~records["self_pair"].astype(bool)]


def _modes(records: pd.DataFrame, column: str) -> list[str]:
    """The modes of ``column`` in one order for both axes: of first appearance as source, then as target."""
    present = set(records[column])
    return [m for m in dict.fromkeys([*records["mode_i"], *records["mode_j"]]) if m in present]


def source_modes(records: pd.DataFrame) -> list[str]:
    """The records' source modes (first appearance, sources before targets: the same order as the targets)."""
    return _modes(records, "mode_i")


def target_modes(records: pd.DataFrame) -> list[str]:
    """The records' target modes (in the order of :func:`source_modes`)."""
    return _modes(records, "mode_j")


def mode_pair_stats(
    records: pd.DataFrame, by_step: bool = False, include_self: bool = False, level: float = 0.95
) -> pd.DataFrame:
    """Per ordered mode pair (and step): ``mean``, ``std`` (of the pairs), ``count`` (pairs), ``n`` (units),
    ``ci_low``/``ci_high`` (the ``level`` interval of the mean over units), ``p`` (of ``mean = 0``) and
    ``positive`` (fraction of pairs with Z > 0). Self pairs are left out unless ``include_self``.
    """
    keys = ["step", "mode_i", "mode_j"] if by_step else ["mode_i", "mode_j"]
    frame = cross_pairs(records, include_self)
    rows = []
    for key, cell in frame.groupby(keys, sort=True):
        units = list(zip(*(cell[c] for c in UNIT)))
        estimate = mean_estimate(cell["Z"].to_numpy(dtype=float), units, level)
        rows.append(
            {
                **dict(zip(keys, key)),
                "mean": float(cell["Z"].mean()),
                "std": float(cell["Z"].std()),
                "count": len(cell),
                "n": estimate.n,
                "ci_low": estimate.low,
                "ci_high": estimate.high,
                "p": estimate.p,
                "positive": float((cell["Z"] > 0).mean()),
            }
        )
    columns = [*keys, "mean", "std", "count", "n", "ci_low", "ci_high", "p", "positive"]
    return pd.DataFrame(rows, columns=columns)


def mode_matrix(
    records: pd.DataFrame, stat: str = "mean", include_self: bool = False, modes: list[str] | None = None
) -> pd.DataFrame:
    """Mode-by-mode matrix of a column of :func:`mode_pair_stats` (rows: source mode i, columns: target mode j).

    Rows are the records' source modes, columns their target modes (both ``modes`` when given); a pair without
    records is NaN (``count`` and ``n``: 0).
    """
    stats = mode_pair_stats(records, include_self=include_self)
    if stat not in stats.columns:
        raise KMLError(f"unknown statistic {stat!r}; choose one of {', '.join(stats.columns[2:])}")
    matrix = stats.pivot(index="mode_i", columns="mode_j", values=stat)
    rows, columns = (modes, modes) if modes else (source_modes(records), target_modes(records))
    matrix = matrix.reindex(index=rows, columns=columns)
    if stat in ("count", "n"):
        matrix = matrix.fillna(0).astype(int)
    matrix.index.name, matrix.columns.name = "source mode", "target mode"
    return matrix
