"""Comparing the transference of two runs (e.g. MAML and KML) pair by pair, on identical episodes.

Two runs recorded with the same seed, modes, N, K, Q and meta-batch (``kml-train --transference-every N`` with one
``--seed``, or ``kml-transference --seed S`` on both checkpoints) analyse the same seeded meta-batches, so every
record of one has a twin in the other (same step, batch, tasks and classes). A cell's difference ``Z_B - Z_A`` is
then tested pair by pair: the paired t test over sampling units (:mod:`kml.transference.aggregate`).
"""

from __future__ import annotations

import pandas as pd

from kml.errors import KMLError
from kml.transference.aggregate import UNIT, cross_pairs
from kml.transference.stats import paired_t_test

__all__ = ["MATCH", "paired_comparison", "paired_records"]

# What makes two records the same ordered pair of the same episode.
MATCH = ("step", "batch", "task_i", "task_j", "mode_i", "mode_j", "classes_i", "classes_j")


def paired_records(a: pd.DataFrame, b: pd.DataFrame, include_self: bool = False) -> pd.DataFrame:
    """The records of both runs joined pair by pair: the :data:`MATCH` columns, ``Z_a`` and ``Z_b``.

    Raises a one-line :class:`~kml.errors.KMLError` when the runs share no episode, or when the same
    (step, batch, task) holds other classes in the two (episodes drawn differently).
    """
    left, right = (cross_pairs(r, include_self)[[*MATCH, "Z"]] for r in (a, b))
    position = ["step", "batch", "task_i", "task_j"]
    joined = left.merge(right, on=position, suffixes=("_a", "_b"))
    if joined.empty:
        raise KMLError(
            "the two runs share no recorded episode (step, batch, task pair); record both with the same seed, "
            "modes, ways, shots, queries and meta-batch"
        )
    differ = [c for c in MATCH if c not in position and (joined[f"{c}_a"] != joined[f"{c}_b"]).any()]
    if differ:
        raise KMLError(
            f"the two runs' episodes differ ({', '.join(differ)} of the same step, batch and task pair); "
            f"record both with the same seed, modes, ways, shots, queries and meta-batch"
        )
    joined = joined.rename(columns={f"{c}_a": c for c in MATCH if c not in position})
    return joined[[*MATCH, "Z_a", "Z_b"]]


def paired_comparison(
    a: pd.DataFrame, b: pd.DataFrame, by_step: bool = False, include_self: bool = False, level: float = 0.95
) -> pd.DataFrame:
    """Per ordered mode pair (and step), on the pairs both runs recorded: ``mean_a``, ``mean_b``, ``difference``
    (``mean_b - mean_a``), its ``ci_low``/``ci_high``, ``t`` and two-sided ``p`` of the paired test, ``n`` (units)
    and ``count`` (pairs)."""
    joined = paired_records(a, b, include_self)
    keys = ["step", "mode_i", "mode_j"] if by_step else ["mode_i", "mode_j"]
    rows = []
    for key, cell in joined.groupby(keys, sort=True):
        test = paired_t_test(cell["Z_a"].tolist(), cell["Z_b"].tolist(), list(zip(*(cell[c] for c in UNIT))), level)
        rows.append(
            {
                **dict(zip(keys, key)),
                "mean_a": float(cell["Z_a"].mean()),
                "mean_b": float(cell["Z_b"].mean()),
                "difference": test.mean,
                "ci_low": test.low,
                "ci_high": test.high,
                "t": test.t,
                "p": test.p,
                "n": test.n,
                "count": test.count,
            }
        )
    columns = [*keys, "mean_a", "mean_b", "difference", "ci_low", "ci_high", "t", "p", "n", "count"]
    return pd.DataFrame(rows, columns=columns)
