"""A run's folder: one writer at a time (its lock), a new run (over an old one with overwrite) or a continued one,
its ``config.json``, ``log.txt``, metrics (:class:`~kml.training.metrics_log.MetricsLog`) and ``checkpoints/``.

Messages name resuming and overwriting as the caller does (``--resume`` on a command line, ``resume=True`` in
Python) and never advise deleting a checkpoint that exists.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kml.config.run import RunConfig
from kml.errors import KMLError, setting
from kml.files import continue_advice, resume_words, write_failure, write_json
from kml.training.advice import continue_from, newest_step_checkpoint, switch
from kml.training.checkpoint import load_checkpoint, remove_stale_temp_files
from kml.training.distributed import barrier
from kml.training.metrics_log import MetricsLog
from kml.training.run_lock import RunLock
from kml.training.run_record import CUSTOM_KEYS, versions

if TYPE_CHECKING:
    from kml.training.trainer import Trainer

__all__ = [
    "check_printable",
    "continue_loaded_run",
    "load_for_resume",
    "prune_step_checkpoints",
    "refuse_resume_without_last",
    "remove_failed_start",
    "replaces_existing",
    "RunFolder",
    "RunLog",
    "start_new_run",
    "take_run",
]


def check_printable(run_dir: Path) -> Path:
    """Refuse control characters (a newline, a tab) in a run folder's path: messages and commands name it on one line."""
    if any(ord(c) < 32 or ord(c) == 127 for c in str(run_dir)):
        raise KMLError(
            f"the run folder {str(run_dir)!r} holds a control character (a newline, a tab...); choose a "
            f"{setting('run_name')} and {setting('train_dir')} of printable characters"
        )
    return run_dir


def refuse_resume_without_last(run_dir: Path) -> None:
    """A run without last.pt but with step checkpoints: name the newest instead of advising to start again."""
    newest = newest_step_checkpoint(run_dir)
    if newest is not None:  # never advise deleting checkpoints that exist
        before = f"cannot resume {run_dir}: it has no checkpoints/last.pt, but has {newest.name}; continue from it: "
        raise continue_from(before, run_dir, newest)


def load_for_resume(run_dir: Path, path: Path, device: str) -> dict[str, Any]:
    """``load_checkpoint(path)``; a damaged file's error says how to continue from another of the run's checkpoints."""
    try:
        return load_checkpoint(path, device)
    except KMLError as error:
        newest = newest_step_checkpoint(run_dir, other_than=path)
        if newest is None:
            raise
        raise continue_from(f"{error}; to continue from {newest.name}: ", run_dir, newest) from None


def replaces_existing(run_dir: Path, overwrite: bool, name: str) -> bool:
    """True when ``run_dir`` holds a run that ``overwrite`` will replace; a one-line error when it may not.
    ``name`` is how messages name the choice of folder (``--run-name``, ``run_dir``)."""
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise KMLError(
            f"{run_dir} exists and is not a run folder (a file or a link); move it away or choose another {name}"
        )
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return False
    if not overwrite:
        if (run_dir / "checkpoints" / "last.pt").is_file():
            raise KMLError(
                f"run {run_dir} already exists; pass {resume_words()} to continue it or {switch('overwrite')} to delete "
                f"it and start again"
            )
        newest = newest_step_checkpoint(run_dir)
        if newest is not None:  # never advise deleting checkpoints that exist
            before = f"run {run_dir} already exists and has no last.pt, but has {newest.name}; continue from it: "
            raise continue_from(before, run_dir, newest)
        raise KMLError(
            f"run {run_dir} already exists but has no checkpoint to resume (it stopped before its first save); "
            f"add {switch('overwrite')} to delete it and start again"
        )
    problem = _not_a_kml_run(run_dir)
    if problem:
        raise KMLError(
            f"{run_dir} is not a kml run folder ({problem}); {switch('overwrite')} deletes only kml runs: "
            f"move it away or choose another {name}"
        )
    return True


def _not_a_kml_run(run_dir: Path) -> str | None:
    """Why ``run_dir`` is not a kml run that overwrite may delete, or ``None`` when it is one: its config.json
    reads as a kml run config (or, that file lost, its checkpoints/last.pt is a kml checkpoint)."""
    config = run_dir / "config.json"
    try:
        values = json.loads(config.read_bytes())
        if isinstance(values, dict) and isinstance(values.get("custom_learner"), str):  # a Python Trainer's run
            return None if set(values) <= CUSTOM_KEYS else f"{config.name} has keys no kml run has"
        if not (isinstance(values, dict) and {"modes", "learner"} <= set(values)):  # kml writes every field
            return f"{config.name} is not a kml run config"
        RunConfig.load(config)
        return None
    except (OSError, ValueError, KMLError):
        reason = f"{config.name} is not a kml run config" if config.exists() else f"no {config.name}"
    try:
        load_checkpoint(run_dir / "checkpoints" / "last.pt")
        return None
    except KMLError:
        return reason


def _discard(run_dir: Path) -> None:
    """Delete the run that overwrite replaces: first renamed aside (one atomic step), then removed."""
    aside = run_dir.parent / f".{run_dir.name}.overwritten-{os.getpid()}"
    try:
        os.replace(run_dir, aside)
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            raise write_failure(aside, error) from None
        raise KMLError(
            f"cannot move the old run {run_dir} aside for {switch('overwrite')}: {error.strerror or error}"
        ) from None
    shutil.rmtree(aside, ignore_errors=True)  # leftovers (a kill meanwhile) go at the next start


class RunLog(logging.FileHandler):
    """log.txt: a failed write (a full disk) is the run's one-line error, not logging's printed traceback."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            raise write_failure(self.baseFilename, error, continue_advice()) from None
        super().handleError(record)


class RunFolder:
    """The folder of one run (``path``): its lock, config.json, log.txt (``logger``), ``metrics`` and checkpoints.

    Only the main process (``is_main``) locks and writes; under torchrun the other ranks only read.
    """

    def __init__(self, path: str | os.PathLike, is_main: bool = True) -> None:
        self.path = check_printable(Path(path))
        self.checkpoints = self.path / "checkpoints"
        self.is_main = is_main
        self.lock: RunLock | None = None  # held by the main process from taking the run to the end of fit
        # the train dir did not exist before this run's lock made it: a failed start removes it too (if empty)
        self.made_parent = False
        self.metrics = MetricsLog(self.path, is_main)
        self.logger = logging.getLogger(f"kml.train.{id(self)}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False

    def acquire(self) -> None:
        """Take the run's lock (the main process), or take it again after :meth:`release`."""
        if not self.is_main:
            return
        if self.lock is None:
            self.made_parent = not self.path.parent.exists()
            self.lock = RunLock(self.path)
        if not self.lock.held:
            self.lock.acquire()

    def release(self) -> None:
        """Let go of the run: its events so far on disk, its lock released."""
        self.metrics.flush_quietly()
        if self.lock is not None:
            self.lock.release()

    def last_for_resume(self) -> Path:
        """``checkpoints/last.pt`` to resume from, or a one-line error (naming a step checkpoint if there is one)."""
        last = self.checkpoints / "last.pt"
        if not last.is_file():
            refuse_resume_without_last(self.path)
            raise KMLError(
                f"cannot resume {self.path}: it has no checkpoints/last.pt (it never started, or stopped before its "
                f"first save); start it with resume=False{', overwrite=True' if self.path.is_dir() else ''}"
            )
        return last

    def start(self, replace: bool, record: dict[str, Any]) -> None:
        """A new run: the old one deleted (``replace``), run files opened, ``record`` written to config.json."""
        if self.is_main:
            if replace:
                _discard(self.path)
            self._open()
            self.write_config(record)

    def remove_new_run(self) -> None:
        """Remove the run folder a failed start made (and the train dir, if the start made it and it is empty):
        the corrected command then starts the run without ``overwrite``. The lock is released."""
        if not self.is_main:
            return
        for handler in list(self.logger.handlers):
            self.logger.removeHandler(handler)
            handler.close()
        self.metrics.close()
        shutil.rmtree(self.path, ignore_errors=True)  # we hold its lock
        if self.lock is not None:
            self.lock.release()
        if self.made_parent:
            try:
                self.path.parent.rmdir()  # only when empty: another run's files or lock keep it
            except OSError:
                pass

    def reopen(self, step: int, record: dict[str, Any], fraction_rows: bool = False) -> bool:
        """A run continued from its checkpoint of ``step``: files opened, rows and events logged after that step
        dropped, and ``record`` (the settings it continues with) written to config.json for a later resume.
        ``fraction_rows``: the checkpoint predates percent accuracies (:meth:`MetricsLog.truncate`); returns whether
        rows were converted."""
        if self.is_main:
            self._open(purge_step=step + 1)
            self.write_config(record)
        return self.metrics.truncate(step, fraction_rows)

    def write_config(self, record: dict[str, Any]) -> None:
        write_json(self.path / "config.json", {**record, "versions": versions()})

    def _open(self, purge_step: int | None = None) -> None:
        """Create the run folder, open log.txt and TensorBoard (its events from ``purge_step`` on dropped) and
        drop temp files a killed run left behind."""
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            handler = RunLog(self.path / "log.txt")
        except OSError as error:
            if error.errno == errno.ENAMETOOLONG:
                raise write_failure(self.path, error) from None
            raise KMLError(f"cannot write in run folder {self.path}: {error.strerror or error}") from None
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        self.logger.addHandler(handler)
        if self.lock is not None and self.lock.stale_holder:
            self.logger.info("took over the lock of %s, which ended without releasing it", self.lock.stale_holder)
        for stale in [
            *remove_stale_temp_files(self.checkpoints),
            *remove_stale_temp_files(self.path),
        ]:  # we hold the lock
            self.logger.info("removed %s, left by a process killed while writing it", stale)
        for stale in self.path.parent.glob(f".{self.path.name}.overwritten-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.metrics.open_tensorboard(purge_step, self.logger)


def take_run(trainer: Trainer, resume: bool, overwrite: bool) -> None:
    """Lock ``trainer``'s run folder, then resume the run in it or start a new one (a trainer built in Python)."""
    if resume and overwrite:
        raise KMLError("resume=True continues a run and overwrite=True starts it again; pass only one of them")
    folder = trainer.folder
    folder.acquire()
    try:
        if resume:
            last = folder.last_for_resume()
            trainer.load_state(load_for_resume(folder.path, last, trainer.device), source=last)
            continue_loaded_run(trainer)
            folder.logger.info("resumed %s at step %d", folder.path, trainer.step)
        else:
            replace = replaces_existing(folder.path, overwrite, "run_dir")
            barrier(trainer.dist)
            start_new_run(trainer, replace)  # a start that fails there removes the run folder it made
            folder.logger.info("new run %s: %s", folder.path, trainer.record())
    except BaseException:
        folder.release()
        if folder.made_parent and not resume:
            try:
                folder.path.parent.rmdir()  # the train dir its lock made, if empty
            except OSError:
                pass
        raise


def prune_step_checkpoints(
    checkpoint_dir: Path, keep: int, step: int, resumed_from: Path | None, logger: logging.Logger
) -> list[Path]:
    """Delete the periodic checkpoints (``step_*.pt``) beyond the ``keep`` newest up to ``step``; never last.pt or
    best.pt, never ``resumed_from``, never one of a later step (left by the run before a ``resume_from`` an earlier
    one). Returns the deleted files."""
    found = []
    for path in checkpoint_dir.glob("step_*.pt"):
        match = re.fullmatch(r"step_(\d+)\.pt", path.name)
        if match and int(match[1]) <= step:
            found.append((int(match[1]), path))
    protected = {os.path.realpath(resumed_from)} if resumed_from is not None else set()
    deleted = []
    for _, path in sorted(found)[: max(len(found) - keep, 0)]:
        if os.path.realpath(path) in protected:
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as error:  # a read-only file: kept, the run goes on
            logger.info("could not delete %s: %s", path, error.strerror or error)
            continue
        deleted.append(path)
    if deleted:
        logger.info("deleted %s (keep_checkpoints=%d)", ", ".join(p.name for p in deleted), keep)
    return deleted


def start_new_run(trainer: Trainer, replace: bool) -> None:
    """A new run: the old one deleted (``replace``), config.json and a step-0 last.pt written. Validation stores
    that cannot hold the run's tasks are refused first, before any folder is touched."""
    from kml.training.settings import check_validation

    check_validation(trainer)
    trainer._made_folder = trainer.dist.is_main and not replace and not trainer.folder.path.exists()
    try:
        trainer.folder.start(replace, trainer.record())
        trainer.save("last.pt")  # step 0: a run killed before its first checkpoint can still resume
    except BaseException:
        remove_failed_start(trainer)
        raise
    barrier(trainer.dist)
    trainer._taken = True


def remove_failed_start(trainer: Trainer) -> None:
    """The run folder ``trainer``'s start made, removed (its lock released): a corrected command starts it again
    as a new run."""
    if trainer._made_folder:
        trainer.folder.remove_new_run()
        trainer._made_folder = trainer._taken = False


def continue_loaded_run(trainer: Trainer) -> None:
    """After loading a checkpoint: rows and events logged after it dropped (a run begun before percent accuracies
    has its metrics.csv converted, and its checkpoint saved again to say so), config.json rewritten, periodic
    checkpoints beyond ``keep_checkpoints`` deleted."""
    if trainer.folder.reopen(trainer.step, trainer.record(), fraction_rows=trainer._fraction_rows):
        trainer.logger.info("metrics.csv: accuracies converted from fractions to percent")
        trainer.save("last.pt")  # records the unit: a later resume converts nothing
    trainer._taken = True
    trainer.prune_checkpoints()
