"""Submitting a grid's runs as jobs through submitit: ``local`` (processes on this machine, ``--jobs`` at a time,
each on its own device) or ``slurm`` (one Slurm job per run, submitted as one job array); and asking the
scheduler where the submitted jobs are.

Each job is a :class:`~kml.results.jobs.RunJob`; its id and log file go to the run's ``seed<k>.job.json``
(:func:`kml.results.status.record_submission`). submitit's own files (pickles, logs) live in ``<out>/jobs/<id>/``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kml.errors import KMLError
from kml.results.jobs import RunJob
from kml.results.status import record_submission

__all__ = ["LaunchOptions", "local_slots", "read_sbatch_options", "scheduler_states", "submit_local", "submit_slurm"]

# A local job's time limit (submitit's default is 2 minutes): a week, as the grid's runs take what they take.
WEEK_MIN = 7 * 24 * 60
# Time limits a job may reach and still be requeued from its checkpoint (submitit's default, 3, ends a long run).
MAX_TIMEOUTS = 100


@dataclass(frozen=True)
class LaunchOptions:
    """How ``kml-results`` submits runs (its flags): ``jobs`` and ``devices`` for ``local``; the rest for ``slurm``
    (``gpus_per_run`` for both: K > 1 makes each run a DDP run of K tasks)."""

    launcher: str
    jobs: int | None = None
    devices: list[str] = field(default_factory=list)
    gpus_per_run: int = 1
    timeout_min: int | None = None
    partition: str | None = None
    account: str | None = None
    cpus_per_run: int | None = None
    mem_per_run: str | None = None
    array_parallelism: int | None = None
    sbatch_options: dict[str, str] = field(default_factory=dict)
    poll_s: float = 2.0


def jobs_folder(out: Path) -> Path:
    """submitit's folder of a grid's jobs: ``<out>/jobs/<job id>/``."""
    return out / "jobs" / "%j"


def read_sbatch_options(path: str | os.PathLike) -> dict[str, str]:
    """Extra ``sbatch`` options from a file, one a line: ``--qos=high``, ``#SBATCH --constraint=a100`` or
    ``qos=high`` (blank lines and other ``#`` lines ignored); a flag without a value is ``--exclusive``."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise KMLError(f"--slurm-options {path}: {error.strerror or error}") from None
    options = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        line = line[len("#SBATCH") :].strip() if line.startswith("#SBATCH") else line
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.lstrip("-").partition("=")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", key) or (sep and not value) or " " in key:
            raise KMLError(f"--slurm-options {path}, line {number}: {raw!r} is not an sbatch option like --qos=high")
        options[key.replace("_", "-")] = value if sep else ""
    return options


def local_slots(devices: list[str], gpus_per_run: int, jobs: int | None) -> list[tuple[str, list[int]]]:
    """The local launcher's slots, one per job running at a time: ``(device, GPU indices)``, GPUs taken
    ``gpus_per_run`` at a time from ``devices`` (``cuda:N`` or ``N``; ``cpu``), in turn when ``jobs`` asks more."""
    gpus: list[int] = []
    for device in devices:
        match = re.fullmatch(r"(?:cuda:)?(\d+)", device)
        if match:
            gpus.append(int(match[1]))
        elif device != "cpu":
            raise KMLError(f"--devices {device}: name GPUs cuda:0 cuda:1 ... (or 0 1 ...), or cpu")
    if gpus and len(gpus) != len(devices):
        raise KMLError(f"--devices {' '.join(devices)}: either GPUs or cpu, not both")
    if not gpus:
        return [("cpu", [])] * (jobs or 1)
    groups = [gpus[i : i + gpus_per_run] for i in range(0, len(gpus) - gpus_per_run + 1, gpus_per_run)]
    if not groups:
        raise KMLError(f"--gpus-per-run {gpus_per_run} needs that many GPUs in --devices (given: {len(gpus)})")
    return [("cuda", groups[i % len(groups)]) for i in range(jobs or len(groups))]


def submit_local(
    jobs: list[RunJob], out: Path, options: LaunchOptions, announce: Callable[[RunJob, str], None]
) -> None:
    """Run ``jobs`` as local submitit jobs, as many at a time as there are slots (:func:`local_slots`), each on
    its slot's device; returns when all have ended (their outcome is in their run's files)."""
    import submitit

    slots = local_slots(options.devices, options.gpus_per_run, options.jobs)
    cpu_jobs = sum(device == "cpu" for device, _ in slots)
    from kml.runtime.threads import available_cpus

    threads = max(1, available_cpus() // cpu_jobs) if cpu_jobs > 1 else None  # jobs sharing the CPU share its cores
    executor = submitit.LocalExecutor(folder=jobs_folder(out), max_num_timeout=MAX_TIMEOUTS)
    # several tasks of one job are a DDP run; a job's time limit is the local executor's, by default 2 minutes
    tasks = options.gpus_per_run if options.gpus_per_run > 1 else 1
    executor.update_parameters(timeout_min=options.timeout_min or WEEK_MIN, tasks_per_node=tasks)
    executor.update_parameters(stderr_to_stdout=True)
    queue = list(jobs)
    running: dict[int, Any] = {}  # slot -> the submitit job on it
    while queue or running:
        for slot, (device, gpus) in enumerate(slots):
            if slot in running or not queue:
                continue
            job = queue.pop(0)
            job = RunJob(**{**_fields(job), "device": device, "threads": threads if device == "cpu" else None})
            executor.update_parameters(gpus_per_node=len(gpus), visible_gpus=gpus)
            submitted = executor.submit(job)
            log = submitted.paths.stdout
            record_submission(job.run, "local", str(submitted.job_id), log, job.steps)
            announce(job, str(submitted.job_id))
            running[slot] = submitted
        time.sleep(options.poll_s)
        running = {slot: job for slot, job in running.items() if not job.done()}


def _fields(job: RunJob) -> dict[str, Any]:
    from dataclasses import fields

    return {f.name: getattr(job, f.name) for f in fields(job) if f.init}


def slurm_executor(out: Path, options: LaunchOptions) -> Any:
    """submitit's SlurmExecutor with the options: one node per run, ``gpus_per_run`` GPUs and as many tasks
    (a DDP run when more than one), requeued on preemption (``--signal=USR2@90`` and ``scontrol requeue``)."""
    import submitit

    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise KMLError(
            "--launcher slurm: no sbatch or srun on this machine; run kml-results on the cluster's login node"
        )
    executor = submitit.SlurmExecutor(folder=jobs_folder(out), max_num_timeout=MAX_TIMEOUTS)
    parameters: dict[str, Any] = {
        "job_name": f"kml-results-{out.name}",
        "time": options.timeout_min,
        "nodes": 1,
        "ntasks_per_node": options.gpus_per_run,
        "gpus_per_node": options.gpus_per_run,
        "stderr_to_stdout": True,
        "additional_parameters": dict(options.sbatch_options),
    }
    if options.cpus_per_run:
        parameters["cpus_per_task"] = max(1, options.cpus_per_run // options.gpus_per_run)
    optional = {
        "partition": options.partition,
        "account": options.account,
        "mem": options.mem_per_run,
        "array_parallelism": options.array_parallelism,
    }
    executor.update_parameters(**parameters, **{k: v for k, v in optional.items() if v is not None})
    return executor


def submit_slurm(
    jobs: list[RunJob], out: Path, options: LaunchOptions, announce: Callable[[RunJob, str], None]
) -> None:
    """Submit ``jobs`` to Slurm as one job array (its parallelism limited by ``array_parallelism``); returns once
    submitted."""
    if not jobs:
        return
    executor = slurm_executor(out, options)
    with executor.batch():
        submitted = [executor.submit(job) for job in jobs]
    for job, handle in zip(jobs, submitted):
        record_submission(job.run, "slurm", str(handle.job_id), handle.paths.stdout, job.steps)
        announce(job, str(handle.job_id))


def scheduler_states(records: list[dict[str, Any]], folder: Path) -> dict[str, str]:
    """What the scheduler says of the jobs in ``records`` (``seed<k>.job.json`` contents): job id -> ``pending``,
    ``running``, ``ended`` or ``unknown`` (sacct not answering, a job of another machine)."""
    states: dict[str, str] = {}
    slurm = [str(r["job_id"]) for r in records if r.get("launcher") == "slurm"]
    for record in records:
        if record.get("launcher") == "local":
            states[str(record["job_id"])] = _local_state(record)
    if slurm:
        states |= _slurm_states(slurm, folder)
    return states


def _local_state(record: dict[str, Any]) -> str:
    """A local job's id is its controller's process id: alive means pending or running."""
    if record.get("host") != socket.gethostname():
        return "unknown"
    try:
        pid = int(record["job_id"])
        os.kill(pid, 0)
    except ProcessLookupError:
        return "ended"
    except (OSError, ValueError):
        return "unknown"
    return "ended" if _zombie(pid) else "running"


def _zombie(pid: int) -> bool:
    """A child process that has exited but was not waited for still answers ``kill(pid, 0)``."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


_SLURM_STATES = {"PENDING": "pending", "REQUEUED": "pending", "RUNNING": "running", "SUSPENDED": "running"}


def _slurm_states(job_ids: list[str], folder: Path) -> dict[str, str]:
    """sacct's states of ``job_ids`` through submitit's watcher (one sacct call)."""
    import submitit

    if shutil.which("sacct") is None:  # not on the cluster: the jobs' own records decide
        return dict.fromkeys(job_ids, "unknown")
    handles: list[Any] = [submitit.SlurmJob(folder=folder, job_id=job_id) for job_id in job_ids]
    submitit.SlurmJob.watcher.update()
    states = {}
    for handle in handles:
        raw = submitit.SlurmJob.watcher.get_state(handle.job_id, mode="cache").split()[0]
        states[handle.job_id] = "unknown" if raw == "UNKNOWN" else _SLURM_STATES.get(raw, "ended")
    return states
