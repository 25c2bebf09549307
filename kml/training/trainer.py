"""The meta-training loop: sampler -> learner -> optimiser, with logs, validation and checkpoints.

:class:`Trainer` composes the parts of a run: any learner module that returns a
:class:`~kml.algorithms.LearnerOutput`, any episode sampler, any torch optimiser and
(optionally) a learning-rate scheduler. :meth:`Trainer.from_config` builds those parts from a
:class:`~kml.config.run.RunConfig` exactly as ``kml-train`` does.

Everything a run writes lands in its run folder: ``config.json``, ``metrics.csv``,
``validation.csv``, ``log.txt``, TensorBoard events (when tensorboard is installed) and
``checkpoints/`` (``last.pt``, ``best.pt``, ``step_XXXXXX.pt``). A checkpoint holds model,
optimiser, scheduler, sampler RNG state, torch's RNG state, step and the running metric sums,
so a resumed run continues with exactly the batches and numbers an uninterrupted run would
have produced.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from kml._version import __version__
from kml.algorithms import LearnerOutput, MetaLearner, build_learner
from kml.algorithms.chunking import accumulate_meta_gradient
from kml.config.checks import (
    OPT_INT_1,
    TRAIN_NUMBERS,
    Number,
    check_bools,
    check_fields,
    check_run_combinations,
    check_run_name,
)
from kml.config.run import RunConfig
from kml.data.episode import Episode
from kml.data.modes import ROTATED_BY_DEFAULT, expand_modes, load_stores
from kml.data.sampler import MixtureSampler
from kml.data.store import ImageStore, check_same_cache
from kml.errors import KMLError, setting
from kml.evaluation import average, evaluate
from kml.files import continue_advice, resume_words, write_failure, write_json
from kml.runtime import autocast, check_bf16
from kml.training.checkpoint import load_checkpoint, load_model_state, remove_stale_temp_files, save_checkpoint
from kml.training.distributed import DistInfo, barrier, resolve_device, sum_gradients, sum_tensor
from kml.training.run_lock import RunLock
from kml.training.schedule import build_scheduler

__all__ = [
    "Callback",
    "default_run_name",
    "LoopSettings",
    "qualified_name",
    "run_directory",
    "Sampler",
    "SETTING_NAMES",
    "Trainer",
    "versions",
]

Callback = Callable[["Trainer", int, Episode], None]


class Sampler(Protocol):
    """What the trainer needs of a sampler (:class:`~kml.data.sampler.MixtureSampler` and
    :class:`~kml.data.sampler.EpisodeSampler` have it): ``sample()`` draws the next meta-batch,
    ``mode_names`` names the modes that ``Episode.mode`` indexes, and the state methods make resume exact."""

    mode_names: Sequence[str]

    def sample(self) -> Episode: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# kml-train's checks of these settings; here only those filled from elsewhere when absent may be None.
_OPTIONAL_SETTINGS = ("steps", "grad_clip", "task_chunk", "ways", "shots", "queries")
_SETTING_NUMBERS: dict[str, Number] = {
    **{
        name: dataclasses.replace(TRAIN_NUMBERS[name], optional=name in _OPTIONAL_SETTINGS)
        for name in (
            "steps",
            "log_every",
            "val_every",
            "val_episodes",
            "checkpoint_every",
            "grad_clip",
            "task_chunk",
            "seed",
            "ways",
            "shots",
            "queries",
        )
    },
    "val_tasks_per_batch": OPT_INT_1,
}


@dataclasses.dataclass
class LoopSettings:
    """How the training loop runs, as opposed to what it trains (learner, sampler, optimiser).

    Attributes:
        steps: outer steps to reach, counted from the start of the run (a resumed run ends at the same step).
        log_every: write a ``metrics.csv`` row (mean loss, accuracy per mode, rate) every this many steps.
        val_every: validate every this many steps and at the last step (only with validation stores).
        val_episodes: validation episodes per mode.
        checkpoint_every: save ``last.pt`` and ``step_XXXXXX.pt`` every this many steps.
        grad_clip: clip the meta-gradient's norm to this (``None``: no clipping).
        task_chunk: backpropagate the meta-batch this many tasks at a time (same update, less memory).
        bf16: bf16 autocast around the learner (refused where the device would emulate it).
        compile: call the learner through ``torch.compile`` (checkpoints keep the plain module's state).
        seed: seed of the fixed validation episodes.
        ways, shots, queries: N, K and Q of the validation tasks (default: the sampler's).
        val_tasks_per_batch: validation tasks evaluated together (default: the sampler's meta-batch).
    """

    steps: int | None = None
    log_every: int = 10
    val_every: int = 1000
    val_episodes: int = 300
    checkpoint_every: int = 1000
    grad_clip: float | None = None
    task_chunk: int | None = None
    bf16: bool = False
    compile: bool = False
    seed: int = 0
    ways: int | None = None
    shots: int | None = None
    queries: int | None = None
    val_tasks_per_batch: int | None = None

    def __post_init__(self) -> None:
        check_fields(self, _SETTING_NUMBERS, where="Trainer setting")
        check_bools(self, ("bf16", "compile"), where="Trainer setting")

    @classmethod
    def from_run_config(cls, config: RunConfig) -> LoopSettings:
        """The loop settings of a resolved :class:`RunConfig` (validation batches as large as its meta-batch)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"val_tasks_per_batch"}
        return cls(**{name: getattr(config, name) for name in names}, val_tasks_per_batch=config.meta_batch)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SETTING_NAMES = tuple(f.name for f in dataclasses.fields(LoopSettings))


def default_run_name(config: RunConfig) -> str:
    learner = config.learner
    method = f"{'multi-' if learner.multi_maml else ''}{learner.algorithm}-{learner.modulation}"
    return f"{method}_{'-'.join(m.replace('folder:', '').replace('/', '_') for m in config.modes)}_{config.ways}w{config.shots}s"


def run_directory(config: RunConfig) -> Path:
    return _check_printable(Path(config.train_dir) / check_run_name(config.run_name or default_run_name(config)))


def _check_printable(run_dir: Path) -> Path:
    """Refuse control characters (a newline, a tab) in a run folder's path: messages and commands name it on one line."""
    if any(ord(c) < 32 or ord(c) == 127 for c in str(run_dir)):
        raise KMLError(
            f"the run folder {str(run_dir)!r} holds a control character (a newline, a tab...); choose a "
            f"{setting('run_name')} and {setting('train_dir')} of printable characters"
        )
    return run_dir


def _run_flags(run_dir: Path) -> str:
    """``--train-dir D --run-name N`` of ``run_dir``, quoted so that the command can be pasted into a shell."""
    return f"--train-dir {shlex.quote(str(run_dir.parent))} --run-name {shlex.quote(run_dir.name)}"


def _newest_step_checkpoint(run_dir: Path, other_than: Path | None = None) -> Path | None:
    """The run's periodic checkpoint of the highest step (other than ``other_than``), or ``None``."""
    steps = []
    for path in (run_dir / "checkpoints").glob("step_*.pt"):
        found = re.fullmatch(r"step_(\d+)\.pt", path.name)
        if found and path != other_than:
            steps.append((int(found[1]), path))
    return max(steps)[1] if steps else None


def _resume_from_advice(run_dir: Path, checkpoint: Path) -> str:
    """How to continue ``run_dir`` from ``checkpoint`` (kml-train's --resume-from, or a copy to last.pt in Python)."""
    if resume_words() == "--resume":
        return f"kml-train --resume {_run_flags(run_dir)} --resume-from {shlex.quote(str(checkpoint))}"
    return f"copy {checkpoint} to {run_dir / 'checkpoints' / 'last.pt'}, then resume=True"


def _refuse_resume_without_last(run_dir: Path) -> None:
    """A run without last.pt but with step checkpoints: name the newest instead of advising to start again."""
    newest = _newest_step_checkpoint(run_dir)
    if newest is not None:  # never advise deleting checkpoints that exist
        raise KMLError(
            f"cannot resume {run_dir}: it has no checkpoints/last.pt, but has {newest.name}; continue from it: "
            f"{_resume_from_advice(run_dir, newest)}"
        )


def _is_out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory error, or the CPU allocator's (a RuntimeError, not torch.OutOfMemoryError)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error)
    )


@contextmanager
def _out_of_memory_as_one_line(doing: str, remedy: str) -> Iterator[None]:
    """A CPU or GPU out-of-memory error raised while ``doing`` becomes one line naming ``remedy``."""
    try:
        yield
    except RuntimeError as error:  # torch.OutOfMemoryError is one
        if not _is_out_of_memory(error):
            raise
        raise KMLError(f"out of {_memory_need(error)} {doing}; {remedy}") from None


def _memory_need(error: BaseException) -> str:
    """``GPU memory``, or ``CPU memory (could not allocate 341.3 GB)`` from the CPU allocator's message."""
    if isinstance(error, torch.OutOfMemoryError):
        return "GPU memory"
    found = re.search(r"allocate (\d+) bytes", str(error))
    return f"CPU memory (could not allocate {int(found[1]) / 1e9:.1f} GB)" if found else "CPU memory"


# What a training checkpoint holds (Trainer.state), checked before resuming from one.
_STATE_KEYS = ("config", "step", "best_val", "model", "optimizer", "scheduler", "sampler", "window", "torch_rng")
# The CSV files a run appends to (truncated on resume to the checkpoint's step, synced at each checkpoint).
_RUN_CSVS = ("metrics.csv", "validation.csv", "transference.csv")


class _RunLog(logging.FileHandler):
    """log.txt: a failed write (a full disk) is the run's one-line error, not logging's printed traceback."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            raise write_failure(self.baseFilename, error, continue_advice()) from None
        super().handleError(record)


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


# How the advice in messages names resuming and overwriting: kml-train's flags, or the Trainer's arguments.
_CLI_WORDS = {"resume": "--resume", "overwrite": "--overwrite", "name": "--run-name"}
_PYTHON_WORDS = {"resume": "resume=True", "overwrite": "overwrite=True", "name": "run_dir"}


def _existing_run(run_dir: Path, overwrite: bool, words: dict[str, str] = _CLI_WORDS) -> bool:
    """True when ``run_dir`` holds a run that ``overwrite`` will replace; a one-line error when it may not."""
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise KMLError(
            f"{run_dir} exists and is not a run folder (a file or a link); move it away or choose another {words['name']}"
        )
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return False
    if not overwrite:
        if (run_dir / "checkpoints" / "last.pt").is_file():
            raise KMLError(
                f"run {run_dir} already exists; pass {words['resume']} to continue it or {words['overwrite']} to delete it "
                f"and start again"
            )
        newest = _newest_step_checkpoint(run_dir)
        if newest is not None:  # never advise deleting checkpoints that exist
            raise KMLError(
                f"run {run_dir} already exists and has no last.pt, but has {newest.name}; continue from it: "
                f"{_resume_from_advice(run_dir, newest)}"
            )
        raise KMLError(
            f"run {run_dir} already exists but has no checkpoint to resume (it stopped before its first save); "
            f"add {words['overwrite']} to delete it and start again"
        )
    problem = _not_a_kml_run(run_dir)
    if problem:
        raise KMLError(
            f"{run_dir} is not a kml run folder ({problem}); {words['overwrite']} deletes only kml runs: "
            f"move it away or choose another {words['name']}"
        )
    return True


def _not_a_kml_run(run_dir: Path) -> str | None:
    """Why ``run_dir`` is not a kml run that --overwrite may delete, or ``None`` when it is one: its config.json
    reads as a kml run config (or, that file lost, its checkpoints/last.pt is a kml checkpoint)."""
    config = run_dir / "config.json"
    try:
        values = json.loads(config.read_bytes())
        if isinstance(values, dict) and isinstance(values.get("custom_learner"), str):  # a Python Trainer's run
            if set(values) <= {"custom_learner", "versions", *SETTING_NAMES}:
                return None
            return f"{config.name} has keys no kml run has"
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
    """Delete the run that ``--overwrite`` replaces: first renamed aside (one atomic step), then removed."""
    aside = run_dir.parent / f".{run_dir.name}.overwritten-{os.getpid()}"
    try:
        os.replace(run_dir, aside)
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            raise write_failure(aside, error) from None
        raise KMLError(f"cannot move the old run {run_dir} aside for --overwrite: {error.strerror or error}") from None
    shutil.rmtree(aside, ignore_errors=True)  # leftovers (a kill meanwhile) go at the next start


def _step_of(row: dict[str, str]) -> int | None:
    try:
        return int(row["step"])
    except (KeyError, TypeError, ValueError):
        return None


def _custom_run_refusal(run_dir: Path, learner_name: str) -> KMLError:
    return KMLError(
        f"run {run_dir} was trained with a custom learner ({learner_name}), which kml-train cannot rebuild; resume it in "
        f"Python: Trainer(learner, sampler, optimizer, scheduler, run_dir='{run_dir}', resume=True).fit()"
    )


def _custom_learner_in_config_file(path: Path) -> str | None:
    """The custom learner named by a run's config.json, or ``None`` (also for an unreadable file)."""
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return values.get("custom_learner") if isinstance(values, dict) else None


def _resume_config(config_path: Path, last: Path) -> RunConfig:
    """The run's settings from config.json, or from last.pt when config.json is missing or corrupt."""
    custom = _custom_learner_in_config_file(config_path)
    if custom:
        raise _custom_run_refusal(config_path.parent, custom)
    try:
        return RunConfig.load(config_path)
    except KMLError as error:
        if not last.is_file():
            if not config_path.is_file():
                raise KMLError(
                    f"cannot resume: {config_path} not found (is {config_path.parent} a kml run folder?)"
                ) from None
            newest = _newest_step_checkpoint(config_path.parent)
            if newest is not None:  # it holds the settings too: never advise deleting checkpoints
                raise KMLError(
                    f"cannot resume: {error}; and there is no {last} to recover the settings from: continue from "
                    f"{newest.name}, which holds them: {_resume_from_advice(config_path.parent, newest)}"
                ) from None
            raise KMLError(
                f"cannot resume: {error}; and there is no {last} to recover the settings from: start it again with "
                f"the same kml-train command, --overwrite instead of --resume"
            ) from None
        reason = error
    saved = load_checkpoint(last).get("config")
    if isinstance(saved, dict) and saved.get("custom_learner"):
        raise _custom_run_refusal(config_path.parent, saved["custom_learner"])
    config = RunConfig.from_dict(saved)
    config.save(config_path, {"versions": versions()})
    print(f"warning: {reason}; rewrote it from the settings saved in {last}", file=sys.stderr)
    return config


def _resume_source(run_dir: Path, checkpoint: str | os.PathLike | None) -> Path:
    """The checkpoint a resume loads: last.pt, or ``checkpoint`` (a path, or a file name in the run's checkpoints/)."""
    checkpoints = run_dir / "checkpoints"
    if checkpoint is None:
        return checkpoints / "last.pt"
    path = Path(checkpoint)
    if path.parent == Path(".") and not path.is_file():
        path = checkpoints / path
    if not path.is_file():
        raise KMLError(f"{setting('resume_from')} {checkpoint}: no such checkpoint; the run's are in {checkpoints}")
    if Path(os.path.realpath(path)).parent != Path(os.path.realpath(checkpoints)):  # another run's state is not ours
        raise KMLError(
            f"{setting('resume_from')} {checkpoint} is not a checkpoint of {run_dir}: name one in {checkpoints}"
        )
    return path


def _load_for_resume(run_dir: Path, path: Path, device: str) -> dict[str, Any]:
    """``load_checkpoint(path)``; a damaged file's error says how to continue from another of the run's checkpoints."""
    try:
        return load_checkpoint(path, device)
    except KMLError as error:
        newest = _newest_step_checkpoint(run_dir, other_than=path)
        if newest is None:
            raise
        raise KMLError(f"{error}; to continue from {newest.name}: {_resume_from_advice(run_dir, newest)}") from None


def versions() -> dict[str, str]:
    # plain str: torch.__version__ is a TorchVersion, which weights-only loading does not read by default
    return {"kml": __version__, "torch": str(torch.__version__), "cuda": str(torch.version.cuda)}


def qualified_name(obj: object) -> str:
    """``module.QualName`` of ``obj``'s class: how a checkpoint names a custom learner."""
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def _sampler_value(sampler: Any, name: str) -> Any:
    """``sampler.<name>``, or that of its first per-mode sampler (a :class:`MixtureSampler`), or ``None``."""
    if hasattr(sampler, name):
        return getattr(sampler, name)
    inner = getattr(sampler, "samplers", None)
    return getattr(inner[0], name, None) if inner else None


def _rotation_by_mode(sampler: Any) -> dict[str, bool]:
    """Which of the sampler's modes rotate their classes (validation draws those modes' tasks alike)."""
    inner = getattr(sampler, "samplers", None)
    if inner is None:  # one mode's sampler: its tasks are of mode_names[mode_index]
        return {sampler.mode_names[getattr(sampler, "mode_index", 0)]: bool(getattr(sampler, "rotate", False))}
    return {name: bool(getattr(s, "rotate", False)) for s, name in zip(inner, sampler.mode_names)}


def _device_of(module: nn.Module) -> str:
    tensor = next(iter([*module.parameters(), *module.buffers()]), None)
    return str(tensor.device) if tensor is not None else "cpu"


class Trainer:
    """One training run: ``learner`` meta-trained on ``sampler``'s meta-batches by ``optimizer``.

    Args:
        learner: an ``nn.Module`` called as ``learner(episode)`` on a float :class:`~kml.data.episode.Episode`
            of T tasks (``support_x [T, N*K, C, H, W]``, ``support_y [T, N*K]``, ``query_x [T, N*Q, C, H, W]``,
            ``query_y [T, N*Q]``, ``mode [T]``), returning a :class:`~kml.algorithms.LearnerOutput`: ``loss``
            (scalar mean query loss), ``task_loss [T]`` (differentiable) and ``task_accuracy [T]`` in [0, 1].
            Called as ``learner(episode, inner_steps=k)`` only where an inner-step count is asked for
            (``kml.evaluation.evaluate(..., inner_steps=k)``).
        sampler: draws the training meta-batches (see :class:`Sampler`; e.g. a
            :class:`~kml.data.sampler.MixtureSampler`); uint8 images are made float one task chunk at a time.
        optimizer: any torch optimiser over the learner's parameters.
        scheduler: a learning-rate scheduler stepped once per outer step; ``None`` keeps the optimiser's rate.
        run_dir: the run folder (see the module docstring); its parent holds the run's lock file.
        config: a ``kml-train`` :class:`RunConfig` to take the loop settings from (keywords override them).
            With the learner it describes (as :meth:`from_config` builds it), checkpoints are ``kml-train``'s,
            which ``kml-eval`` and ``kml-train --resume`` read; with any other learner the run is a custom one.
        val_stores: meta-validation image stores, one per mode; without them there is no validation (no best.pt).
        device: where the learner runs (default: where its parameters are).
        dist_info: rank and world size under ``torchrun`` (default: a single process).
        progress: show a progress bar (in the main process).
        resume: continue the run in ``run_dir`` from ``checkpoints/last.pt`` (model, optimiser, scheduler, sampler
            and RNG state, step): the same batches and numbers as without the interruption. The learner, sampler,
            optimiser and scheduler must be built as for the interrupted run; settings not given here are the run's.
        overwrite: delete an existing run in ``run_dir`` and start again (without it an existing run is refused).
        **settings: the loop settings, :class:`LoopSettings` fields (``steps``, ``log_every``, ``val_every``,
            ``checkpoint_every``, ``grad_clip``, ``bf16``, ``task_chunk``, ``val_episodes``, ``seed``, ``ways``...).

    Building a trainer takes the run folder: it locks it (one writer per run), then starts the run
    (``config.json`` and a step-0 ``last.pt``, so a run killed before its first checkpoint still resumes) or, with
    ``resume``, loads ``last.pt``. :meth:`fit` trains and lets go of the lock. SIGINT and SIGTERM stop it after
    the current step with ``last.pt`` saved; a non-finite loss stops it with the last finite parameters saved.
    """

    def __init__(
        self,
        learner: nn.Module,
        sampler: Sampler,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        *,
        run_dir: str | os.PathLike,
        config: RunConfig | None = None,
        val_stores: Sequence[ImageStore] | None = None,
        device: str | torch.device | None = None,
        dist_info: DistInfo | None = None,
        progress: bool = True,
        resume: bool = False,
        overwrite: bool = False,
        **settings: Any,
    ) -> None:
        self._setup(
            learner,
            sampler,
            optimizer,
            scheduler,
            run_dir=run_dir,
            config=config,
            val_stores=val_stores,
            device=device,
            dist_info=dist_info,
            progress=progress,
            settings=settings,
        )
        self._take_run(resume, overwrite)

    def _setup(
        self,
        learner: nn.Module,
        sampler: Sampler,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        *,
        run_dir: str | os.PathLike,
        config: RunConfig | None,
        val_stores: Sequence[ImageStore] | None,
        device: str | torch.device | None,
        dist_info: DistInfo | None,
        progress: bool,
        settings: dict[str, Any],
    ) -> None:
        """Everything but the run folder: nothing is read or written here."""
        unknown = sorted(set(settings) - set(SETTING_NAMES))
        if unknown:
            raise TypeError(f"Trainer got unknown settings {unknown}; the loop settings are {', '.join(SETTING_NAMES)}")
        lacking = [
            name for name in ("sample", "mode_names", "state_dict", "load_state_dict") if not hasattr(sampler, name)
        ]
        if lacking:
            raise TypeError(
                f"the sampler ({qualified_name(sampler)}) has no {', '.join(lacking)}: the trainer draws meta-batches with "
                f"sample(), names the modes that Episode.mode indexes by mode_names, and saves state_dict() for exact resume"
            )
        self.dist = dist_info or DistInfo()
        self.learner = learner
        self.sampler = sampler
        self.optimizer = optimizer
        self.scheduler = scheduler
        if device is not None:  # episodes follow it in train_step
            learner.to(device)
        self.device = str(device) if device is not None else _device_of(learner)
        self.run_dir = _check_printable(Path(run_dir))
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.progress = progress and self.dist.is_main
        # None for the learner a kml-train config describes; else the custom learner's class, recorded in checkpoints
        config_learner = config is not None and isinstance(learner, MetaLearner) and learner.config == config.learner
        self.learner_name: str | None = None if config_learner else qualified_name(learner)
        self.config = config
        self.settings = LoopSettings.from_run_config(config) if config is not None else LoopSettings()
        self._given_settings = set(settings)  # on resume, the run's own settings fill the others
        self._update_settings(**settings)
        for name, source in (
            ("ways", "ways"),
            ("shots", "shots"),
            ("queries", "queries"),
            ("val_tasks_per_batch", "meta_batch"),
        ):
            if getattr(self.settings, name) is None and _sampler_value(sampler, source) is not None:
                self._update_settings(**{name: int(_sampler_value(sampler, source))})
        self.mode_names = list(config.modes) if config is not None else [str(name) for name in sampler.mode_names]
        self.val_stores = list(val_stores or [])
        self._rotation = _rotation_by_mode(sampler)
        self.rotate = [self._rotation.get(name, False) for name in sampler.mode_names]  # per training mode
        if self.val_stores and None in (self.settings.ways, self.settings.shots, self.settings.queries):
            raise KMLError("validation needs ways, shots and queries, and the sampler has none: pass them as settings")
        meta_batch = _sampler_value(sampler, "meta_batch")
        if meta_batch is not None and meta_batch < self.dist.world_size:
            raise KMLError(
                f"a meta-batch of {meta_batch} tasks is smaller than the {self.dist.world_size} processes that share "
                f"its tasks; use {self.dist.world_size} or more"
            )
        self.parameters = [p for p in learner.parameters() if p.requires_grad]
        self.step = 0
        self.best_val = -math.inf
        self.callbacks: list[Callback] = []
        self._stop_signal: int | None = None  # the signal this process received
        self._stop_agreed = False  # under torchrun: some rank was signalled, as of the last step's all-reduce
        self._reset_window()
        self.lock: RunLock | None = None  # held by the main process from taking the run to the end of fit
        self._taken = False  # the run folder is ours: started or resumed
        self.logger = self._make_logger()  # log.txt and TensorBoard open only when the run starts (_open_run_files)
        self.tensorboard = None

    def _update_settings(self, **values: Any) -> None:
        """Change loop settings (checked), in the run config too, and what follows from them."""
        self.settings = dataclasses.replace(self.settings, **values)
        if self.config is not None:
            self.config = dataclasses.replace(
                self.config, **{k: v for k, v in values.items() if hasattr(self.config, k)}
            )
        if self.settings.bf16:
            check_bf16(self.device)
        # torch.compile wraps the forward only; checkpoints keep the plain module's state_dict.
        if getattr(self, "forward", None) is None or (self.forward is not self.learner) != self.settings.compile:
            self.forward = torch.compile(self.learner) if self.settings.compile else self.learner

    @property
    def custom(self) -> bool:
        """True when the learner is not one a kml-train config describes (see ``learner_name``)."""
        return self.learner_name is not None

    # ------------------------------------------------------------ creation
    @classmethod
    def from_config(
        cls,
        config: RunConfig,
        run_dir: str | os.PathLike | None = None,
        dist_info: DistInfo | None = None,
        progress: bool = True,
        new_run: bool = True,
    ) -> Trainer:
        """The trainer ``kml-train`` builds for ``config``: its modes' stores, a :class:`MixtureSampler`, the
        learner of ``config.learner``, Adam and the config's rate schedule (``build_scheduler``). ``new_run=False``
        (resuming) accepts recorded settings that an earlier kml let through without effect.

        ``run_dir`` defaults to ``<train_dir>/<run_name>``. The run folder is taken by :meth:`fit` (a new run,
        refused if one exists); :meth:`create` and :meth:`resume` take it for ``kml-train``.
        """
        config = config.resolved()
        check_run_combinations(config, new_run)
        info = dist_info or DistInfo()
        device = resolve_device(config.device, info)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise KMLError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
        if config.bf16:
            check_bf16(device)
        torch.manual_seed(config.seed)  # the learner's initialisation

        rotate = [config.rotate_omniglot and mode in ROTATED_BY_DEFAULT for mode in config.modes]
        loading = f"loading the images at {config.image_size or 'their stored'} pixels a side"
        with _out_of_memory_as_one_line(loading, f"use a smaller {setting('image_size')}"):
            train_stores = load_stores(config.modes, "train", config.data_root, config.image_size, 3, device)
            side = train_stores[0].image_shape[1]
            val_stores = load_stores(config.modes, "val", config.data_root, side, 3, device)
        learner_config = dataclasses.replace(config.learner, image_size=side, in_channels=3)
        config = dataclasses.replace(config, image_size=side, learner=learner_config)
        sampler = MixtureSampler(
            train_stores,
            config.ways,
            config.shots,
            config.queries,
            config.meta_batch,
            config.policy,
            config.weights,
            rotate,
            config.seed,
            dtype=torch.uint8,
        )
        if config.meta_batch < info.world_size:
            raise KMLError(
                f"--meta-batch {config.meta_batch} is smaller than the {info.world_size} processes that share its tasks; "
                f"use --meta-batch {info.world_size} or more"
            )
        smaller = f"use a smaller {setting('base_channels')}, {setting('encoder_channels')} or {setting('image_size')}"
        with _out_of_memory_as_one_line("building the learner", smaller):
            learner: MetaLearner = build_learner(learner_config).to(device)
        learner.activation_checkpointing = config.activation_checkpointing
        if config.compile and learner_config.algorithm == "maml" and not learner_config.first_order:
            raise KMLError(
                "--compile cannot run second-order MAML (torch.compile does not differentiate twice); "
                "add --first-order or drop --compile"
            )
        optimizer = torch.optim.Adam([p for p in learner.parameters() if p.requires_grad], lr=config.lr)
        scheduler = build_scheduler(optimizer, config)  # per-recipe schedule (halved or constant)
        trainer = cls.__new__(cls)
        trainer.data_identity = {  # checkpoints record the caches, so eval and resume notice one converted again
            "train": [store.identity() for store in train_stores],
            "val": [store.identity() for store in val_stores],
        }
        trainer._setup(
            learner,
            sampler,
            optimizer,
            scheduler,
            run_dir=run_dir or run_directory(config),
            config=config,
            val_stores=val_stores,
            device=device,
            dist_info=info,
            progress=progress,
            settings={},
        )
        return trainer

    @classmethod
    def create(
        cls, config: RunConfig, overwrite: bool = False, dist_info: DistInfo | None = None, progress: bool = True
    ) -> Trainer:
        """Start a new ``kml-train`` run. With ``overwrite`` an existing run of the same name is deleted, but only
        once the new one has been built (data loaded, learner made): a setting that fails leaves the old run intact."""
        config = config.resolved()
        check_run_combinations(config)
        run_dir = run_directory(config)
        info = dist_info or DistInfo()
        lock = RunLock(run_dir).acquire() if info.is_main else None
        try:
            replace = _existing_run(run_dir, overwrite)
            barrier(info)
            trainer = cls.from_config(config, run_dir, info, progress)
            trainer.lock = lock
            trainer._start_run(replace)
            trainer.logger.info("new run %s: %s", run_dir, trainer.config.to_dict())
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return trainer

    @classmethod
    def resume(
        cls,
        run_dir: str | Path,
        overrides: dict[str, Any] | None = None,
        dist_info: DistInfo | None = None,
        progress: bool = True,
        checkpoint: str | os.PathLike | None = None,
    ) -> Trainer:
        """Continue the ``kml-train`` run in ``run_dir`` from ``checkpoints/last.pt`` (or from ``checkpoint``, one of
        the run's own, e.g. ``step_000009.pt``: later rows of its CSV files are dropped, as after a kill).

        ``overrides`` may change ``steps``, ``device``, ``data_root``, logging cadence and ``bf16`` (a
        device without native bf16 continues in float32: rounding differs, the method does not), and
        ``lr`` / ``grad_clip`` (to continue past a non-finite loss); any other change would make the
        continuation differ from the uninterrupted run and is refused. The settings it continues with are
        written back to ``config.json``, so a later resume keeps them.
        """
        run_dir = Path(run_dir)
        info = dist_info or DistInfo()
        lock = RunLock(run_dir).acquire() if info.is_main else None
        try:
            trainer = cls._resumed(run_dir, overrides or {}, info, progress, lock, checkpoint)
            trainer.logger.info("resumed %s at step %d", run_dir, trainer.step)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return trainer

    @classmethod
    def _resumed(
        cls,
        run_dir: Path,
        overrides: dict[str, Any],
        info: DistInfo,
        progress: bool,
        lock: RunLock | None,
        checkpoint: str | os.PathLike | None = None,
    ) -> Trainer:
        if not run_dir.is_dir():
            raise KMLError(f"cannot resume: there is no run folder {run_dir}; start the run by leaving out --resume")
        last = _resume_source(run_dir, checkpoint)
        config = _resume_config(run_dir / "config.json", last)
        allowed = {
            "steps",
            "device",
            "data_root",
            "log_every",
            "val_every",
            "checkpoint_every",
            "val_episodes",
            "train_dir",
            "run_name",
            "bf16",
            "task_chunk",
            "activation_checkpointing",
            "lr",
            "grad_clip",
        }
        changed = {}
        for key, value in overrides.items():
            current = getattr(config, key) if hasattr(config, key) else getattr(config.learner, key, None)
            if key == "modes":
                value = expand_modes(value)
            if value != current and key not in allowed:
                changed[key] = (current, value)
        if changed:
            diff = ", ".join(f"{k}: run has {a!r}, asked {b!r}" for k, (a, b) in changed.items())
            raise KMLError(f"cannot resume {run_dir} with different settings ({diff}); start a new run instead")
        config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if k in allowed})
        if config.run_name != run_dir.name or Path(config.train_dir) != run_dir.parent:
            config = dataclasses.replace(config, train_dir=str(run_dir.parent), run_name=run_dir.name)
        if not last.is_file():
            _refuse_resume_without_last(run_dir)
            raise KMLError(
                f"cannot resume {run_dir}: it has no checkpoint (it stopped before its first save); "
                f"start it again: the same kml-train command with --overwrite instead of --resume"
            )
        trainer = cls.from_config(config, run_dir, info, progress, new_run=False)
        trainer.lock = lock
        trainer.load_state(_load_for_resume(run_dir, last, trainer.device), source=last)
        trainer._set_base_lr(config.lr)
        trainer._continue_run()
        if last.name != "last.pt":  # the earlier step is the run now: a crash before the next save must not return
            trainer.save("last.pt")  # to the abandoned last.pt, whose rows the CSVs no longer hold
        return trainer

    def _take_run(self, resume: bool, overwrite: bool) -> None:
        """Lock the run folder, then resume the run in it or start a new one (a built trainer in Python)."""
        if resume and overwrite:
            raise KMLError("resume=True continues a run and overwrite=True starts it again; pass only one of them")
        lock = RunLock(self.run_dir).acquire() if self.dist.is_main else None
        self.lock = lock
        try:
            if resume:
                last = self.checkpoint_dir / "last.pt"
                if not last.is_file():
                    _refuse_resume_without_last(self.run_dir)
                    raise KMLError(
                        f"cannot resume {self.run_dir}: it has no checkpoints/last.pt (it never started, or stopped before "
                        f"its first save); start it with resume=False{', overwrite=True' if self.run_dir.is_dir() else ''}"
                    )
                self.load_state(_load_for_resume(self.run_dir, last, self.device), source=last)
                self._continue_run()
                self.logger.info("resumed %s at step %d", self.run_dir, self.step)
            else:
                replace = _existing_run(self.run_dir, overwrite, _PYTHON_WORDS)
                barrier(self.dist)
                self._start_run(replace)
                self.logger.info("new run %s: %s", self.run_dir, self._config_record())
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    def _start_run(self, replace: bool) -> None:
        """A new run: the old one deleted (``replace``), run files opened, config.json and a step-0 last.pt."""
        if self.dist.is_main:
            if replace:
                _discard(self.run_dir)
            self._open_run_files()
            self._write_config_file()
            self.save("last.pt")  # step 0: a run killed before its first checkpoint can still resume
        barrier(self.dist)
        self._taken = True

    def _continue_run(self) -> None:
        """After loading last.pt: run files opened, rows and TensorBoard events logged after that checkpoint
        dropped, and the settings it continues with written to config.json (a later resume keeps them)."""
        if self.dist.is_main:
            self._open_run_files(purge_step=self.step + 1)
            self._write_config_file()
        self._truncate_metrics()
        self._taken = True

    def _set_base_lr(self, lr: float) -> None:
        """A learning rate changed on resume: the schedule continues from it (halvings already due included)."""
        if self.scheduler.base_lrs == [lr]:
            return
        self.scheduler.base_lrs = [lr for _ in self.scheduler.base_lrs]
        halvings = self.scheduler.last_epoch // self.scheduler.step_size
        for group in self.optimizer.param_groups:
            group["lr"] = lr * self.scheduler.gamma**halvings
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _open_run_files(self, purge_step: int | None = None) -> None:
        """Create the run folder and open log.txt and TensorBoard (its events from ``purge_step`` on dropped);
        drop temp files a killed run left behind."""
        try:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            handler = _RunLog(self.run_dir / "log.txt")
        except OSError as error:
            if error.errno == errno.ENAMETOOLONG:
                raise write_failure(self.run_dir, error) from None
            raise KMLError(f"cannot write in run folder {self.run_dir}: {error.strerror or error}") from None
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        self.logger.addHandler(handler)
        if self.lock is not None and self.lock.stale_holder:
            self.logger.info("took over the lock of %s, which ended without releasing it", self.lock.stale_holder)
        for stale in [
            *remove_stale_temp_files(self.checkpoint_dir),
            *remove_stale_temp_files(self.run_dir),
        ]:  # ours: we hold the lock
            self.logger.info("removed %s, left by a process killed while writing it", stale)
        for stale in self.run_dir.parent.glob(f".{self.run_dir.name}.overwritten-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.tensorboard = self._make_tensorboard(purge_step)

    def _write_config_file(self) -> None:
        if self.custom:
            write_json(self.run_dir / "config.json", {**self._config_record(), "versions": versions()})
        else:
            self.config.save(self.run_dir / "config.json", {"versions": versions()})

    def release(self) -> None:
        """Let go of the run folder (end of fit, or a trainer used without fit)."""
        if self.tensorboard is not None:  # the events so far on disk, also after an exception (a later fit adds more)
            try:
                self.tensorboard.flush()
            except OSError:
                pass  # reported by the write that failed first
        if self.lock is not None:
            self.lock.release()

    # ------------------------------------------------------------ state
    def _config_record(self) -> dict[str, Any]:
        """What a checkpoint's ``config`` holds: the kml-train run config, or for a custom learner its class's
        qualified name (``custom_learner``) and the loop settings."""
        if self.custom:
            return {"custom_learner": self.learner_name, **self.settings.to_dict()}
        return self.config.to_dict()

    def state(self) -> dict[str, Any]:
        return {
            "config": self._config_record(),
            "versions": versions(),
            "step": self.step,
            "best_val": self.best_val,
            "model": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "sampler": self.sampler.state_dict(),
            "window": {k: v.cpu() for k, v in self.window.items()},
            "torch_rng": torch.get_rng_state(),
            # a custom learner may draw random numbers on the GPU (dropout): its generators resume too
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "data": getattr(self, "data_identity", None),  # None for a custom learner's sampler
        }

    def _check_caches(self, recorded: dict[str, Any] | None) -> None:
        """Refuse to continue on caches made otherwise than the run's (recorded since kml 0.3)."""
        ours = getattr(self, "data_identity", None)
        if recorded and ours:
            for split in ("train", "val"):
                for was, now in zip(recorded.get(split, []), ours[split]):
                    check_same_cache(was, now)

    def load_state(self, state: dict[str, Any], source: str | os.PathLike | None = None) -> None:
        """Continue from ``state``, a checkpoint's contents (``source`` names its file in messages)."""
        source = str(source or self.checkpoint_dir / "last.pt")
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            newest = _newest_step_checkpoint(self.run_dir, other_than=Path(source))
            raise KMLError(
                f"checkpoint {source} has no {', '.join(missing)}: it is not a complete kml training checkpoint "
                f"(an edited or foreign file); continue from another of the run's checkpoints"
                + (f": {_resume_from_advice(self.run_dir, newest)}" if newest else "")
            )
        self._check_caches(state.get("data"))
        saved = state["config"]
        saved_custom = saved.get("custom_learner") if isinstance(saved, dict) else None
        if not self.custom:
            if saved_custom:
                raise _custom_run_refusal(self.run_dir, saved_custom)
            saved_config = RunConfig.from_dict(saved)
            if saved_config.learner != self.config.learner:
                ours, theirs = self.config.learner.to_dict(), saved_config.learner.to_dict()
                diff = ", ".join(
                    f"{k}: checkpoint {theirs[k]!r} vs run {ours[k]!r}" for k in ours if ours[k] != theirs.get(k)
                )
                raise KMLError(f"checkpoint is from another learner ({diff})")
        else:
            if not saved_custom:
                raise KMLError(
                    f"checkpoint {source} is a kml-train run's, not a custom learner's ({self.learner_name}); "
                    f"resume it with Trainer.resume('{self.run_dir}') or kml-train --resume"
                )
            if saved_custom != self.learner_name:
                self.logger.info(
                    "checkpoint %s was saved from %s, resumed with %s", source, saved_custom, self.learner_name
                )
            run_settings = LoopSettings(**{k: v for k, v in saved.items() if k in SETTING_NAMES})
            self.settings = dataclasses.replace(
                run_settings, **{k: getattr(self.settings, k) for k in self._given_settings}
            )
            self._update_settings()
        if (state["scheduler"] is None) != (self.scheduler is None):
            had = "no scheduler" if state["scheduler"] is None else "a scheduler"
            raise KMLError(f"checkpoint {source} was trained with {had}; resume it with {had} too (or start a new run)")
        load_model_state(self.learner, state["model"], source)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.best_val = float(state["best_val"])
        self.window = {k: v.to(self.device) for k, v in state["window"].items()}
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def save(self, name: str = "last.pt") -> Path | None:
        if not self.dist.is_main:
            return None
        if not self._parameters_finite():  # a checkpoint on disk is always one that can be resumed
            self._stop_on_non_finite_loss("non-finite parameters", self.step)
        self._sync_run_files()
        return save_checkpoint(self.checkpoint_dir / name, self.state())

    def _sync_run_files(self) -> None:
        """Put the rows and events logged so far on disk before a checkpoint says they were logged."""
        for name in _RUN_CSVS:
            path = self.run_dir / name
            try:
                if path.is_file():
                    with path.open("a") as handle:
                        os.fsync(handle.fileno())
            except OSError as error:
                raise write_failure(path, error, continue_advice()) from None
        self._tensorboard_write(lambda board: board.flush())

    def _parameters_finite(self) -> bool:
        tensors = [t for t in self.learner.state_dict().values() if t.is_floating_point()]
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True

    def _stop_on_non_finite_loss(
        self, what: str = "non-finite loss", step: int | None = None, episode: Episode | None = None
    ) -> None:
        """Leave on disk parameters that are finite and from before the bad step, and stop with what to change.

        The loss of step k is checked before step k's update, so finite parameters now are exactly those before
        it; non-finite ones come from an earlier update that overflowed, and then last.pt is left as it was.
        """
        last = self.checkpoint_dir / "last.pt"
        if self._parameters_finite():
            if self.dist.is_main:
                self._sync_run_files()
                save_checkpoint(last, self.state())
            kept = f"saved the parameters from before it (step {self.step}) in {last}"
        elif self.dist.is_main and last.is_file():
            kept = (
                f"the parameters had already overflowed, so {last} keeps the last checkpoint "
                f"(step {load_checkpoint(last)['step']}), all finite"
            )
        else:
            kept = f"the parameters had already overflowed; {last} keeps the last checkpoint"
        where = f"{what} at step {self.step + 1 if step is None else step}; {kept}"
        if self.custom:
            raise KMLError(
                f"{where}; continue with a smaller learning rate: Trainer(..., run_dir='{self.run_dir}', resume=True), "
                f"then lower the rate in trainer.optimizer.param_groups (and a scheduler's base_lrs) before fit() "
                f"(or pass grad_clip=10)"
            )
        if episode is not None and self._inner_loop_diverged(episode):
            raise KMLError(
                f"{where}; the MAML inner loop diverged (the loss before adaptation is finite, after it is not), "
                f"which the outer --lr cannot fix: start a new run (another --run-name) with a smaller inner rate, "
                f"--inner-lr {self.config.learner.inner_lr / 10:g}, or add --inner-grad-clip 10"
            )
        raise KMLError(
            f"{where}; continue with a smaller outer learning rate: "
            f"kml-train --resume {_run_flags(self.run_dir)} --lr {self.config.lr / 10:g} (or add --grad-clip 10); "
            f"a lower --inner-lr needs a new run"
        )

    def _inner_loop_diverged(self, episode: Episode) -> bool:
        """True when a kml MAML learner's loss is finite before adaptation and not after: the inner rate's fault."""
        if self.custom or self.config.learner.algorithm != "maml" or self.config.learner.meta_sgd:
            return False
        chunk = episode.select(slice(0, self.settings.task_chunk or episode.num_tasks)).to_float()
        try:
            with autocast(self.device, self.settings.bf16):
                before, after = self.learner(chunk, inner_steps=0).loss, self.learner(chunk).loss
        except RuntimeError:  # e.g. out of memory: no diagnosis, the general advice stands
            return False
        return bool(torch.isfinite(before)) and not bool(torch.isfinite(after))

    def _memory_switches(self) -> str:
        learner = self.config.learner
        if learner.algorithm == "maml" and learner.backbone != "resnet12":  # activation checkpointing: packed MAML only
            return "MAML: add --activation-checkpointing; or --bf16"
        return "or --bf16"

    def _out_of_memory(self, error: BaseException, episode: Episode | None) -> KMLError:
        """Out of GPU memory (or CPU memory, the CPU allocator's RuntimeError) drawing or training a meta-batch."""
        need = _memory_need(error)
        if episode is None:  # the sampler holds the whole meta-batch at once: task chunks cannot shrink it
            size = _sampler_value(self.sampler, "meta_batch")
            return KMLError(
                f"out of {need} drawing a meta-batch of {size} tasks at step {self.step + 1}; start a new run with "
                f"a smaller {setting('meta_batch')} (another {setting('run_name')})"
            )
        tasks = episode.num_tasks
        chunk = max(1, (self.settings.task_chunk or tasks) // 2)
        if self.custom:
            return KMLError(
                f"out of {need} at step {self.step + 1} with a meta-batch of {tasks} tasks; the same update in less "
                f"memory: Trainer(..., run_dir='{self.run_dir}', resume=True, task_chunk={chunk}) (or bf16=True)"
            )
        return KMLError(
            f"out of {need} at step {self.step + 1} with --meta-batch {self.config.meta_batch}; the same update "
            f"in less memory: kml-train --resume {_run_flags(self.run_dir)} "
            f"--task-chunk {chunk} ({self._memory_switches()})"
        )

    # ------------------------------------------------------------ logging
    def _make_logger(self) -> logging.Logger:
        logger = logging.getLogger(f"kml.train.{id(self)}")
        logger.setLevel(logging.INFO)
        logger.propagate = False
        return logger

    def _make_tensorboard(self, purge_step: int | None = None):
        """A TensorBoard writer; on resume, ``purge_step`` hides the events a killed run logged after its checkpoint
        (they are logged again, as the CSV rows are)."""
        if not self.dist.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        _quiet_tensorboard_thread_errors()
        try:
            return SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step)
        except (OSError, RuntimeError) as error:  # e.g. a full disk: train on, the CSV files hold the metrics
            self.logger.info("no TensorBoard events: %s", error)
            return None

    def _tensorboard_write(self, write: Callable[[Any], object]) -> None:
        """``write(writer)`` if TensorBoard is on; a failed write (a full disk) is one line."""
        if self.tensorboard is None:
            return
        try:
            write(self.tensorboard)
        except OSError as error:
            raise write_failure(self.run_dir / "tensorboard", error, continue_advice()) from None

    def _reset_window(self) -> None:
        modes = len(self.mode_names)
        zeros = lambda n: torch.zeros(n, dtype=torch.float64, device=self.device)  # noqa: E731
        self.window = {"loss": zeros(1), "accuracy": zeros(modes), "tasks": zeros(modes), "steps": zeros(1)}

    def _metric_columns(self) -> list[str]:
        return ["step", "loss", "accuracy", *[f"accuracy_{m}" for m in self.mode_names], "lr", "time"]

    @property
    def learning_rate(self) -> float:
        """The rate of the next update (of the optimiser's first parameter group)."""
        return self.scheduler.get_last_lr()[0] if self.scheduler is not None else self.optimizer.param_groups[0]["lr"]

    def _truncate_metrics(self) -> None:
        """Drop rows logged after the checkpoint we resume from (they will be logged again)."""
        if not self.dist.is_main:
            return
        for name in _RUN_CSVS:
            path = self.run_dir / name
            if not path.is_file():
                continue
            tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
            try:
                text = path.read_text()
                if text and not text.endswith("\n"):  # a row cut by a kill: drop it (it is logged again)
                    text = text[: text.rfind("\n") + 1]
                reader = csv.DictReader(text.splitlines())
                if not reader.fieldnames:  # killed before its header was written: the next row writes it
                    path.unlink()
                    continue
                rows = [row for row in reader if _step_of(row) is not None and _step_of(row) <= self.step]
                with tmp.open("w", newline="") as handle:  # written aside and renamed: a kill now loses no row
                    writer = csv.DictWriter(handle, fieldnames=reader.fieldnames)
                    writer.writeheader()
                    writer.writerows(rows)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            except OSError as error:
                tmp.unlink(missing_ok=True)
                raise write_failure(path, error) from None

    def _append_csv(self, name: str, columns: list[str], rows: list[dict[str, Any]]) -> None:
        """Append ``rows`` to the run's CSV file ``name``, its header first when the file is new or empty."""
        path = self.run_dir / name
        try:
            with path.open("a", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                if handle.tell() == 0:
                    writer.writeheader()
                writer.writerows(rows)
        except OSError as error:
            raise write_failure(path, error, continue_advice()) from None

    def _write_metrics(self, rows: list[dict[str, Any]]) -> None:
        self._append_csv("metrics.csv", self._metric_columns(), rows)

    def _log_window(self, started: float) -> dict[str, float]:
        window = {k: sum_tensor(v.clone(), self.dist) for k, v in self.window.items()}
        tasks = window["tasks"].clamp(min=1)
        per_mode = (window["accuracy"] / tasks).tolist()
        row = {
            "step": self.step,
            "loss": float(window["loss"] / window["steps"].clamp(min=1)),
            "accuracy": float(window["accuracy"].sum() / tasks.sum()),
            **{
                f"accuracy_{m}": a if n > 0 else ""
                for m, a, n in zip(self.mode_names, per_mode, window["tasks"].tolist())
            },
            "lr": self.learning_rate,
            "time": round(time.time() - started, 3),
        }
        self._reset_window()
        if self.dist.is_main:
            self._write_metrics([row])
            scalars = {f"train/{k}": v for k, v in row.items() if k not in ("step", "time") and v != ""}
            self._tensorboard_write(lambda board: [board.add_scalar(k, v, self.step) for k, v in scalars.items()])
        return row

    # ------------------------------------------------------------ loop
    def _handle_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._stop_signal = signum

    def _should_stop(self) -> bool:
        # Under torchrun all ranks must leave after the same step, or the others wait forever in the next all-reduce.
        return self._stop_agreed if self.dist.enabled else self._stop_signal is not None

    def validate(self) -> float:
        """Mean accuracy (percent) over the validation stores' fixed episodes; logged to validation.csv."""
        settings = self.settings
        names = tuple(self.sampler.mode_names)
        known = all(store.mode in names for store in self.val_stores)  # keep each mode's index as in training
        results = evaluate(
            self.learner,
            self.val_stores,
            settings.ways,
            settings.shots,
            settings.queries,
            settings.val_episodes,
            seed=settings.seed,
            tasks_per_batch=settings.val_tasks_per_batch or 1,
            rotate=[self._rotation.get(store.mode, False) for store in self.val_stores],
            bf16=settings.bf16,
            progress=False,
            mode_indices=[names.index(s.mode) for s in self.val_stores] if known else None,
            mode_names=names if known else None,
        )
        mean = average(results)
        self.logger.info(
            "step %d validation: %s",
            self.step,
            ", ".join(f"{r.mode} {r.accuracy:.2f}±{r.ci95:.2f}" for r in [*results, mean]),
        )
        self._tensorboard_write(
            lambda board: [board.add_scalar(f"val/accuracy_{r.mode}", r.accuracy, self.step) for r in [*results, mean]]
        )
        rows = [
            {"step": self.step, "mode": r.mode, "accuracy": f"{r.accuracy:.4f}", "ci95": f"{r.ci95:.4f}"}
            for r in [*results, mean]
        ]
        self._append_csv("validation.csv", ["step", "mode", "accuracy", "ci95"], rows)
        return mean.accuracy

    def train_step(self, episode: Episode) -> None:
        """One outer step on this rank's share of the meta-batch, ``task_chunk`` tasks at a time."""
        total_tasks = episode.num_tasks
        local = episode.select(slice(self.dist.rank, None, self.dist.world_size)).to(self.device)  # no copy if there
        settings = self.settings

        def forward(chunk: Episode) -> LearnerOutput:
            with autocast(self.device, settings.bf16):
                return self.forward(chunk)

        self.optimizer.zero_grad(set_to_none=False)
        # rank shares sum to the full mean; each chunk of the share is converted to float only when it runs
        output = accumulate_meta_gradient(
            forward, local, settings.task_chunk, local.num_tasks / total_tasks, preprocess=Episode.to_float
        )
        global_loss = (output.loss * (local.num_tasks / total_tasks)).double()
        if self.dist.enabled:
            # The stop request travels with the loss: every rank learns in the same all-reduce that one was signalled.
            requested = torch.tensor(
                float(self._stop_signal is not None), dtype=torch.float64, device=global_loss.device
            )
            global_loss, requests = sum_tensor(torch.stack([global_loss, requested]), self.dist)
            if requests > 0:
                self._stop_agreed = True
        if not torch.isfinite(global_loss):
            self._stop_on_non_finite_loss(episode=local)
        sum_gradients(self.parameters, self.dist)
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.parameters, settings.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        with torch.no_grad():
            modes = len(self.mode_names)
            self.window["loss"] += global_loss if self.dist.is_main else 0.0
            self.window["steps"] += 1.0 if self.dist.is_main else 0.0
            self.window["accuracy"] += torch.zeros(modes, dtype=torch.float64, device=self.device).index_add_(
                0, local.mode, output.task_accuracy.double()
            )
            self.window["tasks"] += torch.bincount(local.mode, minlength=modes).double()

    def fit(self, steps: int | None = None) -> Path:
        """Train until outer step ``steps`` (default: the ``steps`` setting), counted from the start of the run,
        so a resumed run ends where the uninterrupted one would; then let go of the run folder's lock.

        Returns the path of ``last.pt``. A trainer from :meth:`from_config` starts its run here (a new one).
        """
        if steps is not None:
            self._update_settings(steps=steps)
        if self.settings.steps is None:
            raise KMLError("how many steps? pass fit(steps) or the setting steps=N")
        self._stop_signal, self._stop_agreed = None, False  # a fit after an interrupted one continues
        if not self._taken:
            self._take_run(resume=False, overwrite=False)
        elif self.lock is not None and not self.lock.held:  # a second fit (e.g. further): the run is ours again
            self.lock.acquire()
        self._attach_transference_recorder()
        try:
            return self._fit()
        finally:
            self.release()

    def _attach_transference_recorder(self) -> None:
        """A kml-train config's ``transference_every``: record transference while training (once per trainer)."""
        if self.custom or self.config is None or not self.config.transference_every:
            return
        from kml.transference.recorder import TransferenceRecorder

        if not any(isinstance(callback, TransferenceRecorder) for callback in self.callbacks):
            self.callbacks.append(TransferenceRecorder.from_trainer(self))

    def _fit(self) -> Path:
        """Train to ``settings.steps``; on SIGINT/SIGTERM save ``last.pt`` and return early.

        Alone, a signal stops the run after the current step. Under torchrun the ranks learn of it in the
        next step's all-reduce, so all of them stop after that same step (the signalled one runs one more).
        """
        from tqdm.auto import tqdm

        settings = self.settings
        previous = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        started = time.time()
        bar = tqdm(
            total=settings.steps, initial=self.step, desc="meta-train", disable=not self.progress, dynamic_ncols=True
        )
        self.learner.train()
        try:
            while self.step < settings.steps and not self._should_stop():
                episode = None
                try:
                    episode = self.sampler.sample()
                    self.train_step(episode)
                except RuntimeError as error:  # torch.OutOfMemoryError is one
                    if not _is_out_of_memory(error):
                        raise
                    raise self._out_of_memory(error, episode) from None
                self.step += 1
                bar.update(1)
                for callback in self.callbacks:
                    callback(self, self.step, episode)
                if self.step % settings.log_every == 0:
                    row = self._log_window(started)
                    bar.set_postfix(
                        loss=f"{row['loss']:.3f}",
                        **{m[:8]: f"{row[f'accuracy_{m}']:.2f}" for m in self.mode_names if row[f"accuracy_{m}"] != ""},
                    )
                if self.val_stores and (self.step % settings.val_every == 0 or self.step == settings.steps):
                    if self.dist.is_main:
                        accuracy = self.validate()
                        if accuracy > self.best_val:
                            self.best_val = accuracy
                            self.save("best.pt")
                    barrier(self.dist)
                if self.step % settings.checkpoint_every == 0:
                    self.save("last.pt")
                    self.save(f"step_{self.step:06d}.pt")
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        path = self.checkpoint_dir / "last.pt"
        self.save("last.pt")
        if self._stop_signal is not None:
            self.logger.info("stopped by signal %d at step %d; checkpoint %s", self._stop_signal, self.step, path)
        elif self._stop_agreed:
            self.logger.info("stopped at step %d because another rank was signalled; checkpoint %s", self.step, path)
        else:
            self.logger.info("finished at step %d", self.step)
        self._tensorboard_write(lambda board: board.flush())
        return path

    @property
    def interrupted(self) -> bool:
        return self._stop_signal is not None or self._stop_agreed
