"""A run's metrics: its CSV files (``metrics.csv``, ``validation.csv``, ``transference.csv``) and TensorBoard events.

Rows are appended as the run goes, put on disk before each checkpoint that counts them (:meth:`MetricsLog.sync`),
and on resume cut back to the checkpoint's step (:meth:`MetricsLog.truncate`; TensorBoard's later events are
purged), so a resumed run logs each step once. A failed write (a full disk) is the run's one-line error.

Accuracies are in percent in every file (:data:`ACCURACY_UNIT`), as ``kml-eval`` reports them; lines end in LF.
A run begun before 0.3 logged ``metrics.csv``'s accuracies as fractions: resumed, its rows are converted to percent
(:meth:`MetricsLog.truncate`), so no file mixes units.
"""

from __future__ import annotations

import csv
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kml.files import continue_advice, write_failure

__all__ = ["ACCURACY_UNIT", "MetricsLog", "RUN_CSVS", "add_to_window", "new_window", "percent", "window_row"]

# The CSV files a run appends to (truncated on resume to the checkpoint's step, synced at each checkpoint).
RUN_CSVS = ("metrics.csv", "validation.csv", "transference.csv")
# The unit of every accuracy a run logs (a checkpoint records it: one without it logged metrics.csv in fractions).
ACCURACY_UNIT = "percent"
# The files this module writes: always LF line endings (another writer's file keeps its own when cut back).
OWN_CSVS = ("metrics.csv", "validation.csv")


def percent(fraction: float) -> float:
    """An accuracy in [0, 1] as the percent a CSV row holds (4 decimals, as validation.csv and kml-eval)."""
    return round(100.0 * fraction, 4)


def _step_of(row: dict[str, str]) -> int | None:
    try:
        return int(row["step"])
    except (KeyError, TypeError, ValueError):
        return None


# A TensorBoard writer thread's failed write (a full disk) reaches the main thread at the next add_scalar or
# flush, where it becomes the run's one-line error; the thread's own traceback would only repeat it.
def _quiet_tensorboard_thread_errors() -> None:
    if getattr(threading.excepthook, "_kml_quiet", False):
        return
    previous = threading.excepthook

    def hook(args: Any) -> None:
        if not (type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError)):
            previous(args)

    hook._kml_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class MetricsLog:
    """The CSV files and TensorBoard events of the run in ``run_dir``; only the main process (``is_main``) writes."""

    def __init__(self, run_dir: Path, is_main: bool = True) -> None:
        self.run_dir = run_dir
        self.is_main = is_main
        self.tensorboard: Any = None  # a SummaryWriter once opened (tensorboard installed, main process)

    def open_tensorboard(self, purge_step: int | None, logger: logging.Logger) -> None:
        """Start TensorBoard events; on resume, ``purge_step`` hides those a killed run logged after its checkpoint
        (they are logged again, as the CSV rows are)."""
        if not self.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        _quiet_tensorboard_thread_errors()
        try:
            self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step)
        except (OSError, RuntimeError) as error:  # e.g. a full disk: train on, the CSV files hold the metrics
            logger.info("no TensorBoard events: %s", error)

    def _tensorboard_write(self, write: Callable[[Any], object]) -> None:
        """``write(writer)`` if TensorBoard is on; a failed write (a full disk) is one line."""
        if self.tensorboard is None:
            return
        try:
            write(self.tensorboard)
        except OSError as error:
            raise write_failure(self.run_dir / "tensorboard", error, continue_advice()) from None

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """TensorBoard scalars ``{tag: value}`` at ``step``."""
        self._tensorboard_write(lambda board: [board.add_scalar(tag, value, step) for tag, value in values.items()])

    def flush(self) -> None:
        """TensorBoard's events so far on disk; a failed write is one line."""
        self._tensorboard_write(lambda board: board.flush())

    def close(self) -> None:
        """Close TensorBoard's writer (a run folder about to be removed)."""
        if self.tensorboard is not None:
            try:
                self.tensorboard.close()
            except OSError:
                pass
            self.tensorboard = None

    def flush_quietly(self) -> None:
        """The events so far on disk, also after an exception (a later fit adds more)."""
        if self.tensorboard is not None:
            try:
                self.tensorboard.flush()
            except OSError:
                pass  # reported by the write that failed first

    def append(self, name: str, columns: list[str], rows: list[dict[str, Any]]) -> None:
        """Append ``rows`` to the run's CSV file ``name``, its header first when the file is new or empty."""
        path = self.run_dir / name
        try:
            with path.open("a", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
                if handle.tell() == 0:
                    writer.writeheader()
                writer.writerows(rows)
        except OSError as error:
            raise write_failure(path, error, continue_advice()) from None

    def training_row(self, row: dict[str, Any]) -> None:
        """A metrics.csv row (its keys the columns: step, loss, accuracy and accuracy per mode in percent, lr, time)
        and its TensorBoard scalars (``train/...``; a mode without tasks in the window has ``""``, no point)."""
        self.append("metrics.csv", list(row), [row])
        self.scalars({f"train/{k}": v for k, v in row.items() if k not in ("step", "time") and v != ""}, row["step"])

    def validation_rows(self, step: int, results: Sequence[Any]) -> None:
        """validation.csv rows and TensorBoard scalars of ``results`` (:class:`~kml.evaluation.ModeResult` per mode
        and their average) at ``step``."""
        self.scalars({f"val/accuracy_{r.mode}": r.accuracy for r in results}, step)
        rows = [
            {"step": step, "mode": r.mode, "accuracy": f"{r.accuracy:.4f}", "ci95": f"{r.ci95:.4f}"} for r in results
        ]
        self.append("validation.csv", ["step", "mode", "accuracy", "ci95"], rows)

    def sync(self) -> None:
        """Put the rows and events logged so far on disk before a checkpoint says they were logged."""
        for name in RUN_CSVS:
            path = self.run_dir / name
            try:
                if path.is_file():
                    with path.open("a") as handle:
                        os.fsync(handle.fileno())
            except OSError as error:
                raise write_failure(path, error, continue_advice()) from None
        self.flush()

    def truncate(self, step: int, fraction_rows: bool = False) -> bool:
        """Drop rows logged after ``step``, the checkpoint a run resumes from (they will be logged again); lines
        of metrics.csv and validation.csv end in LF. ``fraction_rows``: the checkpoint predates percent (it
        records no unit), so metrics.csv's accuracies are converted from fractions, if they are fractions (all
        at most 1: a file converted already, by a resume killed before its next checkpoint, is left as it is).
        Returns whether rows were converted."""
        if not self.is_main:
            return False
        converted = False
        for name in RUN_CSVS:
            path = self.run_dir / name
            if path.is_file():
                scale = fraction_rows and name == "metrics.csv"
                converted |= _truncate_csv(path, step, "\n" if name in OWN_CSVS else None, scale)
        return converted


def _accuracy_columns(columns: Sequence[str]) -> list[str]:
    return [c for c in columns if c == "accuracy" or c.startswith("accuracy_")]


def _to_percent(rows: list[dict[str, str]], columns: Sequence[str]) -> bool:
    """Convert the accuracy columns of ``rows`` in place from fractions to percent when every value is a fraction
    (at most 1); returns whether it did."""
    accuracy = _accuracy_columns(columns)
    try:
        values = [float(row[c]) for row in rows for c in accuracy if row.get(c) not in ("", None)]
    except ValueError:
        return False
    if not values or max(values) > 1.0:
        return False
    for row in rows:
        for c in accuracy:
            if row.get(c) not in ("", None):
                row[c] = str(percent(float(row[c])))  # as the csv module writes the float of a new row
    return True


def _truncate_csv(path: Path, step: int, lineterminator: str | None, fraction_rows: bool = False) -> bool:
    """Keep the rows of ``path`` up to ``step``, written aside and renamed (a kill meanwhile loses no row), with
    ``lineterminator`` (``None``: the file's own); ``fraction_rows``: accuracies converted to percent if they are
    fractions. Returns whether rows were converted."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with path.open(newline="") as handle:  # line endings as written
            text = handle.read()
        if lineterminator is None:
            lineterminator = "\r\n" if "\r\n" in text[: text.find("\n") + 1] else "\n"
        if text and not text.endswith("\n"):  # a row cut by a kill: drop it (it is logged again)
            text = text[: text.rfind("\n") + 1]
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames:  # killed before its header was written: the next row writes it
            path.unlink()
            return False
        rows = [row for row in reader if _step_of(row) is not None and _step_of(row) <= step]
        converted = fraction_rows and _to_percent(rows, reader.fieldnames)
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=reader.fieldnames, lineterminator=lineterminator)
            writer.writeheader()
            writer.writerows(rows)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise write_failure(path, error) from None
    return converted


def new_window(modes: int, device: str | torch.device) -> dict[str, torch.Tensor]:
    """Float64 sums since the last metrics row: ``loss [1]``, ``accuracy [M]``, ``tasks [M]``, ``steps [1]``."""
    zeros = lambda n: torch.zeros(n, dtype=torch.float64, device=device)  # noqa: E731
    return {"loss": zeros(1), "accuracy": zeros(modes), "tasks": zeros(modes), "steps": zeros(1)}


def window_row(
    window: Mapping[str, torch.Tensor], step: int, mode_names: Sequence[str], lr: float, seconds: float
) -> dict[str, Any]:
    """A metrics.csv row from a window's sums (:func:`new_window`), accuracies in percent as validation.csv and
    kml-eval; a mode without tasks in the window gets ``""``."""
    tasks = window["tasks"].clamp(min=1)
    per_mode = zip(mode_names, (window["accuracy"] / tasks).tolist(), window["tasks"].tolist())
    return {
        "step": step,
        "loss": float(window["loss"] / window["steps"].clamp(min=1)),
        "accuracy": percent(float(window["accuracy"].sum() / tasks.sum())),
        **{f"accuracy_{m}": percent(a) if n > 0 else "" for m, a, n in per_mode},
        "lr": lr,
        "time": round(seconds, 3),
    }


def add_to_window(
    window: dict[str, torch.Tensor], loss: torch.Tensor, mode: torch.Tensor, accuracy: torch.Tensor, counts_loss: bool
) -> None:
    """Add one step to ``window`` (:func:`new_window`): the meta-batch's ``loss`` (once over ranks: ``counts_loss``
    on the main one) and each task's ``accuracy [T]`` by its ``mode [T]``."""
    with torch.no_grad():
        modes = window["tasks"].numel()
        window["loss"] += loss if counts_loss else 0.0
        window["steps"] += 1.0 if counts_loss else 0.0
        window["accuracy"] += torch.zeros(modes, dtype=torch.float64, device=window["tasks"].device).index_add_(
            0, mode, accuracy.double()
        )
        window["tasks"] += torch.bincount(mode, minlength=modes).double()
