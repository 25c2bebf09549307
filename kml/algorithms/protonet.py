"""Prototypical networks over any ``nn.Module`` (an injected feature extractor), batched over tasks.

``ProtoNet(model)``: each class's prototype is the mean feature of its support images, and a query is
classified by ``-squared distance`` to the prototypes (Snell et al. 2017), optionally after one transductive
soft k-means step on the prototypes. Written once over stacked tasks; the backend runs the model
(:mod:`kml.algorithms.backends`), so each task's BatchNorm sees only its own images, as in a per-task loop
(:func:`kml.algorithms.reference.protonet_loop`). A model made by :func:`kml.modulate` is modulated per task
from its support set (MProtoNet with FiLM, KML + ProtoNet with KML).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kml.algorithms.backends import Execution
from kml.algorithms.contract import LearnerOutput
from kml.algorithms.losses import (
    accuracy,
    cross_entropy,
    distance_logits,
    prototypes,
    refine_prototypes,
    refine_prototypes_as_released,
)
from kml.algorithms.method import MetaMethod
from kml.data.episode import Episode
from kml.errors import KMLError, setting

__all__ = ["ProtoNet"]


class ProtoNet(MetaMethod):
    """ProtoNet of any feature extractor, batched over the tasks of an episode.

    Args:
        model: images ``[B, C, H, W]`` -> features ``[B, D]`` (or any ``[B, ...]``, flattened); or a
            task-conditioned model (:func:`kml.modulate`); or a list of them, one parameter set per mode.
        refine: one transductive soft k-means step on the prototypes (kml's default recipe and the released
            KML code refine; Snell et al. do not: ``False``).
        batch_norm, backend: as :class:`~kml.algorithms.maml.MAML`.
        released_query_modulation: modulate the query pass from the query images' own encoding, as the released
            KML code does (``scripts/trainer.py`` lines 176-186); kml modulates both passes from the support set.
        released_refinement: the released code's refinement step (:func:`~kml.algorithms.losses.refine_prototypes_as_released`:
            drops each support block's last image and pairs blocks with prototypes by position); needs ``refine``.

    The number of classes comes from each episode, so one model serves any N at test time.
    """

    method = "protonet"

    def __init__(
        self,
        model: nn.Module | Sequence[nn.Module],
        refine: bool = False,
        *,
        batch_norm: str = "transductive",
        backend: str = "auto",
        released_query_modulation: bool = False,
        released_refinement: bool = False,
    ) -> None:
        super().__init__(model, batch_norm, backend)
        for name, flag in (
            ("refine", refine),
            ("released_query_modulation", released_query_modulation),
            ("released_refinement", released_refinement),
        ):
            if not isinstance(flag, bool):
                raise KMLError(f"ProtoNet: {setting(name)} must be true or false, got {flag!r}")
        if released_refinement and not refine:
            raise KMLError(
                f"ProtoNet: {setting('released_refinement')} is a form of the refinement; turn {setting('refine')} on"
            )
        self.refine = refine
        self.released_query_modulation = released_query_modulation
        self.released_refinement = released_refinement

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "refine": self.refine,
            "released_query_modulation": self.released_query_modulation,
            "released_refinement": self.released_refinement,
        }

    def inner_parameter_names(self) -> list[str]:
        """The feature extractor's parameters (ProtoNet adapts nothing per task; the transference analyzer's
        ``"backbone"`` group)."""
        return [f"models.{m}.{name}" for m in range(self.num_modes) for name in self.network_names()]

    def _logits(self, execution: Execution, episode: Episode) -> torch.Tensor:
        """Query logits ``[T, M, N]``: ``-squared distance`` to the (refined) prototypes, up to a per-query constant."""
        shared, per_task = execution.prepare(*self.task_parameters(episode), episode.num_tasks)
        modulation = execution.modulation(shared, per_task, episode.support_x, episode.support_y)
        query_modulation = modulation
        if self.released_query_modulation:  # the released code encodes the query images for their own pass
            query_modulation = execution.modulation(shared, per_task, episode.query_x, episode.query_y)
        support = execution.network(shared, per_task, episode.support_x, modulation).flatten(2)  # [T, N*K, D]
        query = execution.network(shared, per_task, episode.query_x, query_modulation).flatten(2)  # [T, M, D]
        centres = prototypes(support, episode.support_y, episode.ways)
        if self.refine and self.released_refinement:
            centres = refine_prototypes_as_released(centres, support, query)
        elif self.refine:
            centres = refine_prototypes(centres, support, episode.support_y, query)
        return distance_logits(query, centres)

    def forward(self, episode: Episode, inner_steps: int | None = None) -> LearnerOutput:  # noqa: ARG002
        """Meta-batch loss of every task at once (``inner_steps`` is accepted and ignored: no inner loop)."""
        episode = self.float_episode(episode)
        with self.running() as execution:
            logits = self._logits(execution, episode)
        task_loss = cross_entropy(logits, episode.query_y)
        return LearnerOutput(task_loss.mean(), task_loss, accuracy(logits, episode.query_y))

    def predict(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        ways: int | None = None,
        mode: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Query logits of T tasks from their labelled support sets (queries need no labels).

        Shapes: ``support_x [T, N*K, C, H, W]``, ``support_y [T, N*K]`` (labels ``0..N-1``), ``query_x [T, M, C, H, W]``,
        ``mode [T]`` (default 0) -> ``[T, M, N]``; ``ways`` defaults to ``support_y.max() + 1``.
        """
        episode = self.float_episode(self.unlabelled_episode(support_x, support_y, query_x, mode, ways))
        with self.running() as execution:
            return self._logits(execution, episode)

    def reference_forward(self, episode: Episode, inner_steps: int | None = None) -> LearnerOutput:  # noqa: ARG002
        """The same computation as :meth:`forward`, one task at a time (the test oracle)."""
        from kml.algorithms.reference import protonet_loop

        return protonet_loop(self, episode)
