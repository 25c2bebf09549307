"""One run of a results grid as a submitit job: train (or resume) it, evaluate it, and record how it went.

Preemption follows submitit's checkpointing protocol. The scheduler's signal (``SIGUSR2`` unless
``SUBMITIT_PREEMPT_SIGNAL`` says otherwise; Slurm sends it ``signal_delay_s`` before the end) asks the trainer to
stop after its current step with ``last.pt`` saved; then submitit's own handler calls :meth:`RunJob.checkpoint`
and requeues the job, which continues from that checkpoint with kml's resume: the same numbers as a run never
interrupted. A job of several tasks (``--gpus-per-run K``) is one DDP run over kml's distributed path.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import zlib
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

from kml.errors import KMLError
from kml.results import runs
from kml.results.status import record_state

if TYPE_CHECKING:
    from kml.training.distributed import DistInfo
    from kml.training.trainer import Trainer

__all__ = ["preemption_signal", "RunJob"]


def preemption_signal() -> signal.Signals:
    """The signal submitit treats as preemption or time-out (its ``SUBMITIT_PREEMPT_SIGNAL``, ``USR2`` by default)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return signal.Signals[f"SIG{name}"]


@dataclass
class RunJob:
    """What a job runs: make ``run`` trained to ``steps`` on ``modes`` with the grid's ``common`` settings, then
    its evaluation on ``episodes`` meta-test episodes per mode (seed ``eval_seed``); returns the average accuracy.

    ``device``: the job's device (``cuda`` for the GPUs a local job was given, ``cpu``; ``None``: a GPU when there
    is one). ``threads``: the CPU threads of a local job sharing the CPU with others (``None``: kml's default).
    """

    run: runs.Run
    modes: list[str]
    steps: int
    common: dict[str, Any]
    episodes: int
    eval_seed: int
    device: str | None = None
    threads: int | None = None
    _trainer: Trainer | None = field(default=None, init=False, repr=False, compare=False)
    _preempted: bool = field(default=False, init=False, repr=False, compare=False)
    _requeue: Any = field(default=None, init=False, repr=False, compare=False)  # submitit's handler of the signal

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_trainer": None, "_preempted": False, "_requeue": None}  # a requeue starts afresh

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ARG002
        """submitit's checkpointing protocol: the same job again; it resumes the run from its last checkpoint."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(dataclasses.replace(self))

    def __call__(self) -> float | None:
        import submitit

        environment = submitit.JobEnvironment()
        job_id = str(environment.job_id)
        if self.threads is not None:  # before torch loads: the jobs of one machine share its cores
            os.environ["KML_NUM_THREADS"] = str(self.threads)
        _ddp_environment(environment)
        from kml.runtime.threads import configure_threads

        configure_threads()
        usr = preemption_signal()
        self._requeue = signal.getsignal(usr)
        signal.signal(usr, self._on_preemption)
        info = None
        try:
            info = _join_ddp(environment, self.device)
            if info.is_main:
                record_state(self.run, "running", job_id)
            return self._train_and_evaluate(info, job_id)
        except runs.TrainingStopped as stopped:
            if self._preempted:  # stopped for the requeue: submitit's handler checkpoints and requeues
                if info is not None and info.is_main:
                    record_state(self.run, "requeued", job_id)
                self._hand_over(usr)
                return None  # a rank other than the first: the requeue ends it
            if stopped.cause is None:  # SIGTERM or SIGINT, last.pt saved: Slurm's own preemption requeues it
                self._record(info, job_id, "stopped", str(stopped))
            else:
                self._record(info, job_id, "failed", _one_line(stopped.cause))
            raise
        except Exception as error:
            self._record(info, job_id, "failed", _one_line(error))
            raise
        finally:
            signal.signal(usr, self._requeue or signal.SIG_DFL)
            if info is not None:
                from kml.training.distributed import shutdown

                shutdown(info)

    def _train_and_evaluate(self, info: DistInfo, job_id: str) -> float | None:
        _, step = runs.train(
            self.run,
            self.modes,
            self.steps,
            self.common,
            progress=False,
            device=self.device,
            dist_info=info,
            started=self._started,
        )
        self._trainer = None
        if not info.is_main:  # the first rank evaluates
            return None
        report = runs.evaluate(self.run, step, self.episodes, self.eval_seed, progress=False, device=self.device)
        record_state(self.run, "done", job_id)
        return float(next(r["accuracy"] for r in report["results"] if r["mode"] == "average"))

    def _record(self, info: DistInfo | None, job_id: str, state: str, error: str) -> None:
        """Record how the job ended (the first rank, or any before the ranks are known)."""
        if info is None or info.is_main:
            record_state(self.run, state, job_id, error=error)

    def _started(self, trainer: Trainer) -> None:
        self._trainer = trainer

    def _on_preemption(self, signum: int, frame: FrameType | None) -> None:
        self._preempted = True
        if self._trainer is not None:  # stop after this step with last.pt saved; __call__ then requeues
            self._trainer.request_stop(signum)
        else:  # not training (yet): nothing newer than the run's last checkpoint to save
            self._hand_over(signum, frame)

    def _hand_over(self, signum: int, frame: FrameType | None = None) -> None:
        """Let submitit's handler checkpoint and requeue the job (it exits; on other ranks it returns)."""
        signal.signal(signum, self._requeue or signal.SIG_DFL)
        if callable(self._requeue):
            self._requeue(signum, frame)


def _one_line(error: BaseException) -> str:
    """``error`` as the status table shows it: its first line, with its type unless it is kml's own one-liner."""
    text = (str(error).strip().splitlines() or [""])[0]
    return text if isinstance(error, KMLError) else f"{type(error).__name__}: {text}"


def _ddp_environment(environment: Any) -> None:
    """With several tasks, the environment ``torchrun`` would give each: rank, world size, master address, and a
    port from the job id (the same on every task)."""
    if environment.num_tasks <= 1:
        return
    os.environ.update(
        RANK=str(environment.global_rank),
        LOCAL_RANK=str(environment.local_rank),
        WORLD_SIZE=str(environment.num_tasks),
        LOCAL_WORLD_SIZE=str(environment.num_tasks // environment.num_nodes),
        MASTER_ADDR=environment.hostnames[0],
        MASTER_PORT=str(20000 + zlib.crc32(str(environment.job_id).encode()) % 20000),
    )


def _join_ddp(environment: Any, device: str | None) -> DistInfo:
    """The job's ranks: one process alone, else kml's process group over the tasks (:func:`_ddp_environment`)."""
    from kml.training.distributed import DistInfo, init_distributed

    if environment.num_tasks <= 1:
        return DistInfo()
    import torch

    return init_distributed(device or ("cuda" if torch.cuda.is_available() else "cpu"))
