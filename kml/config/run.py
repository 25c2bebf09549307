"""The run configuration: everything needed to rebuild a training run."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kml.config.checks import check_bools, check_device, check_fields, check_run_name
from kml.config.learner import RENAMED_FIELDS, LearnerConfig
from kml.data.modes import expand_modes
from kml.data.sampler import MIXTURE_POLICIES
from kml.errors import KMLError, setting
from kml.files import write_json

__all__ = [
    "DATASET_DEFAULTS",
    "learning_rate_at",
    "LR_SCHEDULES",
    "PUBLISHED_STEPS",
    "RELEASED_QUIRKS",
    "RunConfig",
    "SYNTHETIC_DEMO",
]

# Published KML defaults (its main.py): 5-way, 15 queries, meta-batch 10, 30000 outer steps,
# Adam 1e-3 halved every 10000 steps, checkpoint every 1000 steps.
PUBLISHED_STEPS = 30000
# The released-code quirks a run can switch on (each a RunConfig or LearnerConfig field, recorded in config.json).
RUN_QUIRKS = ("released_sampling", "released_lr_timing", "released_checkpoint")
LEARNER_QUIRKS = ("released_query_modulation", "released_refinement")
RELEASED_QUIRKS = (*LEARNER_QUIRKS, *RUN_QUIRKS)
# Outer learning-rate schedules: KML's halving (every lr_halve_every steps) or MMAML's constant rate.
LR_SCHEDULES = ("halve", "constant")
# What RunConfig.resolved fills in when not given: the published run for datasets (validation cadence kml's),
# and the no-download demo for synthetic modes, kept small enough for a laptop CPU (its duration is stated once,
# in README's quick start; kml-train's help takes these numbers from here).
DATASET_DEFAULTS = {
    "steps": PUBLISHED_STEPS,
    "val_every": 1000,
    "checkpoint_every": 1000,
    "val_episodes": 300,
    "meta_batch": 10,
}
SYNTHETIC_DEMO = {"steps": 150, "val_every": 50, "checkpoint_every": 50, "val_episodes": 40, "meta_batch": 4}


@dataclass
class RunConfig:
    """A training run. ``None`` fields are resolved by :meth:`resolved` from the modes."""

    modes: list[str] = field(default_factory=lambda: ["synthetic"])
    ways: int = 5
    shots: int = 1
    queries: int = 15
    meta_batch: int | None = None
    steps: int | None = None
    lr: float = 1e-3
    lr_halve_every: int = 10000
    lr_schedule: str = "halve"
    policy: str = "mixed"
    weights: list[float] | None = None
    seed: int = 0
    device: str = "auto"
    data_root: str = "data"
    image_size: int | None = None
    rotate_omniglot: bool = True
    train_dir: str = "train_dir"
    run_name: str | None = None
    val_every: int | None = None
    val_episodes: int | None = None
    checkpoint_every: int | None = None
    # periodic step_*.pt checkpoints kept (the newest; last.pt and best.pt always): None keeps them all
    keep_checkpoints: int | None = 3
    log_every: int = 10
    bf16: bool = False
    compile: bool = False
    grad_clip: float | None = None
    transference_every: int = 0
    transference_batches: int = 1
    task_chunk: int | None = None
    activation_checkpointing: bool = False
    # The kml.config.recipes preset the run started from ("name@version") and the recipe values it changed.
    recipe: str | None = None
    recipe_overrides: list[str] | None = None
    # A published recipe refuses caches made otherwise than its data (kml.config.data_checks) unless this is set;
    # the departures it let through are recorded.
    allow_data_departure: bool = False
    data_departures: list[str] | None = None
    # Quirks of the released MMAML/KML training loops (the "-as-released" recipes); off: kml's own choices.
    # released_sampling: each mode draws meta_batch tasks and every slot picks one with replacement (duplicates);
    # released_lr_timing: the halving is due one step early (before 1-based update i with i % lr_halve_every == 0);
    # released_checkpoint: the final checkpoint holds steps - 1 updates (saved before the last), no best.pt.
    released_sampling: bool = False
    released_lr_timing: bool = False
    released_checkpoint: bool = False
    learner: LearnerConfig = field(default_factory=LearnerConfig)

    def __post_init__(self) -> None:
        if isinstance(self.learner, dict):
            if "model" in self.learner and self.recipe_overrides:  # saved before 0.2: its override names too
                self.recipe_overrides = [RENAMED_FIELDS.get(name, name) for name in self.recipe_overrides]
            self.learner = LearnerConfig.from_dict(self.learner)
        if self.policy not in MIXTURE_POLICIES:
            raise KMLError(f"unknown {setting('policy')} {self.policy!r}; choose one of {', '.join(MIXTURE_POLICIES)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise KMLError(
                f"unknown {setting('lr_schedule')} {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}"
            )
        check_fields(self)  # every numeric field: type, finiteness, range (kml.config.checks)
        check_bools(
            self,
            ("rotate_omniglot", "bf16", "compile", "activation_checkpointing", "allow_data_departure", *RUN_QUIRKS),
        )
        check_device(self.device)
        if self.run_name is not None:
            check_run_name(self.run_name)
        for name in ("data_root", "train_dir"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise KMLError(f"{setting(name)} must be a folder path, got {getattr(self, name)!r}")
        if not isinstance(self.modes, (list, tuple)) or not all(isinstance(m, str) for m in self.modes):
            raise KMLError(f"{setting('modes')} must be a list of mode names, got {self.modes!r}")

    @property
    def synthetic_only(self) -> bool:
        from kml.data.synthetic import SYNTHETIC_MODES

        return all(mode in SYNTHETIC_MODES for mode in expand_modes(self.modes))

    def resolved(self) -> RunConfig:
        """Fill ``None`` fields: published defaults for datasets, the short demo for synthetic modes."""
        defaults = SYNTHETIC_DEMO if self.synthetic_only else DATASET_DEFAULTS
        modes = expand_modes(self.modes)
        values: dict[str, Any] = {name: getattr(self, name) or defaults[name] for name in defaults}
        learner = dataclasses.replace(
            self.learner,
            ways=self.ways,
            num_modes=len(modes),
            image_size=self.image_size or self.learner.image_size,
        )
        return dataclasses.replace(self, modes=modes, learner=learner, **values)

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "learner"}
        values["learner"] = self.learner.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        if not isinstance(values, dict):
            raise KMLError(f"run config must be a mapping of settings, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KMLError(f"unknown run config keys {unknown}; known: {sorted(known)}")
        return cls(**values)

    def save(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        write_json(path, {**self.to_dict(), **(extra or {})})

    @classmethod
    def load(cls, path: str | os.PathLike) -> RunConfig:
        """Read ``config.json``; an unreadable or invalid file is a one-line :class:`KMLError` naming it."""
        try:
            values = json.loads(Path(path).read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise KMLError(f"{path} is corrupt or unreadable ({str(error).splitlines()[0]})") from None
        if isinstance(values, dict):
            values.pop("versions", None)
        try:
            return cls.from_dict(values)
        except KMLError as error:
            raise KMLError(f"{path}: {error}") from None
        except TypeError as error:  # e.g. a learner that is not a mapping
            raise KMLError(f"{path}: invalid run config ({error})") from None


def learning_rate_at(config: RunConfig, step: int) -> float:
    """The outer learning rate used by outer step ``step`` (0-based) under ``config``'s schedule.

    ``released_lr_timing``: the released KML code halves before 1-based update i when ``i % lr_halve_every == 0``,
    so 0-based step ``s`` has ``lr * 0.5 ** ((s + 1) // lr_halve_every)`` (5e-4 at step 9999).
    """
    gamma = 0.5 if config.lr_schedule == "halve" else 1.0
    return config.lr * gamma ** ((step + int(config.released_lr_timing)) // config.lr_halve_every)
