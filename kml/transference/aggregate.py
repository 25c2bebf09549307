"""Aggregating transference records (pandas) into mode-by-mode tables and matrices."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from kml.transference.analyzer import COLUMNS

__all__ = ["cross_pairs", "load_records", "mode_matrix", "mode_pair_stats"]


def load_records(path: str | os.PathLike) -> pd.DataFrame:
    """Read ``transference.csv`` (a file, or a run folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "transference.csv"
    frame = pd.read_csv(path)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks transference columns {missing}")
    return frame


def cross_pairs(records: pd.DataFrame, include_self: bool = False) -> pd.DataFrame:
    """The records without self pairs (a task's transference onto itself), unless ``include_self``."""
    return records if include_self else records[~records["self_pair"].astype(bool)]


def mode_pair_stats(records: pd.DataFrame, by_step: bool = False, include_self: bool = False) -> pd.DataFrame:
    """Per ordered mode pair (and step): mean, std, count and fraction positive of Z.

    Self pairs (a task onto itself) are left out unless ``include_self``.
    """
    keys = ["step", "mode_i", "mode_j"] if by_step else ["mode_i", "mode_j"]
    frame = cross_pairs(records, include_self)
    grouped = frame.groupby(keys, sort=True)["Z"]
    stats = grouped.agg(mean="mean", std="std", count="count")
    stats["positive"] = grouped.apply(lambda z: float((z > 0).mean()))
    return stats.reset_index()


def mode_matrix(
    records: pd.DataFrame, stat: str = "mean", include_self: bool = False, modes: list[str] | None = None
) -> pd.DataFrame:
    """Mode-by-mode matrix of a statistic (rows: source mode i, columns: target mode j)."""
    stats = mode_pair_stats(records, include_self=include_self)
    matrix = stats.pivot(index="mode_i", columns="mode_j", values=stat)
    order = modes or list(dict.fromkeys([*records["mode_i"], *records["mode_j"]]))
    matrix = matrix.reindex(
        index=[m for m in order if m in matrix.index], columns=[m for m in order if m in matrix.columns]
    )
    matrix.index.name, matrix.columns.name = "source mode", "target mode"
    return matrix
