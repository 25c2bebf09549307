"""MAML over any ``nn.Module``, batched over the tasks of an episode.

``MAML(model)`` meta-learns ``model``'s initial parameters: every task of an :class:`~kml.data.episode.Episode`
takes ``inner_steps`` gradient steps on its support set from the shared parameters, and the meta-loss is
the mean query loss after adaptation. A task is a pure function of the parameters (``torch.func``:
``functional_call`` and ``grad``), ``vmap``-ed over the tasks, so the whole meta-batch runs at once and any
further transform composes (the transference analyzer ``vmap``-s it again over lookahead parameters).
:meth:`MAML.reference_forward` is the same computation as a plain per-task loop with ordinary autograd: the
oracle the tests hold the batched path to.

``model`` maps images ``[B, C, H, W]`` to logits ``[B, N]``. A model made by :func:`kml.modulate` (or any
:class:`~kml.models.modulate.TaskConditionedModel`) is modulated per task from the support set, and only its
backbone is adapted in the inner loop. kml's config-built learners (:class:`~kml.algorithms.MetaLearner`)
are the fast special case of this for kml's own backbones (a task-packed layout instead of ``vmap``).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.func import grad, vmap

from kml.algorithms.functional import ModelCalls, Params, clip_gradients, exact_batch_norm, subset, use_batch_statistics
from kml.algorithms.learner import LearnerOutput
from kml.algorithms.losses import accuracy, cross_entropy
from kml.config.checks import MAX_INNER_STEPS, TRAIN_NUMBERS, Number, check_values
from kml.data.episode import Episode
from kml.errors import KMLError
from kml.runtime import float32_inner_loop

__all__ = ["MAML"]


# kml.MAML's numeric keywords, checked by kml-train's rules (eval_inner_steps=None: the training count).
_KEYWORDS: dict[str, Number] = {
    **{name: TRAIN_NUMBERS[name] for name in ("inner_lr", "inner_steps", "inner_grad_clip", "inner_grad_clamp")},
    "eval_inner_steps": Number(int, 0, optional=True, high=MAX_INNER_STEPS),
}


class MAML(nn.Module):
    """Model-agnostic meta-learning (Finn et al. 2017) of any module, batched over tasks with ``torch.func``.

    The model's BatchNorm layers are switched to batch statistics (MAML's convention; see
    :func:`kml.algorithms.functional.use_batch_statistics`). The inner loop adapts the network's parameters
    that require gradients when the learner is built (freeze a pretrained trunk before, and it stays shared).

    Args:
        model: images ``[B, C, H, W]`` -> logits ``[B, N]``; or a task-conditioned model (:func:`kml.modulate`).
        inner_lr: the inner loop's learning rate.
        inner_steps: inner steps while ``training`` is True.
        eval_inner_steps: inner steps in eval mode (default: ``inner_steps``).
        first_order: treat the inner gradients as constants (no second derivatives).
        inner_grad_clip: clip each task's inner gradient to this L2 norm (all adapted parameters jointly).
        inner_grad_clamp: clamp every inner-gradient element to ``[-c, c]``.

    Call it on an episode (float images; ``support_x [T, N*K, C, H, W]``, ``support_y [T, N*K]``,
    ``query_x [T, N*Q, C, H, W]``, ``query_y [T, N*Q]``) to get a :class:`~kml.algorithms.LearnerOutput`.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.05,
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        inner_grad_clip: float | None = None,
        inner_grad_clamp: float | None = None,
    ) -> None:
        super().__init__()
        # the rules kml-train applies to the same settings (a negative clip would reverse every inner gradient)
        given = {
            "inner_lr": inner_lr,
            "inner_steps": inner_steps,
            "eval_inner_steps": eval_inner_steps,
            "inner_grad_clip": inner_grad_clip,
            "inner_grad_clamp": inner_grad_clamp,
        }
        checked = check_values(given, _KEYWORDS, where="MAML")
        if not isinstance(first_order, bool):
            raise KMLError(f"MAML: first_order must be true or false, got {first_order!r}")
        inner_lr, inner_grad_clip, inner_grad_clamp = (
            checked[k] for k in ("inner_lr", "inner_grad_clip", "inner_grad_clamp")
        )
        inner_steps, eval_inner_steps = checked["inner_steps"], checked["eval_inner_steps"]
        self.model = use_batch_statistics(model)
        self.inner_lr = float(inner_lr)
        self.inner_steps = inner_steps
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.first_order = first_order
        self.inner_grad_clip = inner_grad_clip
        self.inner_grad_clamp = inner_grad_clamp
        self._calls = ModelCalls(self.model)
        # Fixed here, by name: under functional_call (the transference analyzer) the parameters are substituted
        # tensors, detached ones included, and must still be adapted; a parameter frozen now stays unadapted.
        trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        self._adapted = [name for name in self._calls.network_names() if name in trainable]

    def inner_parameter_names(self) -> list[str]:
        """Names (in ``named_parameters()``) adapted by the inner loop: the network's, not an encoder's or generator's."""
        return [f"model.{name}" for name in self._adapted_names()]

    def _adapted_names(self) -> list[str]:
        return self._adapted

    def _steps(self, inner_steps: int | None) -> int:
        if inner_steps is not None:
            return int(inner_steps)
        return self.inner_steps if self.training else self.eval_inner_steps

    def _support_loss(
        self, fast: Params, network: Params, modulation, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        return cross_entropy(self._calls({**network, **fast}, x, modulation), y)

    def _task_logits(
        self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, *, steps: int
    ) -> torch.Tensor:
        """One task's query logits ``[M, N]`` after adapting to its support set; ``params`` named as in
        ``model.named_parameters()``. Shapes: ``support_x [N*K, C, H, W]``, ``support_y [N*K]``, ``query_x [M, C, H, W]``.
        """
        modulation = self._calls.modulation(params, support_x, support_y)  # from the support set only
        prefix = self._calls.network_prefix
        network = subset(params, prefix)
        fast = {name[len(prefix) :]: params[name] for name in self._adapted_names()}
        with float32_inner_loop(support_x.device.type):
            for _ in range(steps):
                grads = grad(self._support_loss)(fast, network, modulation, support_x, support_y)
                if self.first_order:
                    grads = {name: g.detach() for name, g in grads.items()}
                grads = clip_gradients(grads, self.inner_grad_clip, self.inner_grad_clamp)
                fast = {name: p - self.inner_lr * grads[name] for name, p in fast.items()}
        return self._calls({**network, **fast}, query_x, modulation)

    def _task_loss(
        self,
        params: Params,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        query_y: torch.Tensor,
        *,
        steps: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One task's (query loss, query accuracy); query labels ``[N*Q]``, the rest as :meth:`_task_logits`."""
        logits = self._task_logits(params, support_x, support_y, query_x, steps=steps)
        return cross_entropy(logits, query_y), accuracy(logits, query_y)

    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, inner_steps: int | None = None
    ) -> torch.Tensor:
        """Query logits of T tasks, each adapted to its labelled support set (queries need no labels).

        Shapes: ``support_x [T, N*K, C, H, W]``, ``support_y [T, N*K]``, ``query_x [T, M, C, H, W]`` ->
        ``[T, M, N]``. Differentiable like :meth:`forward`; wrap in ``torch.no_grad()`` to only predict.
        """
        task = partial(self._task_logits, steps=self._steps(inner_steps))
        with exact_batch_norm(not self.first_order):
            return vmap(task, in_dims=(None, 0, 0, 0), randomness="different")(
                dict(self.model.named_parameters()), support_x, support_y, query_x
            )

    def forward(self, episode: Episode, inner_steps: int | None = None) -> LearnerOutput:
        """Meta-batch loss with every task adapted and evaluated at once (``vmap`` over tasks)."""
        params = dict(self.model.named_parameters())
        task = partial(self._task_loss, steps=self._steps(inner_steps))
        # second-order through a batch-statistics BatchNorm is only exact with the elementary form under vmap
        with exact_batch_norm(not self.first_order):
            task_loss, task_accuracy = vmap(task, in_dims=(None, 0, 0, 0, 0), randomness="different")(
                params, episode.support_x, episode.support_y, episode.query_x, episode.query_y
            )
        return LearnerOutput(task_loss.mean(), task_loss, task_accuracy.detach())

    def reference_forward(self, episode: Episode, inner_steps: int | None = None) -> LearnerOutput:
        """The same computation as :meth:`forward`, one task at a time with ordinary autograd (the oracle)."""
        steps = self._steps(inner_steps)
        params: Params = dict(self.model.named_parameters())
        prefix = self._calls.network_prefix
        network = subset(params, prefix)
        losses, accuracies = [], []
        for t in range(episode.num_tasks):
            support_x, support_y = episode.support_x[t], episode.support_y[t]
            modulation = self._calls.modulation(params, support_x, support_y)
            fast = {name[len(prefix) :]: params[name] for name in self._adapted_names()}
            with torch.enable_grad(), float32_inner_loop(support_x.device.type):
                fast = {n: p if p.requires_grad else p.detach().requires_grad_() for n, p in fast.items()}
                for _ in range(steps):
                    loss = self._support_loss(fast, network, modulation, support_x, support_y)
                    raw = torch.autograd.grad(loss, list(fast.values()), create_graph=not self.first_order)
                    grads = clip_gradients(dict(zip(fast, raw)), self.inner_grad_clip, self.inner_grad_clamp)
                    fast = {name: p - self.inner_lr * grads[name] for name, p in fast.items()}
            logits = self._calls({**network, **fast}, episode.query_x[t], modulation)
            losses.append(cross_entropy(logits, episode.query_y[t]))
            accuracies.append(accuracy(logits, episode.query_y[t]))
        task_loss = torch.stack(losses)
        return LearnerOutput(task_loss.mean(), task_loss, torch.stack(accuracies).detach())
