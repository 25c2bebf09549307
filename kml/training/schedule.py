"""The outer learning-rate schedule of a run."""

from __future__ import annotations

import torch

from kml.config.run import RunConfig

__all__ = ["build_scheduler"]


def build_scheduler(optimizer: torch.optim.Optimizer, config: RunConfig) -> torch.optim.lr_scheduler.StepLR:
    """The outer learning-rate schedule of ``config``, stepped once per outer step.

    ``"halve"``: ``lr * 0.5 ** (step // lr_halve_every)`` (KML); ``"constant"``: ``lr`` throughout (MMAML),
    written as a StepLR with factor 1 so that checkpoints hold the same scheduler state either way.
    ``released_lr_timing``: the StepLR starts one step ahead, so 0-based step ``s`` has
    ``lr * 0.5 ** ((s + 1) // lr_halve_every)``, as the released KML code halves before 1-based update
    ``i % 10000 == 0`` (``scripts/trainer.py`` lines 209-210 and 219-220).
    """
    gamma = 0.5 if config.lr_schedule == "halve" else 1.0
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, config.lr_halve_every, gamma=gamma)
    if config.released_lr_timing:
        _advance(scheduler)
    return scheduler


def _advance(scheduler: torch.optim.lr_scheduler.StepLR) -> None:
    """Count one scheduler step without an optimiser step (StepLR.step would warn that the optimiser has not
    stepped): its epoch and, when that epoch is a halving, the rates."""
    scheduler.last_epoch += 1
    if scheduler.last_epoch % scheduler.step_size == 0:
        for group in scheduler.optimizer.param_groups:
            group["lr"] *= scheduler.gamma
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]  # what get_last_lr reports
