"""The outer learning-rate schedule of a run."""

from __future__ import annotations

import torch

from kml.config.run import RunConfig

__all__ = ["build_scheduler"]


def build_scheduler(optimizer: torch.optim.Optimizer, config: RunConfig) -> torch.optim.lr_scheduler.StepLR:
    """The outer learning-rate schedule of ``config``, stepped once per outer step.

    ``"halve"``: ``lr * 0.5 ** (step // lr_halve_every)`` (KML); ``"constant"``: ``lr`` throughout (MMAML),
    written as a StepLR with factor 1 so that checkpoints hold the same scheduler state either way.
    """
    gamma = 0.5 if config.lr_schedule == "halve" else 1.0
    return torch.optim.lr_scheduler.StepLR(optimizer, config.lr_halve_every, gamma=gamma)
