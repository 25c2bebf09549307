"""The loop's settings: the fields of a :class:`~kml.config.run.RunConfig` that the loop reads, with its defaults.

A :class:`~kml.training.trainer.Trainer` takes them as keywords (:data:`LOOP_SETTINGS`); the other fields of
``kml-train`` are decided by the trainer's parts (:data:`PART_SETTINGS`). A trainer built from parts holds a
RunConfig too: its modes, N, K, Q and meta-batch from the sampler (:func:`parts_config`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

from kml.config.run import DATASET_DEFAULTS, RunConfig
from kml.data.episode import Episode
from kml.errors import KMLError

if TYPE_CHECKING:
    from kml.training.trainer import Callback, Trainer

__all__ = [
    "check_parts",
    "check_validation",
    "device_of",
    "LOOP_SETTINGS",
    "PART_SETTINGS",
    "parts_config",
    "rotation_by_mode",
    "Sampler",
    "sampler_value",
    "saved_settings",
    "set_activation_checkpointing",
    "transference_callback",
]

# The RunConfig fields the loop reads: a Trainer's keyword settings.
LOOP_SETTINGS = (
    "steps",
    "log_every",
    "val_every",
    "val_episodes",
    "checkpoint_every",
    "keep_checkpoints",
    "grad_clip",
    "task_chunk",
    "bf16",
    "compile",
    "activation_checkpointing",
    "seed",
    "ways",
    "shots",
    "queries",
    "meta_batch",
    "transference_every",
    "transference_batches",
    "released_checkpoint",
)
# The other RunConfig fields of kml-train: a trainer's parts decide them (what a TypeError says of them).
PART_SETTINGS = {
    **dict.fromkeys(("lr", "lr_halve_every", "lr_schedule", "released_lr_timing"), "the optimizer's and scheduler's"),
    **dict.fromkeys(
        ("modes", "policy", "weights", "rotate_omniglot", "image_size", "data_root", "released_sampling"),
        "the sampler's",
    ),
    **dict.fromkeys(("train_dir", "run_name"), "run_dir's"),
    "device": "the device argument's",
    "learner": "the learner's",
    **dict.fromkeys(("allow_data_departure", "data_departures"), "kml-train's recipe data check's"),
}


class Sampler(Protocol):
    """What the trainer needs of a sampler (:class:`~kml.data.sampler.MixtureSampler` and
    :class:`~kml.data.sampler.EpisodeSampler` have it): ``sample()`` draws the next meta-batch,
    ``mode_names`` names the modes that ``Episode.mode`` indexes, and the state methods make resume exact."""

    mode_names: Sequence[str]

    def sample(self) -> Episode: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def check_parts(sampler: Any, settings: dict[str, Any], world_size: int = 1) -> None:
    """TypeError for keywords that are no loop setting and for a sampler without what the loop calls; a one-line
    error for a meta-batch smaller than the ``world_size`` processes that share its tasks."""
    unknown = sorted(set(settings) - set(LOOP_SETTINGS))
    if unknown:
        decided = [f"{name} is {PART_SETTINGS[name]}" for name in unknown if name in PART_SETTINGS]
        raise TypeError(
            f"Trainer got unknown settings {unknown}; the loop settings are {', '.join(LOOP_SETTINGS)}"
            + (f" ({'; '.join(decided)})" if decided else "")
        )
    lacking = [name for name in ("sample", "mode_names", "state_dict", "load_state_dict") if not hasattr(sampler, name)]
    if lacking:
        kind = f"{type(sampler).__module__}.{type(sampler).__qualname__}"
        raise TypeError(
            f"the sampler ({kind}) has no {', '.join(lacking)}: the trainer draws meta-batches with sample(), names "
            f"the modes that Episode.mode indexes by mode_names, and saves state_dict() for exact resume"
        )
    meta_batch = sampler_value(sampler, "meta_batch")
    if meta_batch is not None and meta_batch < world_size:
        raise KMLError(
            f"a meta-batch of {meta_batch} tasks is smaller than the {world_size} processes that share its tasks; "
            f"use {world_size} or more"
        )


def check_validation(trainer: Trainer) -> None:
    """Refuse, before a run folder is made, validation stores that cannot hold the run's validation tasks (fewer
    classes than N, a class with fewer than K + Q images): the first validation would fail only after training."""
    from kml.data.sampler import EpisodeSampler

    config = trainer.config
    for store in trainer.val_stores:  # the sampler's checks, the episodes validation draws
        EpisodeSampler(store, config.ways, config.shots, config.queries, rotate=trainer.rotation.get(store.mode, False))


def sampler_value(sampler: Any, name: str) -> Any:
    """``sampler.<name>``, or that of its first per-mode sampler (a :class:`MixtureSampler`), or ``None``."""
    if hasattr(sampler, name):
        return getattr(sampler, name)
    inner = getattr(sampler, "samplers", None)
    return getattr(inner[0], name, None) if inner else None


def rotation_by_mode(sampler: Any) -> dict[str, bool]:
    """Which of the sampler's modes rotate their classes (validation draws those modes' tasks alike)."""
    inner = getattr(sampler, "samplers", None)
    if inner is None:  # one mode's sampler: its tasks are of mode_names[mode_index]
        return {sampler.mode_names[getattr(sampler, "mode_index", 0)]: bool(getattr(sampler, "rotate", False))}
    return {name: bool(getattr(s, "rotate", False)) for s, name in zip(inner, sampler.mode_names)}


def device_of(module: torch.nn.Module) -> str:
    """Where ``module``'s first parameter or buffer is (``cpu`` without any)."""
    tensor = next(iter([*module.parameters(), *module.buffers()]), None)
    return str(tensor.device) if tensor is not None else "cpu"


def parts_config(sampler: Any, settings: dict[str, Any], validation: bool) -> RunConfig:
    """The RunConfig of a run composed of parts, before its ``settings``: the sampler's modes, N, K, Q, meta-batch
    (a :class:`~kml.data.sampler.MixtureSampler`'s policy and weights) where it has them, the published validation
    and checkpoint cadence. ``validation`` (there are validation stores) needs N, K and Q."""
    values: dict[str, Any] = {"modes": [str(name) for name in sampler.mode_names]}
    for name in ("ways", "shots", "queries", "meta_batch"):
        if sampler_value(sampler, name) is not None:
            values[name] = int(sampler_value(sampler, name))
    if validation and {"ways", "shots", "queries"} - set(values) - set(settings):
        raise KMLError("validation needs ways, shots and queries, and the sampler has none: pass them as settings")
    drawn = values.get("meta_batch")
    if drawn is not None and settings.get("meta_batch", drawn) != drawn:
        raise KMLError(f"meta_batch={settings['meta_batch']}, but the sampler draws {drawn} tasks a step")
    if isinstance(getattr(sampler, "policy", None), str):  # a MixtureSampler: transference draws alike
        values["policy"] = sampler.policy
        values["weights"] = sampler.weights.tolist() if getattr(sampler, "weighted", False) else None
    return RunConfig(
        **{name: DATASET_DEFAULTS[name] for name in ("val_every", "checkpoint_every", "val_episodes")}, **values
    )


def saved_settings(record: dict[str, Any], sampler: Any) -> dict[str, Any]:
    """The loop settings a custom run's record holds, less those its sampler now decides (its meta-batch) and
    those unknown when it was saved (``None``: N, K, Q of a sampler without them)."""
    ours = {"meta_batch"} if sampler_value(sampler, "meta_batch") is not None else set()
    return {k: v for k, v in record.items() if k in LOOP_SETTINGS and k not in ours and v is not None}


def set_activation_checkpointing(learner: Any, on: bool, name: str) -> None:
    """Turn a learner's activation checkpointing on or off; refused for a learner without it (``name``)."""
    if hasattr(learner, "activation_checkpointing"):
        learner.activation_checkpointing = on
    elif on:
        raise KMLError(f"activation_checkpointing: the learner ({name}) has no activation checkpointing")


def transference_callback(trainer: Trainer) -> Callback:
    """``transference_every``: a callback recording transference.csv on meta-batches of its own, drawn as the
    trainer's :class:`~kml.data.sampler.MixtureSampler` draws (recording never changes the training batches)."""
    from kml.transference.recorder import TransferenceRecorder

    if not hasattr(trainer.sampler, "samplers"):  # the recorder draws from a MixtureSampler's stores alike
        kind = f"{type(trainer.sampler).__module__}.{type(trainer.sampler).__qualname__}"
        raise KMLError(f"transference_every records from a kml MixtureSampler's modes; the sampler is {kind}")
    return TransferenceRecorder.from_trainer(trainer)
