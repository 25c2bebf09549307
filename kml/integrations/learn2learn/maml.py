"""kml models inside learn2learn's MAML.

:class:`ModulatedBackbone` is a kml backbone with one task's modulation fixed, an ``nn.Module``
that ``learn2learn.algorithms.MAML`` can ``clone()`` and ``adapt()``; :func:`task_module` builds it
from a learner and a support set, and :func:`maml_forward` runs a kml meta-batch through
learn2learn's MAML.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kml.data.episode import Episode
from kml.errors import KMLError
from kml.integrations.learn2learn.library import require_learn2learn
from kml.models.backbone import Backbone, Modulation

__all__ = ["maml_forward", "ModulatedBackbone", "task_module"]


class ModulatedBackbone(nn.Module):
    """A kml :class:`~kml.models.Backbone` with one task's modulation fixed: ``x [B, C, H, W] -> logits``.

    Its parameters are the backbone's (shared, not copied), so ``learn2learn.algorithms.MAML``
    adapts exactly the parameters kml's inner loop adapts. The modulation tensors are buffers
    (``modulation_<key>``, not saved in the state dict) and move with ``.to()``. With
    ``detach=True`` (default) the modulation is a constant; with ``detach=False`` it keeps its
    autograd graph, so the outer loss also reaches the task encoder and modulation generator that
    produced it (learn2learn's ``clone()`` keeps buffers that require grad in the graph).
    """

    def __init__(self, backbone: Backbone, modulation: Modulation | None = None, detach: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.modulation_keys: tuple[str, ...] = tuple(sorted(modulation or {}))
        for key in self.modulation_keys:
            value = modulation[key]  # type: ignore[index]
            self.register_buffer(f"modulation_{key}", value.detach() if detach else value, persistent=False)

    @property
    def modulation(self) -> Modulation | None:
        if not self.modulation_keys:
            return None
        return {key: getattr(self, f"modulation_{key}") for key in self.modulation_keys}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x, self.modulation)


def _check_maml(config: Any) -> None:
    if config.algorithm != "maml":
        raise KMLError(f"learn2learn's MAML needs a MAML learner, this one is {config.method}")
    if config.meta_sgd:
        raise KMLError(
            "learn2learn.algorithms.MAML has one inner rate; use learn2learn.algorithms.MetaSGD for meta_sgd learners"
        )
    if config.inner_grad_clip is not None:
        raise KMLError(
            "learn2learn.algorithms.MAML does not clip inner gradients; build the learner with inner_grad_clip=None"
        )
    if config.inner_grad_clamp is not None:
        raise KMLError(
            "learn2learn.algorithms.MAML does not clamp inner gradients; build the learner with inner_grad_clamp=None"
        )
    if config.mode_inner_lr is not None or config.mode_inner_steps is not None:
        raise KMLError(
            "learn2learn.algorithms.MAML has one inner rate and step count; build the learner without mode_inner_lr/steps"
        )


def task_module(
    learner: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor, mode: int = 0, detach: bool = True
) -> ModulatedBackbone:
    """The backbone of ``learner`` (of mode ``mode`` for Multi-MAML) with the modulation of one support set.

    ``support_x [N*K, C, H, W]``, ``support_y [N*K]``. Wrap it as
    ``learn2learn.algorithms.MAML(module, lr=learner.config.inner_lr, first_order=learner.config.first_order)``.
    """
    model = learner.models[mode if learner.config.multi_maml else 0]
    modulation = model.modulation(support_x, support_y)
    return ModulatedBackbone(model.backbone, modulation, detach=detach)


def maml_forward(learner: nn.Module, episode: Episode, inner_steps: int | None = None, detach_modulation: bool = False):
    """The learner's MAML meta-batch loss computed by ``learn2learn.algorithms.MAML``, task by task.

    For every task: the modulation from the support set, :class:`ModulatedBackbone`,
    ``MAML(module, lr=inner_lr, first_order=first_order)``, ``clone()``, ``inner_steps`` times
    ``adapt(cross_entropy(clone(support_x), support_y))``, then the query loss. With the default
    ``detach_modulation=False`` the loss depends on every learner parameter as in kml's own forward,
    which it equals (tests/test_learn2learn.py). Returns a :class:`~kml.algorithms.LearnerOutput`.
    """
    from kml.algorithms.contract import LearnerOutput
    from kml.algorithms.losses import accuracy

    l2l = require_learn2learn()
    config = learner.config
    _check_maml(config)
    if inner_steps is None:
        inner_steps = config.inner_steps if learner.training else config.eval_inner_steps
    modes = episode.mode.tolist()
    losses, accuracies = [], []
    for t in range(episode.num_tasks):
        support_x, support_y = episode.support_x[t], episode.support_y[t]
        query_x, query_y = episode.query_x[t], episode.query_y[t]
        module = task_module(learner, support_x, support_y, modes[t], detach=detach_modulation)
        maml = l2l.algorithms.MAML(module, lr=config.inner_lr, first_order=config.first_order)
        with torch.enable_grad():  # the inner loop differentiates even under torch.no_grad
            clone = maml.clone()
            for _ in range(inner_steps):
                clone.adapt(F.cross_entropy(clone(support_x), support_y))
        logits = clone(query_x)
        losses.append(F.cross_entropy(logits, query_y))
        accuracies.append(accuracy(logits, query_y))
    task_loss = torch.stack(losses)
    return LearnerOutput(task_loss.mean(), task_loss, torch.stack(accuracies).detach())
