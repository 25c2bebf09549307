"""The meta-training loop: sampler -> learner -> optimiser, with logs, validation and checkpoints.

:class:`Trainer` composes the parts of a run: any learner module that returns a
:class:`~kml.algorithms.LearnerOutput`, any episode sampler, any torch optimiser and
(optionally) a learning-rate scheduler. :meth:`Trainer.from_config` builds those parts from a
:class:`~kml.training.run_config.RunConfig` exactly as ``kml-train`` does.

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
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

import kml
from kml.algorithms import LearnerOutput, MetaLearner, build_learner
from kml.algorithms.chunking import accumulate_meta_gradient
from kml.data.episode import Episode
from kml.data.modes import ROTATED_BY_DEFAULT, expand_modes, load_stores
from kml.data.sampler import MixtureSampler
from kml.data.store import ImageStore
from kml.errors import KMLError
from kml.evaluation import average, evaluate
from kml.runtime import autocast, check_bf16
from kml.training.checkpoint import load_checkpoint, load_model_state, remove_stale_temp_files, save_checkpoint
from kml.training.distributed import DistInfo, barrier, resolve_device, sum_gradients, sum_tensor
from kml.training.run_config import RunConfig, build_scheduler
from kml.training.run_lock import RunLock
from kml.validation import (
    OPT_INT_1,
    TRAIN_NUMBERS,
    Number,
    check_bools,
    check_fields,
    check_run_combinations,
    check_run_name,
)

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
    return Path(config.train_dir) / check_run_name(config.run_name or default_run_name(config))


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
        raise KMLError(
            f"run {run_dir} already exists but has no checkpoint to resume (it stopped before its first save); "
            f"add {words['overwrite']} to delete it and start again"
        )
    if not (run_dir / "config.json").is_file() and not (run_dir / "checkpoints").is_dir():
        raise KMLError(
            f"{run_dir} is not a kml run folder (no config.json); {words['overwrite']} deletes only runs: "
            f"choose another {words['name']}"
        )
    return True


def _discard(run_dir: Path) -> None:
    """Delete the run that ``--overwrite`` replaces: first renamed aside (one atomic step), then removed."""
    aside = run_dir.parent / f".{run_dir.name}.overwritten-{os.getpid()}"
    try:
        os.replace(run_dir, aside)
    except OSError as error:
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
            raise KMLError(
                f"cannot resume: {error}; and there is no {last} to recover the settings from: start it again with "
                f"the same kml-train command, --overwrite instead of --resume"
            ) from None
        reason = error
    saved = load_checkpoint(last)["config"]
    if isinstance(saved, dict) and saved.get("custom_learner"):
        raise _custom_run_refusal(config_path.parent, saved["custom_learner"])
    config = RunConfig.from_dict(saved)
    config.save(config_path, {"versions": versions()})
    print(f"warning: {reason}; rewrote it from the settings saved in {last}", file=sys.stderr)
    return config


def versions() -> dict[str, str]:
    # plain str: torch.__version__ is a TorchVersion, which weights-only loading does not read by default
    return {"kml": kml.__version__, "torch": str(torch.__version__), "cuda": str(torch.version.cuda)}


def qualified_name(obj: object) -> str:
    """``module.QualName`` of ``obj``'s class: how a checkpoint names a custom learner."""
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def _write_json(path: Path, values: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(values, indent=2))
    os.replace(tmp, path)  # a kill mid-write leaves the old file or the new one, never half of one


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
        self.run_dir = Path(run_dir)
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
    ) -> Trainer:
        """The trainer ``kml-train`` builds for ``config``: its modes' stores, a :class:`MixtureSampler`, the
        learner of ``config.learner``, Adam and the config's rate schedule (``build_scheduler``).

        ``run_dir`` defaults to ``<train_dir>/<run_name>``. The run folder is taken by :meth:`fit` (a new run,
        refused if one exists); :meth:`create` and :meth:`resume` take it for ``kml-train``.
        """
        config = config.resolved()
        check_run_combinations(config)
        info = dist_info or DistInfo()
        device = resolve_device(config.device, info)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise KMLError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
        if config.bf16:
            check_bf16(device)
        torch.manual_seed(config.seed)  # the learner's initialisation

        rotate = [config.rotate_omniglot and mode in ROTATED_BY_DEFAULT for mode in config.modes]
        train_stores = load_stores(config.modes, "train", config.data_root, config.image_size, 3, device)
        side = train_stores[0].image_shape[1]
        learner_config = dataclasses.replace(config.learner, image_size=side, in_channels=3)
        config = dataclasses.replace(config, image_size=side, learner=learner_config)
        val_stores = load_stores(config.modes, "val", config.data_root, side, 3, device)
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
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        trainer.logger.info("new run %s: %s", run_dir, trainer.config.to_dict())
        return trainer

    @classmethod
    def resume(
        cls,
        run_dir: str | Path,
        overrides: dict[str, Any] | None = None,
        dist_info: DistInfo | None = None,
        progress: bool = True,
    ) -> Trainer:
        """Continue the ``kml-train`` run in ``run_dir`` from ``checkpoints/last.pt``.

        ``overrides`` may change ``steps``, ``device``, ``data_root``, logging cadence and ``bf16`` (a
        device without native bf16 continues in float32: rounding differs, the method does not), and
        ``lr`` / ``grad_clip`` (to continue past a non-finite loss); any other change would make the
        continuation differ from the uninterrupted run and is refused.
        """
        run_dir = Path(run_dir)
        info = dist_info or DistInfo()
        lock = RunLock(run_dir).acquire() if info.is_main else None
        try:
            trainer = cls._resumed(run_dir, overrides or {}, info, progress, lock)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        trainer.logger.info("resumed %s at step %d", run_dir, trainer.step)
        return trainer

    @classmethod
    def _resumed(
        cls, run_dir: Path, overrides: dict[str, Any], info: DistInfo, progress: bool, lock: RunLock | None
    ) -> Trainer:
        last = run_dir / "checkpoints" / "last.pt"
        if not run_dir.is_dir():
            raise KMLError(f"cannot resume: there is no run folder {run_dir}; start the run by leaving out --resume")
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
            raise KMLError(
                f"cannot resume {run_dir}: it has no checkpoint (it stopped before its first save); "
                f"start it again: the same kml-train command with --overwrite instead of --resume"
            )
        trainer = cls.from_config(config, run_dir, info, progress)
        trainer.lock = lock
        trainer.load_state(load_checkpoint(last, trainer.device))
        trainer._set_base_lr(config.lr)
        trainer._continue_run()
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
                    raise KMLError(
                        f"cannot resume {self.run_dir}: it has no checkpoints/last.pt (it never started, or stopped before "
                        f"its first save); start it with resume=False{', overwrite=True' if self.run_dir.is_dir() else ''}"
                    )
                self.load_state(load_checkpoint(last, self.device))
                self._continue_run()
            else:
                replace = _existing_run(self.run_dir, overwrite, _PYTHON_WORDS)
                barrier(self.dist)
                self._start_run(replace)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        if resume:
            self.logger.info("resumed %s at step %d", self.run_dir, self.step)
        else:
            self.logger.info("new run %s: %s", self.run_dir, self._config_record())

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
        """After loading last.pt: run files opened, rows logged after that checkpoint dropped."""
        if self.dist.is_main:
            self._open_run_files()
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

    def _open_run_files(self) -> None:
        """Create the run folder and open log.txt and TensorBoard; drop temp files a killed run left behind."""
        try:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(self.run_dir / "log.txt")
        except OSError as error:
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
        self.tensorboard = self._make_tensorboard()

    def _write_config_file(self) -> None:
        if self.custom:
            _write_json(self.run_dir / "config.json", {**self._config_record(), "versions": versions()})
        else:
            self.config.save(self.run_dir / "config.json", {"versions": versions()})

    def release(self) -> None:
        """Let go of the run folder (end of fit, or a trainer used without fit)."""
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
        }

    def load_state(self, state: dict[str, Any]) -> None:
        source = str(self.checkpoint_dir / "last.pt")
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
        return save_checkpoint(self.checkpoint_dir / name, self.state())

    def _parameters_finite(self) -> bool:
        tensors = [t for t in self.learner.state_dict().values() if t.is_floating_point()]
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True

    def _stop_on_non_finite_loss(self, what: str = "non-finite loss", step: int | None = None) -> None:
        """Leave on disk parameters that are finite and from before the bad step, and stop with what to change.

        The loss of step k is checked before step k's update, so finite parameters now are exactly those before
        it; non-finite ones come from an earlier update that overflowed, and then last.pt is left as it was.
        """
        last = self.checkpoint_dir / "last.pt"
        if self._parameters_finite():
            if self.dist.is_main:
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
        run = f"--train-dir {self.run_dir.parent} --run-name {self.run_dir.name}"
        raise KMLError(
            f"{where}; continue with a smaller outer learning rate: "
            f"kml-train --resume {run} --lr {self.config.lr / 10:g} (or add --grad-clip 10); "
            f"a lower --inner-lr needs a new run"
        )

    def _memory_switches(self) -> str:
        learner = self.config.learner
        if learner.algorithm == "maml" and learner.backbone != "resnet12":  # activation checkpointing: packed MAML only
            return "MAML: add --activation-checkpointing; or --bf16"
        return "or --bf16"

    def _out_of_memory(self, tasks: int) -> KMLError:
        chunk = max(1, (self.settings.task_chunk or tasks) // 2)
        if self.custom:
            return KMLError(
                f"out of GPU memory at step {self.step + 1} with a meta-batch of {tasks} tasks; the same update in less "
                f"memory: Trainer(..., run_dir='{self.run_dir}', resume=True, task_chunk={chunk}) (or bf16=True)"
            )
        return KMLError(
            f"out of GPU memory at step {self.step + 1} with --meta-batch {self.config.meta_batch}; the same update "
            f"in less memory: kml-train --resume --train-dir {self.run_dir.parent} --run-name {self.run_dir.name} "
            f"--task-chunk {chunk} ({self._memory_switches()})"
        )

    # ------------------------------------------------------------ logging
    def _make_logger(self) -> logging.Logger:
        logger = logging.getLogger(f"kml.train.{id(self)}")
        logger.setLevel(logging.INFO)
        logger.propagate = False
        return logger

    def _make_tensorboard(self):
        if not self.dist.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        try:
            return SummaryWriter(str(self.run_dir / "tensorboard"))
        except (OSError, RuntimeError) as error:  # e.g. a full disk: train on, the CSV files hold the metrics
            self.logger.info("no TensorBoard events: %s", error)
            return None

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
        for name in ("metrics.csv", "validation.csv", "transference.csv"):
            path = self.run_dir / name
            if not path.is_file():
                continue
            text = path.read_text()
            if text and not text.endswith("\n"):  # a row cut by a kill: drop it (it is logged again)
                text = text[: text.rfind("\n") + 1]
            reader = csv.DictReader(text.splitlines())
            fields = reader.fieldnames or []
            rows = [row for row in reader if _step_of(row) is not None and _step_of(row) <= self.step]
            tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
            with tmp.open("w", newline="") as handle:  # written aside and renamed: a kill now loses no row
                writer = csv.DictWriter(handle, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, path)

    def _write_metrics(self, rows: list[dict[str, Any]]) -> None:
        path = self.run_dir / "metrics.csv"
        new = not path.is_file()
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self._metric_columns())
            if new:
                writer.writeheader()
            writer.writerows(rows)

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
            if self.tensorboard:
                for key, value in row.items():
                    if key not in ("step", "time") and value != "":
                        self.tensorboard.add_scalar(f"train/{key}", value, self.step)
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
        if self.tensorboard:
            for r in [*results, mean]:
                self.tensorboard.add_scalar(f"val/accuracy_{r.mode}", r.accuracy, self.step)
        with (self.run_dir / "validation.csv").open("a") as handle:
            if handle.tell() == 0:
                handle.write("step,mode,accuracy,ci95\n")
            for r in [*results, mean]:
                handle.write(f"{self.step},{r.mode},{r.accuracy:.4f},{r.ci95:.4f}\n")
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
            self._stop_on_non_finite_loss()
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
                episode = self.sampler.sample()
                try:
                    self.train_step(episode)
                except torch.OutOfMemoryError:
                    raise self._out_of_memory(episode.num_tasks) from None
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
        if self.tensorboard:
            self.tensorboard.flush()
        return path

    @property
    def interrupted(self) -> bool:
        return self._stop_signal is not None or self._stop_agreed
