"""Where each run of a results grid stands, read from its files: a grid's state is on disk, not in a process.

Next to each run folder ``seed<k>/`` (:mod:`kml.results.runs`):

* ``seed<k>.job.json``: the job a launcher submitted for it (launcher, job id, log file), written when submitted;
* ``seed<k>.state.json``: what that job recorded itself (running, requeued, stopped by a signal, done, failed
  with its error line).

A run is ``done`` when its evaluation report is at the asked step, episodes and seed; ``failed`` when its job
recorded an error or ended without finishing; ``pending`` (queued or requeued) or ``running`` while the scheduler
has it; ``missing`` when no job was submitted for it (or an earlier one asked for other steps).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kml.files import write_json
from kml.results.runs import Run, _read_json, _report_problem

__all__ = [
    "finished_report",
    "format_table",
    "job_record",
    "record_state",
    "record_submission",
    "RunStatus",
    "run_status",
    "STATES",
]

STATES = ("done", "running", "pending", "failed", "missing")


@dataclass(frozen=True)
class RunStatus:
    """One row of the status table: the run, its state (one of :data:`STATES`), the step of its last checkpoint
    (``None``: none yet), its job id and log file (``None`` when no job was submitted), and for a failed run the
    last line of its error."""

    run: Run
    state: str
    step: int | None = None
    job_id: str | None = None
    log: str | None = None
    error: str | None = None


def _job_file(run: Run) -> Path:
    return run.folder.parent / f"{run.folder.name}.job.json"


def _state_file(run: Run) -> Path:
    return run.folder.parent / f"{run.folder.name}.state.json"


def record_submission(run: Run, launcher: str, job_id: str, log: Path, steps: int) -> None:
    """Write ``seed<k>.job.json``: ``run`` was submitted as ``job_id`` of ``launcher`` (to train to ``steps``)."""
    run.folder.parent.mkdir(parents=True, exist_ok=True)
    write_json(
        _job_file(run),
        {
            "launcher": launcher,
            "job_id": job_id,
            "log": str(log),
            "steps": steps,
            "host": socket.gethostname(),
            "submitted": time.time(),
        },
    )


def record_state(run: Run, state: str, job_id: str, **details: Any) -> None:
    """Write ``seed<k>.state.json`` from inside the job: ``state`` (running, requeued, done, failed) and details
    (``error``: the failure's one line)."""
    values = {"state": state, "job_id": job_id, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    write_json(_state_file(run), {**values, **details})


def job_record(run: Run) -> dict[str, Any] | None:
    """``seed<k>.job.json`` as written by :func:`record_submission`, or ``None`` (none, or unreadable)."""
    return _mapping(_job_file(run))


def _mapping(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    value, problem = _read_json(path)
    return value if problem is None and isinstance(value, dict) else None


def finished_report(run: Run, steps: int, episodes: int, eval_seed: int) -> dict[str, Any] | None:
    """The run's evaluation report when it is that of a run trained to ``steps`` on these episodes, else ``None``."""
    report = _mapping(run.evaluation)
    if report is None or _report_problem(report):
        return None
    asked = (steps, episodes, eval_seed)
    return report if (report.get("step"), report.get("episodes_per_mode"), report.get("seed")) == asked else None


def _checkpoint_step(run: Run) -> int | None:
    """The step of the run's last checkpoint (``None``: none, or unreadable while being replaced)."""
    from kml.errors import KMLError
    from kml.results.runs import _trained_step

    try:
        return _trained_step(run)
    except (KMLError, OSError):
        return None


def last_error_line(log: Path) -> str | None:
    """The last line of ``log`` that is the job's own (submitit's logger lines left out), or ``None``."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    own = [line.strip() for line in lines if line.strip() and not line.startswith("submitit ")]
    return own[-1] if own else None


def run_status(
    run: Run, steps: int, episodes: int, eval_seed: int, scheduler: Mapping[str, str] | None = None
) -> RunStatus:
    """Where ``run`` stands. ``scheduler`` maps job ids to what the launcher knows of them: ``pending``,
    ``running``, ``ended``, or ``unknown`` (then the job's own record decides)."""
    report = finished_report(run, steps, episodes, eval_seed)
    job = job_record(run)
    if report is not None:
        return RunStatus(run, "done", int(report["step"]), *((str(job["job_id"]), str(job["log"])) if job else ()))
    step = _checkpoint_step(run)
    if job is None or job.get("steps") != steps:  # never submitted, or for another budget: to submit
        return RunStatus(run, "missing", step)
    job_id, log = str(job["job_id"]), str(job["log"])
    state = _mapping(_state_file(run)) or {}
    recorded = state.get("state") if str(state.get("job_id")) == job_id else None
    known = (scheduler or {}).get(job_id, "unknown")
    # stopped by a signal (SIGTERM): requeued when the scheduler still has it (Slurm's own preemption), else failed
    if recorded == "failed" or (recorded == "stopped" and known not in ("pending", "running")):
        return RunStatus(run, "failed", step, job_id, log, str(state.get("error") or recorded))
    if recorded == "done":  # its evaluation is missing or was made for other episodes
        return RunStatus(run, "missing", step, job_id, log)
    if known == "ended":
        error = last_error_line(Path(log)) or f"job {job_id} ended before recording an outcome"
        return RunStatus(run, "failed", step, job_id, log, error)
    running = known == "running" or (known == "unknown" and recorded == "running")
    return RunStatus(run, "running" if running else "pending", step, job_id, log)


def format_table(statuses: list[RunStatus]) -> str:
    """The status table: one line per run, each failed run's error below it, then the counts per state."""
    header = ("run", "state", "step", "job", "log")
    rows = [
        (
            f"{s.run.setup.tag} {s.run.method.label} seed{s.run.seed}",
            s.state,
            "-" if s.step is None else str(s.step),
            s.job_id or "-",
            s.log or "-",
        )
        for s in statuses
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row, status in zip([header, *rows], [None, *statuses]):
        lines.append("  ".join([*(cell.ljust(width) for cell, width in zip(row, widths)), row[-1]]).rstrip())
        if status is not None and status.error:
            lines.append(f"    error: {status.error}")
    counts = ", ".join(f"{n} {state}" for state in STATES if (n := sum(s.state == state for s in statuses)))
    lines.append(f"{len(statuses)} run{'' if len(statuses) == 1 else 's'}: {counts}")
    return "\n".join(lines)
