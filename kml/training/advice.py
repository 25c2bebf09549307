"""What a training error advises, said without a command line.

Messages name settings as the caller wrote them (:func:`kml.errors.setting`, :func:`switch`). Where the remedy is
to continue the run another way (from another of its checkpoints, with a changed setting), the error is a
:class:`ContinueRun`: it carries the run, the checkpoint and the changes, says the remedy in Python, and a command
line (``kml-train``: :func:`kml.cli.common.continue_command`) puts its own command in that place.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kml.errors import KMLError, setting

__all__ = ["continue_from", "ContinueRun", "newest_step_checkpoint", "RunStopped", "switch"]


def switch(name: str) -> str:
    """How a message says "turn on ``name``": ``--overwrite`` on a command line, ``overwrite=True`` in Python."""
    text = setting(name)
    return text if text.startswith("--") else f"{text}=True"


class RunStopped(KMLError):
    """A one-line error that stops a run and refers to what its folder holds (its last.pt, how to continue it): a
    run that stops so before its first step keeps its folder (any other failed start removes the folder it made)."""


class ContinueRun(RunStopped):
    """A one-line error whose remedy is to continue the run in ``run_dir``: from ``checkpoint`` (one of its own,
    instead of ``last.pt``) and with ``changes`` to its settings (``{"lr": 0.0001}``).

    The message is ``before + how + after``, ``how`` being ``python`` (the remedy in Python); :meth:`worded` puts
    another ``how`` (a command) in its place.
    """

    def __init__(
        self,
        before: str,
        run_dir: str | os.PathLike,
        *,
        python: str,
        changes: Mapping[str, Any] | None = None,
        checkpoint: str | os.PathLike | None = None,
        after: str = "",
    ) -> None:
        self.before, self.python, self.after = before, python, after
        self.run_dir = Path(run_dir)
        self.changes = dict(changes or {})
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        super().__init__(f"{before}{python}{after}")

    def worded(self, how: str) -> KMLError:
        """The same message with ``how`` (e.g. a command line) as the remedy."""
        return KMLError(f"{self.before}{how}{self.after}")


def continue_from(before: str, run_dir: Path, checkpoint: Path) -> ContinueRun:
    """``before``, then how to continue ``run_dir`` from ``checkpoint``, one of its step checkpoints."""
    last = run_dir / "checkpoints" / "last.pt"
    return ContinueRun(before, run_dir, checkpoint=checkpoint, python=f"copy {checkpoint} to {last}, then resume=True")


def newest_step_checkpoint(run_dir: Path, other_than: Path | None = None) -> Path | None:
    """The run's periodic checkpoint of the highest step (other than ``other_than``), or ``None``: what advice
    names instead of starting again (never advise deleting checkpoints that exist)."""
    steps = []
    for path in (run_dir / "checkpoints").glob("step_*.pt"):
        found = re.fullmatch(r"step_(\d+)\.pt", path.name)
        if found and path != other_than:
            steps.append((int(found[1]), path))
    return max(steps)[1] if steps else None
