"""Validation during training: the run's fixed meta-validation episodes, each mode at its training index."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kml.evaluation import ModeResult, average, evaluate

if TYPE_CHECKING:
    from kml.training.trainer import Trainer

__all__ = ["validation_results"]


def validation_results(trainer: Trainer) -> list[ModeResult]:
    """Per-mode results and their average (last) on ``trainer.val_stores``' fixed episodes (``val_episodes`` per
    mode, drawn from the run's seed), with the run's N, K, Q, rotation and precision."""
    config, names = trainer.config, tuple(trainer.sampler.mode_names)
    known = all(store.mode in names for store in trainer.val_stores)  # keep each mode's index as in training
    rotation = trainer.rotation
    results = evaluate(
        trainer.learner,
        trainer.val_stores,
        config.ways,
        config.shots,
        config.queries,
        config.val_episodes,
        seed=config.seed,
        tasks_per_batch=config.meta_batch or 1,
        rotate=[rotation.get(store.mode, False) for store in trainer.val_stores],
        bf16=config.bf16,
        progress=False,
        mode_indices=[names.index(s.mode) for s in trainer.val_stores] if known else None,
        mode_names=names if known else None,
    )
    return [*results, average(results)]
