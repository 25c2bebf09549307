"""What a run records of itself (``config.json``, a checkpoint's ``config``), and reading it back on resume.

A kml-train run records its :class:`~kml.config.run.RunConfig`. A custom run (a learner no config describes)
records the learner's class, its method and settings where it says them
(:class:`~kml.algorithms.contract.Learner`), the modes and the loop settings (:func:`custom_record`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kml._version import __version__
from kml.config.run import RunConfig
from kml.data.store import check_same_cache
from kml.errors import KMLError
from kml.training.advice import continue_from, newest_step_checkpoint
from kml.training.settings import LOOP_SETTINGS, saved_settings

if TYPE_CHECKING:
    from kml.training.trainer import Trainer

__all__ = [
    "check_recorded",
    "CUSTOM_KEYS",
    "check_same_learner",
    "custom_record",
    "custom_run_refusal",
    "qualified_name",
    "versions",
]

# The keys of a custom run's record (val_tasks_per_batch: what meta_batch now sets, in older records).
CUSTOM_KEYS = frozenset({"custom_learner", "versions", "learner", "modes", "val_tasks_per_batch", *LOOP_SETTINGS})
# What a training checkpoint holds (Trainer.state), checked before resuming from one.
STATE_KEYS = ("config", "step", "best_val", "model", "optimizer", "scheduler", "sampler", "window", "torch_rng")


def versions() -> dict[str, str]:
    # plain str: torch.__version__ is a TorchVersion, which weights-only loading does not read by default
    return {"kml": __version__, "torch": str(torch.__version__), "cuda": str(torch.version.cuda)}


def qualified_name(obj: object) -> str:
    """``module.QualName`` of ``obj``'s class: how a checkpoint names a custom learner."""
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def _learner_settings(learner: Any, name: str) -> dict[str, Any] | None:
    """``learner.settings()`` as JSON values (the method, its settings, the model), or ``None`` without it."""
    from kml.algorithms.contract import Learner

    if not isinstance(learner, Learner):
        return None
    try:
        return json.loads(json.dumps(learner.settings()))
    except (TypeError, ValueError) as error:
        raise KMLError(f"{name}.settings() must give plain values (JSON), got {error}") from None


def custom_record(learner: Any, name: str, config: RunConfig) -> dict[str, Any]:
    """What a custom run records: the learner's class path (``name``), its method and settings when it says them
    (``learner``), the modes and the loop settings."""
    said = _learner_settings(learner, name)
    return {
        "custom_learner": name,
        **({"learner": said} if said is not None else {}),
        "modes": list(config.modes),
        **{key: getattr(config, key) for key in LOOP_SETTINGS},
    }


def custom_run_refusal(run_dir: Path, name: str) -> KMLError:
    """kml's commands cannot rebuild the custom learner ``name`` of the run in ``run_dir``: how to resume it."""
    return KMLError(
        f"run {run_dir} was trained with a custom learner ({name}), which kml-train cannot rebuild; resume it in "
        f"Python: Trainer(learner, sampler, optimizer, scheduler, run_dir='{run_dir}', resume=True).fit()"
    )


def check_same_learner(record: Any, config: RunConfig, run_dir: Path) -> None:
    """Refuse to continue the kml-train run of ``config`` from a checkpoint whose ``record`` is another learner's."""
    if isinstance(record, dict) and record.get("custom_learner"):
        raise custom_run_refusal(run_dir, record["custom_learner"])
    saved = RunConfig.from_dict(record)
    if saved.learner != config.learner:
        ours, theirs = config.learner.to_dict(), saved.learner.to_dict()
        diff = ", ".join(f"{k}: checkpoint {theirs[k]!r} vs run {ours[k]!r}" for k in ours if ours[k] != theirs.get(k))
        raise KMLError(f"checkpoint is from another learner ({diff})")


def check_recorded(trainer: Trainer, state: dict[str, Any], source: str) -> dict[str, Any]:
    """Refuse to continue ``trainer`` from ``state`` (a checkpoint's, read from ``source``) when it is incomplete,
    recorded caches made otherwise or another learner. Returns the loop settings a custom run recorded."""
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        before = (
            f"checkpoint {source} has no {', '.join(missing)}: it is not a complete kml training checkpoint "
            f"(an edited or foreign file); continue from another of the run's checkpoints"
        )
        newest = newest_step_checkpoint(trainer.run_dir, other_than=Path(source))
        raise continue_from(f"{before}: ", trainer.run_dir, newest) if newest else KMLError(before)
    if state.get("data") and trainer.data_identity:  # the caches' identity, recorded since kml 0.3
        for split in ("train", "val"):
            for was, now in zip(state["data"].get(split, []), trainer.data_identity[split]):
                check_same_cache(was, now)
    saved = state["config"]
    if not trainer.custom:
        check_same_learner(saved, trainer.config, trainer.run_dir)
        return {}
    saved_custom = saved.get("custom_learner") if isinstance(saved, dict) else None
    if not saved_custom:
        raise KMLError(
            f"checkpoint {source} is a kml-train run's, not a custom learner's ({trainer.learner_name}); "
            f"resume it with Trainer.resume('{trainer.run_dir}')"
        )
    if saved_custom != trainer.learner_name:
        trainer.logger.info(
            "checkpoint %s was saved from %s, resumed with %s", source, saved_custom, trainer.learner_name
        )
    return saved_settings(saved, trainer.sampler)
