"""Prototypical networks over any ``nn.Module`` (an injected feature extractor), batched over tasks.

``ProtoNet(model)``: each class's prototype is the mean feature of its support images, and a query is
classified by ``-squared distance`` to the prototypes (Snell et al. 2017). Tasks are ``vmap``-ed, so each
task's BatchNorm sees only its own images, as in a per-task loop (:meth:`ProtoNet.reference_forward`).
A model made by :func:`kml.modulate` is modulated per task from its support set (MProtoNet with FiLM,
KML + ProtoNet with KML).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.func import vmap

from kml.algorithms.functional import ModelCalls, Params, subset, use_batch_statistics
from kml.algorithms.learner import LearnerOutput
from kml.algorithms.losses import distance_logits, prototypes, prototypical_loss, refine_prototypes
from kml.data.episode import Episode
from kml.errors import KMLError

__all__ = ["ProtoNet"]


class ProtoNet(nn.Module):
    """ProtoNet of any feature extractor, batched over the tasks of an episode.

    Args:
        model: images ``[B, C, H, W]`` -> features ``[B, D]`` (or any ``[B, ...]``, flattened); or a
            task-conditioned model (:func:`kml.modulate`).
        refine: one transductive soft k-means step on the prototypes (kml's default recipe and the released
            KML code refine; Snell et al. do not: ``False``).

    The number of classes comes from each episode, so one model serves any N at test time.
    """

    def __init__(self, model: nn.Module, refine: bool = False) -> None:
        super().__init__()
        if not isinstance(refine, bool):
            raise KMLError(f"ProtoNet: refine must be true or false, got {refine!r}")
        self.model = use_batch_statistics(model)
        self.refine = refine
        self._calls = ModelCalls(self.model)

    def inner_parameter_names(self) -> list[str]:
        """The feature extractor's parameters (ProtoNet adapts nothing per task; the transference analyzer's
        ``"backbone"`` group)."""
        return [f"model.{name}" for name in self._calls.network_names()]

    def _features(self, params: Params, modulation, x: torch.Tensor) -> torch.Tensor:
        return self._calls(subset(params, self._calls.network_prefix), x, modulation).flatten(1)

    def _task_loss(
        self,
        params: Params,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        query_y: torch.Tensor,
        *,
        ways: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One task's (query loss, query accuracy); shapes as in :meth:`kml.MAML._task_loss`."""
        modulation = self._calls.modulation(params, support_x, support_y)
        support = self._features(params, modulation, support_x)
        query = self._features(params, modulation, query_x)
        return prototypical_loss(support, support_y, query, query_y, ways, self.refine)

    def _task_logits(
        self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, *, ways: int
    ) -> torch.Tensor:
        """One task's query logits ``[M, N]``: ``-squared distance`` to the (refined) prototypes, up to a per-query constant."""
        modulation = self._calls.modulation(params, support_x, support_y)
        support = self._features(params, modulation, support_x)
        query = self._features(params, modulation, query_x)
        centres = prototypes(support, support_y, ways)
        if self.refine:
            centres = refine_prototypes(centres, support, support_y, query)
        return distance_logits(query, centres)

    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, ways: int | None = None
    ) -> torch.Tensor:
        """Query logits of T tasks from their labelled support sets (queries need no labels).

        Shapes: ``support_x [T, N*K, C, H, W]``, ``support_y [T, N*K]`` (labels ``0..N-1``), ``query_x [T, M, C, H, W]``
        -> ``[T, M, N]``; ``ways`` defaults to ``support_y.max() + 1``.
        """
        ways = int(support_y.max()) + 1 if ways is None else ways
        task = partial(self._task_logits, ways=ways)
        return vmap(task, in_dims=(None, 0, 0, 0), randomness="different")(
            dict(self.model.named_parameters()), support_x, support_y, query_x
        )

    def forward(self, episode: Episode, inner_steps: int | None = None) -> LearnerOutput:  # noqa: ARG002
        """Meta-batch loss of every task at once (``inner_steps`` is accepted and ignored: no inner loop)."""
        params = dict(self.model.named_parameters())
        task = partial(self._task_loss, ways=episode.ways)
        task_loss, task_accuracy = vmap(task, in_dims=(None, 0, 0, 0, 0), randomness="different")(
            params, episode.support_x, episode.support_y, episode.query_x, episode.query_y
        )
        return LearnerOutput(task_loss.mean(), task_loss, task_accuracy.detach())

    def reference_forward(self, episode: Episode, inner_steps: int | None = None) -> LearnerOutput:  # noqa: ARG002
        """The same computation as :meth:`forward`, one task at a time (the oracle)."""
        params: Params = dict(self.model.named_parameters())
        results = [
            self._task_loss(
                params,
                episode.support_x[t],
                episode.support_y[t],
                episode.query_x[t],
                episode.query_y[t],
                ways=episode.ways,
            )
            for t in range(episode.num_tasks)
        ]
        task_loss = torch.stack([loss for loss, _ in results])
        return LearnerOutput(task_loss.mean(), task_loss, torch.stack([acc for _, acc in results]).detach())
