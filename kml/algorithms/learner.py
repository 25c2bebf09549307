"""The meta-learner: MAML inner loop or prototypical head, batched over the tasks of a meta-batch.

A task's loss is a pure function of the task model's parameters (a dict) and the
task's tensors (:meth:`MetaLearner._task_loss`). The batched path ``vmap``s it
over the T tasks, so T differently modulated (and adapted) backbones run as one
batched (grouped) convolution, and the inner gradients come from
:func:`torch.func.grad`. :meth:`MetaLearner.reference_forward` is the obvious
per-task Python loop with ordinary autograd, kept as the oracle for tests and
benchmarks.

Multi-MAML keeps one task model per mode; the batched path stacks their
parameters and gathers each task's set by ``episode.mode``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from kml.algorithms.losses import accuracy, prototypical_loss
from kml.config import LearnerConfig
from kml.data.episode import Episode
from kml.models.backbone import Modulation
from kml.models.task_model import TaskModel, rate_key

Params = dict[str, torch.Tensor]


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


def _subset(params: Params, prefix: str) -> Params:
    """Entries of ``params`` under ``prefix``, with the prefix removed."""
    return {name[len(prefix):]: value for name, value in params.items() if name.startswith(prefix)}


def _clip(grads: Params, max_norm: float | None) -> Params:
    """Scale a task's inner gradients to at most ``max_norm`` (L2 over all of them jointly)."""
    if max_norm is None:
        return grads
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
    factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    return {name: g * factor for name, g in grads.items()}


class MetaLearner(nn.Module):
    """Task encoder -> modulation -> backbone (-> head), meta-trained by MAML or ProtoNet.

    Call it on a float :class:`~kml.data.episode.Episode` (``support_x [T, N*K, C, H, W]``,
    ``support_y [T, N*K]``, ``query_x [T, N*Q, C, H, W]``, ``query_y [T, N*Q]``, ``mode [T]``).
    ``inner_steps`` defaults to ``config.inner_steps`` in training mode and
    ``config.eval_inner_steps`` in eval mode (the module's ``training`` flag; BatchNorm
    always uses batch statistics). Works under ``torch.no_grad`` (the inner loop still
    differentiates the support loss), under :func:`torch.func.functional_call` and nested ``vmap``.
    """

    def __init__(self, config: LearnerConfig) -> None:
        super().__init__()
        self.config = config
        count = config.num_modes if config.multi_maml else 1
        self.models = nn.ModuleList(TaskModel(config) for _ in range(count))

    # ----------------------------------------------------------------- helpers
    def inner_parameter_names(self) -> list[str]:
        """Names (in ``named_parameters()``) adapted by the inner loop: the backbone and its head."""
        return [name for name, _ in self.named_parameters() if ".backbone." in name]

    def _steps(self, inner_steps: int | None) -> int:
        if inner_steps is not None:
            return int(inner_steps)
        return self.config.inner_steps if self.training else self.config.eval_inner_steps

    def _modulation(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Modulation | None:
        template = self.models[0]
        if template.encoder is None or template.generator is None:
            return None
        embedding = functional_call(template.encoder, _subset(params, "encoder."), (support_x, support_y))
        return functional_call(template.generator, _subset(params, "generator."), (embedding,))

    def _backbone(self, params: Params, x: torch.Tensor, modulation: Modulation | None) -> torch.Tensor:
        return functional_call(self.models[0].backbone, params, (x, modulation))

    def _support_loss(self, fast: Params, modulation: Modulation | None, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._backbone(fast, x, modulation), y)

    def _inner_rate(self, params: Params, name: str) -> torch.Tensor | float:
        key = f"inner_rates.{rate_key(name)}"
        return params[key] if key in params else self.config.inner_lr

    # ----------------------------------------------------------- batched path
    def _task_loss(
        self,
        params: Params,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        query_y: torch.Tensor,
        inner_steps: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One task's (query loss, query accuracy) from its task model's ``params`` (names relative to it).

        Shapes: ``support_x [N*K, C, H, W]``, ``support_y [N*K]``, ``query_x [N*Q, C, H, W]``, ``query_y [N*Q]``.
        """
        config = self.config
        modulation = self._modulation(params, support_x, support_y)  # from the support set only
        backbone = _subset(params, "backbone.")
        if config.algorithm == "protonet":
            support_features = self._backbone(backbone, support_x, modulation)
            query_features = self._backbone(backbone, query_x, modulation)
            return prototypical_loss(support_features, support_y, query_features, query_y, config.ways, config.proto_refine)
        fast = backbone
        for _ in range(inner_steps):
            grads = grad(self._support_loss)(fast, modulation, support_x, support_y)
            if config.first_order:
                grads = {name: g.detach() for name, g in grads.items()}
            grads = _clip(grads, config.inner_grad_clip)
            fast = {name: p - self._inner_rate(params, name) * grads[name] for name, p in fast.items()}
        logits = self._backbone(fast, query_x, modulation)
        return F.cross_entropy(logits, query_y), accuracy(logits, query_y)

    def _task_params(self, episode: Episode) -> tuple[Params, int | None]:
        """Parameters per task and their vmap dimension: shared (``None``) or gathered by mode (``0``)."""
        params = dict(self.named_parameters())
        if not self.config.multi_maml:
            return _subset(params, "models.0."), None
        per_mode = [_subset(params, f"models.{m}.") for m in range(len(self.models))]
        return {name: torch.stack([p[name] for p in per_mode])[episode.mode] for name in per_mode[0]}, 0

    def forward(self, episode: Episode, inner_steps: int | None = None) -> LearnerOutput:
        """Meta-batch loss with every task adapted and evaluated at once (``vmap`` over tasks)."""
        params, params_dim = self._task_params(episode)
        task = partial(self._task_loss, inner_steps=self._steps(inner_steps))
        task_loss, task_accuracy = vmap(task, in_dims=(params_dim, 0, 0, 0, 0))(
            params, episode.support_x, episode.support_y, episode.query_x, episode.query_y
        )
        return LearnerOutput(task_loss.mean(), task_loss, task_accuracy.detach())

    # ---------------------------------------------------------- reference path
    def reference_forward(self, episode: Episode, inner_steps: int | None = None) -> LearnerOutput:
        """The same computation as :meth:`forward`, one task at a time with ordinary autograd (the oracle)."""
        config = self.config
        steps = self._steps(inner_steps)
        modes = episode.mode.tolist()
        losses, accuracies = [], []
        for t in range(episode.num_tasks):
            model = self.models[modes[t] if config.multi_maml else 0]
            support_x, support_y = episode.support_x[t], episode.support_y[t]
            query_x, query_y = episode.query_x[t], episode.query_y[t]
            modulation = model.modulation(support_x, support_y)
            if config.algorithm == "protonet":
                loss, acc = prototypical_loss(
                    model(support_x, modulation), support_y, model(query_x, modulation), query_y, config.ways, config.proto_refine
                )
            else:
                fast = dict(model.backbone.named_parameters())
                with torch.enable_grad():  # the inner loop needs gradients even in evaluation
                    fast = {n: p if p.requires_grad else p.detach().requires_grad_() for n, p in fast.items()}
                    for _ in range(steps):
                        support_loss = F.cross_entropy(functional_call(model.backbone, fast, (support_x, modulation)), support_y)
                        grads = torch.autograd.grad(support_loss, list(fast.values()), create_graph=not config.first_order)
                        grads = _clip(dict(zip(fast, grads)), config.inner_grad_clip)
                        rates = model.inner_rates
                        fast = {
                            n: p - (rates[rate_key(n)] if rates is not None else config.inner_lr) * grads[n]
                            for n, p in fast.items()
                        }
                logits = functional_call(model.backbone, fast, (query_x, modulation))
                loss, acc = F.cross_entropy(logits, query_y), accuracy(logits, query_y)
            losses.append(loss)
            accuracies.append(acc)
        task_loss = torch.stack(losses)
        return LearnerOutput(task_loss.mean(), task_loss, torch.stack(accuracies).detach())


def build_learner(config: LearnerConfig) -> MetaLearner:
    """The learner a config names (the one constructor used by training, evaluation and checkpoints)."""
    return MetaLearner(config)
