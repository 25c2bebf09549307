"""What every learner gives and takes: the contract the trainer, evaluation, chunking and the transference
analyzer rely on, and nothing more.

A learner is an ``nn.Module`` called on an :class:`~kml.data.episode.Episode` of T tasks that returns a
:class:`LearnerOutput`. kml's :class:`~kml.algorithms.maml.MAML` and :class:`~kml.algorithms.protonet.ProtoNet`
implement :class:`Learner`; a user's own learner needs only ``forward`` to be trained and evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from kml.data.episode import Episode

__all__ = ["Learner", "LearnerOutput"]


@dataclass
class LearnerOutput:
    """What one forward pass over a meta-batch gives.

    Attributes:
        loss: scalar, the mean query loss over tasks (what the outer loop minimises).
        task_loss: ``[T]`` post-adaptation query loss per task (differentiable).
        task_accuracy: ``[T]`` query accuracy per task in [0, 1] (detached).
    """

    loss: torch.Tensor
    task_loss: torch.Tensor
    task_accuracy: torch.Tensor


@runtime_checkable
class Learner(Protocol):
    """A meta-learner of kml: a method (MAML, ProtoNet) over a model, run by a backend.

    Attributes:
        backend: how the T tasks of a meta-batch are executed (``"auto"``, ``"packed"``, ``"vmap"``);
            the numbers do not depend on it.
    """

    backend: str

    def __call__(self, episode: Episode, inner_steps: int | None = None) -> LearnerOutput:
        """The meta-batch's query losses and accuracies after each task's adaptation to its support set."""
        ...

    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, **options: Any
    ) -> torch.Tensor:
        """Query logits ``[T, M, N]`` of T tasks from their labelled support sets (queries need no labels)."""
        ...

    def inner_parameter_names(self) -> list[str]:
        """Names (in ``named_parameters()``) of the per-task parameters: what the inner loop adapts."""
        ...

    def settings(self) -> dict[str, Any]:
        """The method, its settings and the model, as plain values (recorded in a run's ``config.json``)."""
        ...
