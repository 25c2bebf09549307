"""kml-train's launch policy: the parts of a run built from a :class:`~kml.config.run.RunConfig`, a new run (over an
old one with overwrite), or a run resumed with the settings it recorded.

``kml-train`` and ``kml-results`` call :func:`checked_values` then :func:`start`; in Python, :func:`build_trainer`
(``Trainer.from_config``), :func:`create_run` (``Trainer.create``) and :func:`resume_run` (``Trainer.resume``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kml.algorithms import build_learner
from kml.config.checks import check_device, check_run_combinations, check_run_name, check_values
from kml.config.data_checks import check_recipe_data
from kml.config.learner import LearnerConfig
from kml.config.run import RunConfig
from kml.data.modes import ROTATED_BY_DEFAULT, expand_modes, has_split, load_stores, mode_label
from kml.data.sampler import MixtureSampler
from kml.errors import KMLError, setting
from kml.files import resume_words
from kml.runtime import check_bf16
from kml.training.advice import continue_from, newest_step_checkpoint, switch
from kml.training.checkpoint import load_checkpoint
from kml.training.distributed import DistInfo, barrier, resolve_device
from kml.training.recovery import out_of_memory_as_one_line
from kml.training.run_folder import (
    check_printable,
    continue_loaded_run,
    load_for_resume,
    refuse_resume_without_last,
    replaces_existing,
    start_new_run,
)
from kml.training.run_lock import RunLock
from kml.training.run_record import custom_run_refusal, versions
from kml.training.schedule import build_scheduler
from kml.training.trainer import Trainer

__all__ = [
    "build_trainer",
    "checked_values",
    "config_from_values",
    "create_run",
    "default_run_name",
    "RESUME_CHANGES",
    "resume_run",
    "run_directory",
    "start",
]

# What a resume may change: the continuation stays the uninterrupted run's, but for the rounding of bf16 (a device
# without it continues in float32) and the outer rate and clipping (to continue past a non-finite loss).
RESUME_CHANGES = frozenset(
    {
        "steps",
        "device",
        "data_root",
        "log_every",
        "val_every",
        "checkpoint_every",
        "keep_checkpoints",
        "val_episodes",
        "train_dir",
        "run_name",
        "bf16",
        "task_chunk",
        "activation_checkpointing",
        "lr",
        "grad_clip",
    }
)


def default_run_name(config: RunConfig) -> str:
    """``method_modes_NwKs``: the method is the recipe's name when the run starts from one (``mmaml``), else
    ``[multi-]algorithm-modulation`` (``maml-film``), so a recipe's run and its closest flags differ in name."""
    learner = config.learner
    method = f"{'multi-' if learner.multi_maml else ''}{learner.algorithm}-{learner.modulation}"
    if config.recipe:
        method = config.recipe.partition("@")[0]
    # a folder mode by its short name, else its path (the options of its split left out)
    modes = [_run_name_part(m) for m in config.modes]
    return f"{method}_{'-'.join(modes)}_{config.ways}w{config.shots}s"


def _run_name_part(mode: str) -> str:
    label = mode_label(mode)
    if label != mode:
        return label
    return mode.split(":", 1)[1].replace("/", "_") if mode.startswith("folder") and ":" in mode else mode


def run_directory(config: RunConfig) -> Path:
    """``<train_dir>/<run_name>`` (the run name by default from the recipe or method, modes, N and K)."""
    return check_printable(Path(config.train_dir) / check_run_name(config.run_name or default_run_name(config)))


def checked_values(values: Mapping[str, Any], resume: bool = False) -> dict[str, Any]:
    """kml-train's flat settings (run and learner fields) checked before anything is loaded or any folder touched,
    a recipe's values under those given (``recipe``: a new run only)."""
    values = check_values(values)
    if "recipe" in values:  # the recipe's values first, then those given
        if resume:
            raise KMLError(f"{resume_words()} continues the run's recorded settings; drop {setting('recipe')}")
        from kml.config.recipes import recipe_values

        given = {k: v for k, v in values.items() if k not in ("recipe", "recipe_overrides")}
        values = check_values(recipe_values(values["recipe"], given))
    check_device(values.get("device", "auto"))
    if "run_name" in values:
        check_run_name(values["run_name"])
    return values


def config_from_values(values: Mapping[str, Any]) -> RunConfig:
    """Split flat settings into a RunConfig with its LearnerConfig."""
    learner_fields = {f.name for f in dataclasses.fields(LearnerConfig)}
    run_fields = {f.name for f in dataclasses.fields(RunConfig)} - {"learner"}
    unknown = sorted(set(values) - learner_fields - run_fields)
    if unknown:
        raise KMLError(f"unknown settings {unknown}")
    learner = LearnerConfig(**{k: v for k, v in values.items() if k in learner_fields})
    return RunConfig(learner=learner, **{k: v for k, v in values.items() if k in run_fields})


def start(
    values: Mapping[str, Any],
    *,
    resume: bool = False,
    resume_from: str | os.PathLike | None = None,
    overwrite: bool = False,
    dist_info: DistInfo | None = None,
    progress: bool = True,
) -> Trainer:
    """kml-train's run of ``values`` (:func:`checked_values`): resumed (``resume``; from ``resume_from``, one of the
    run's checkpoints) or new (over an old run of the same name with ``overwrite``). :meth:`Trainer.fit` trains it."""
    resume = resume or resume_from is not None
    if resume and overwrite:
        raise KMLError(
            f"{resume_words()} continues a run and {switch('overwrite')} starts it again; pass only one of them"
        )
    if not resume:
        return create_run(config_from_values(values), overwrite, dist_info, progress)
    if "run_name" not in values:
        raise KMLError(f"{resume_words()} needs {setting('run_name')} of the run to continue")
    run_dir = run_directory(RunConfig(train_dir=values.get("train_dir", "train_dir"), run_name=values["run_name"]))
    return resume_run(run_dir, dict(values), dist_info, progress, checkpoint=resume_from)


def _device(config: RunConfig, info: DistInfo) -> str:
    device = resolve_device(config.device, info)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KMLError(
            f"{setting('device', 'cuda')} asked for, but no CUDA GPU is available; use {setting('device', 'cpu')}"
        )
    if config.bf16:
        check_bf16(device)
    return device


def _sampler(config: RunConfig, stores: list) -> MixtureSampler:
    rotate = [config.rotate_omniglot and mode in ROTATED_BY_DEFAULT for mode in config.modes]
    return MixtureSampler(
        stores,
        config.ways,
        config.shots,
        config.queries,
        config.meta_batch,
        config.policy,
        config.weights,
        rotate,
        config.seed,
        dtype=torch.uint8,
        replacement_pool=_replacement_pool(config),
        shuffle_block_labels=config.learner.released_refinement,  # the released layout its pairing acts on
    )


def _replacement_pool(config: RunConfig) -> int | None:
    """``released_sampling``: the released codes pick with replacement among ``meta_batch`` tasks per mode; a
    Multi-MAML run stands for one released run per mode, each of meta-batch ``meta_batch / modes``."""
    if not config.released_sampling:
        return None
    return max(1, config.meta_batch // len(config.modes)) if config.learner.multi_maml else config.meta_batch


def _learner(config: RunConfig, device: str) -> torch.nn.Module:
    """The learner of ``config.learner`` on ``device``; out of memory or compile where it cannot run is one line."""
    smaller = f"use a smaller {setting('base_channels')}, {setting('encoder_channels')} or {setting('image_size')}"
    with out_of_memory_as_one_line("building the learner", smaller):
        learner = build_learner(config.learner).to(device)
    learner.activation_checkpointing = config.activation_checkpointing
    if config.compile and config.learner.algorithm == "maml" and not config.learner.first_order:
        raise KMLError(
            f"{switch('compile')} cannot run second-order MAML (torch.compile does not differentiate twice); "
            f"add {switch('first_order')} or drop {switch('compile')}"
        )
    return learner


def build_trainer(
    config: RunConfig,
    run_dir: str | os.PathLike | None = None,
    dist_info: DistInfo | None = None,
    progress: bool = True,
    new_run: bool = True,
) -> Trainer:
    """The trainer ``kml-train`` builds for ``config``: its modes' stores, a :class:`MixtureSampler`, the learner of
    ``config.learner``, Adam and the config's rate schedule (``build_scheduler``). ``new_run=False`` (resuming)
    accepts recorded settings that an earlier kml let through without effect.

    ``run_dir`` defaults to ``<train_dir>/<run_name>``. The run folder is taken by :meth:`Trainer.fit` (a new run,
    refused if one exists); :func:`create_run` and :func:`resume_run` take it for ``kml-train``.
    """
    config = config.resolved()
    check_run_combinations(config, new_run)
    if new_run:  # a published recipe refuses other data, or records the departures it was allowed
        config = dataclasses.replace(config, data_departures=check_recipe_data(config))
    info = dist_info or DistInfo()
    device = _device(config, info)
    torch.manual_seed(config.seed)  # the learner's initialisation
    loading = f"loading the images at {config.image_size or 'their stored'} pixels a side"
    with out_of_memory_as_one_line(loading, f"use a smaller {setting('image_size')}"):
        train_stores = load_stores(
            config.modes, "train", config.data_root, config.image_size, 3, device, progress=progress
        )
        side = train_stores[0].image_shape[1]
        val_modes = [m for m in config.modes if has_split(m, "val", config.data_root)]  # omniglot=released: no val
        val_stores = (
            load_stores(val_modes, "val", config.data_root, side, 3, device, progress=progress) if val_modes else []
        )
    learner_config = dataclasses.replace(config.learner, image_size=side, in_channels=3)
    config = dataclasses.replace(config, image_size=side, learner=learner_config)
    sampler = _sampler(config, train_stores)
    if config.meta_batch < info.world_size:
        raise KMLError(
            f"{setting('meta_batch', config.meta_batch)} is smaller than the {info.world_size} processes that share "
            f"its tasks; use {setting('meta_batch', info.world_size)} or more"
        )
    learner = _learner(config, device)
    optimizer = torch.optim.Adam([p for p in learner.parameters() if p.requires_grad], lr=config.lr)
    scheduler = build_scheduler(optimizer, config)  # per-recipe schedule (halved or constant)
    trainer = Trainer(
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
        resume=None,  # the run folder is taken by fit, create_run or resume_run
    )
    trainer.data_identity = {  # checkpoints record the caches, so eval and resume notice one converted again
        "train": [store.identity() for store in train_stores],
        "val": [store.identity() for store in val_stores],
    }
    return trainer


def create_run(
    config: RunConfig, overwrite: bool = False, dist_info: DistInfo | None = None, progress: bool = True
) -> Trainer:
    """Start a new ``kml-train`` run. With ``overwrite`` an existing run of the same name is deleted, but only
    once the new one has been built (data loaded, learner made): a setting that fails leaves the old run intact."""
    config = config.resolved()
    check_run_combinations(config)
    run_dir = run_directory(config)
    info = dist_info or DistInfo()
    made_parent = not run_dir.parent.exists()  # the train dir, made by the lock: a failed start removes it
    lock = RunLock(run_dir).acquire() if info.is_main else None
    try:
        replace = replaces_existing(run_dir, overwrite, setting("run_name"))
        barrier(info)
        trainer = build_trainer(config, run_dir, info, progress)
        trainer.folder.lock, trainer.folder.made_parent = lock, made_parent
        start_new_run(trainer, replace)  # a start that fails there removes the run folder it made
        trainer.logger.info("new run %s: %s", run_dir, trainer.config.to_dict())
    except BaseException:
        if lock is not None:
            lock.release()
            if made_parent:
                try:
                    run_dir.parent.rmdir()  # only when empty
                except OSError:
                    pass
        raise
    return trainer


def resume_run(
    run_dir: str | os.PathLike,
    overrides: dict[str, Any] | None = None,
    dist_info: DistInfo | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
) -> Trainer:
    """Continue the ``kml-train`` run in ``run_dir`` from ``checkpoints/last.pt`` (or from ``checkpoint``, one of
    the run's own, e.g. ``step_000009.pt``: later rows of its CSV files are dropped, as after a kill).

    ``overrides`` may change what :data:`RESUME_CHANGES` names: ``steps``, ``device``, ``data_root``, logging
    cadence, ``bf16`` (a device without native bf16 continues in float32: rounding differs, the method does not),
    and ``lr`` / ``grad_clip`` (to continue past a non-finite loss); any other change would make the continuation
    differ from the uninterrupted run and is refused. The settings it continues with are written back to
    ``config.json``, so a later resume keeps them.
    """
    run_dir = Path(run_dir)
    info = dist_info or DistInfo()
    lock = RunLock(run_dir).acquire() if info.is_main else None
    try:
        trainer = _resumed(run_dir, overrides or {}, info, progress, lock, checkpoint)
        trainer.logger.info("resumed %s at step %d", run_dir, trainer.step)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return trainer


def _resumed(
    run_dir: Path,
    overrides: dict[str, Any],
    info: DistInfo,
    progress: bool,
    lock: RunLock | None,
    checkpoint: str | os.PathLike | None,
) -> Trainer:
    if not run_dir.is_dir():
        raise KMLError(
            f"cannot resume: there is no run folder {run_dir}; start the run by leaving out {resume_words()}"
        )
    last = _resume_source(run_dir, checkpoint)
    config = _with_overrides(_resume_config(run_dir / "config.json", last), overrides, run_dir)
    if not last.is_file():
        refuse_resume_without_last(run_dir)
        raise KMLError(
            f"cannot resume {run_dir}: it has no checkpoint (it stopped before its first save); start it again with "
            f"the same settings, {switch('overwrite')} instead of {resume_words()}"
        )
    trainer = build_trainer(config, run_dir, info, progress, new_run=False)
    trainer.folder.lock = lock
    trainer.load_state(load_for_resume(run_dir, last, trainer.device), source=last)
    _set_base_lr(trainer, config.lr)
    continue_loaded_run(trainer)
    if last.name != "last.pt":  # the earlier step is the run now: a crash before the next save must not return
        trainer.save("last.pt")  # to the abandoned last.pt, whose rows the CSVs no longer hold
    return trainer


def _with_overrides(config: RunConfig, overrides: dict[str, Any], run_dir: Path) -> RunConfig:
    """``config`` with the changes a resume may make; any other setting asked must be the run's."""
    changed = {}
    for key, value in overrides.items():
        current = getattr(config, key) if hasattr(config, key) else getattr(config.learner, key, None)
        if key == "modes":
            value = expand_modes(value)
        if value != current and key not in RESUME_CHANGES:
            changed[key] = (current, value)
    if changed:
        diff = ", ".join(f"{k}: run has {a!r}, asked {b!r}" for k, (a, b) in changed.items())
        raise KMLError(f"cannot resume {run_dir} with different settings ({diff}); start a new run instead")
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if k in RESUME_CHANGES})
    if config.run_name != run_dir.name or Path(config.train_dir) != run_dir.parent:
        config = dataclasses.replace(config, train_dir=str(run_dir.parent), run_name=run_dir.name)
    return config


def _set_base_lr(trainer: Trainer, lr: float) -> None:
    """A learning rate changed on resume: the schedule continues from it (halvings already due included)."""
    scheduler = trainer.scheduler
    if scheduler.base_lrs == [lr]:
        return
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    halvings = scheduler.last_epoch // scheduler.step_size
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr * scheduler.gamma**halvings
    scheduler._last_lr = [group["lr"] for group in trainer.optimizer.param_groups]


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
        raise custom_run_refusal(config_path.parent, custom)
    try:
        return RunConfig.load(config_path)
    except KMLError as error:
        if not last.is_file():
            raise _no_settings(config_path, last, error) from None
        reason = error
    saved = load_checkpoint(last).get("config")
    if isinstance(saved, dict) and saved.get("custom_learner"):
        raise custom_run_refusal(config_path.parent, saved["custom_learner"])
    config = RunConfig.from_dict(saved)
    config.save(config_path, {"versions": versions()})
    print(f"warning: {reason}; rewrote it from the settings saved in {last}", file=sys.stderr)
    return config


def _no_settings(config_path: Path, last: Path, error: KMLError) -> KMLError:
    """Neither config.json nor last.pt holds the run's settings: what to do instead."""
    run_dir = config_path.parent
    if not config_path.is_file():
        return KMLError(f"cannot resume: {config_path} not found (is {run_dir} a kml run folder?)")
    missing = f"cannot resume: {error}; and there is no {last} to recover the settings from"
    newest = newest_step_checkpoint(run_dir)
    if newest is not None:  # it holds the settings too: never advise deleting checkpoints
        return continue_from(f"{missing}: continue from {newest.name}, which holds them: ", run_dir, newest)
    return KMLError(
        f"{missing}: start it again with the same settings, {switch('overwrite')} instead of {resume_words()}"
    )
