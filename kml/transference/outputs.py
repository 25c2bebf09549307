"""Writing a transference table's figures and summary beside it: what ``kml-train --transference-every N``
leaves in the run folder at the end of a run, and what ``kml-transference`` writes."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from kml.errors import KMLError
from kml.transference.aggregate import load_records, mode_pair_stats
from kml.transference.diagnostics import linearisation_warning

__all__ = ["write_figures", "write_transference_outputs"]


def write_figures(records: pd.DataFrame, csv_path: str | os.PathLike, bins: int = 30) -> list[Path]:
    """The PNG figures of ``records`` and ``<stem>_summary.csv`` (per step and mode pair: mean, 95% interval,
    n) beside ``csv_path``, named after it; a failed write is a one-line :class:`~kml.errors.KMLError`."""
    from kml.transference.plots import save_all  # matplotlib loads only when figures are drawn

    csv_path = Path(csv_path)
    summary = csv_path.with_name(f"{csv_path.stem}_summary.csv")
    try:
        mode_pair_stats(records, by_step=True).to_csv(summary, index=False)
        return [summary, *save_all(records, csv_path.parent, prefix=csv_path.stem, bins=bins)]
    except OSError as error:
        raise KMLError(f"cannot write {error.filename or csv_path.parent}: {error.strerror or error}") from None


def write_transference_outputs(run_dir: str | os.PathLike, warn: Callable[[str], object] | None = None) -> list[Path]:
    """Figures and summary of ``run_dir/transference.csv`` (recorded by ``--transference-every``), beside it.

    Returns the written paths (none when the run recorded no transference). A linearisation warning
    (:func:`~kml.transference.diagnostics.linearisation_warning`) goes to ``warn`` (default:
    :func:`warnings.warn`), e.g. a trainer's ``logger.warning``.
    """
    path = Path(run_dir) / "transference.csv"
    if not path.is_file():
        return []
    records = load_records(path)
    if records.empty:
        return []
    message = linearisation_warning(records)
    if message:
        (warn or (lambda text: warnings.warn(text, stacklevel=3)))(message)
    return write_figures(records, path)
