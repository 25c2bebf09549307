"""MAML over any ``nn.Module``, batched over the tasks of an episode.

``MAML(model)`` meta-learns ``model``'s initial parameters: every task of an :class:`~kml.data.episode.Episode`
takes gradient steps on its support set from the shared parameters, and the meta-loss is the mean query loss
after adaptation. The method is written once, over stacked per-task tensors; how the tasks run (one packed
call, or ``vmap``) is the :mod:`~kml.algorithms.backends` seam. Every option works on any model: inner-gradient
clip and clamp, first or second order, learned per-element rates (Meta-SGD), rates and step counts by mode,
and a parameter set per mode (Multi-MAML: give a list of models).

A model made by :func:`kml.modulate` (or any :class:`~kml.models.modulate.TaskConditionedModel`) is modulated
per task from its support set, and only its backbone is adapted in the inner loop. kml's config-built learners
(:func:`~kml.algorithms.learner.build_learner`) are this class over kml's own models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kml.algorithms.backends import Execution
from kml.algorithms.contract import LearnerOutput
from kml.algorithms.functional import Params, clip_task_gradients
from kml.algorithms.losses import accuracy, cross_entropy
from kml.algorithms.method import MetaMethod, rate_key
from kml.config.checks import MAX_INNER_STEPS, TRAIN_NUMBERS, Number, check_values
from kml.data.episode import Episode
from kml.errors import KMLError, setting
from kml.runtime import float32_inner_loop

__all__ = ["MAML"]


# kml.MAML's numeric keywords, checked by kml-train's rules (eval_inner_steps=None: the training count).
_KEYWORDS: dict[str, Number] = {
    **{name: TRAIN_NUMBERS[name] for name in ("inner_lr", "inner_steps", "inner_grad_clip", "inner_grad_clamp")},
    "eval_inner_steps": Number(int, 0, optional=True, high=MAX_INNER_STEPS),
}


class MAML(MetaMethod):
    """Model-agnostic meta-learning (Finn et al. 2017) of any module, batched over tasks.

    Args:
        model: images ``[B, C, H, W]`` -> logits ``[B, N]``; or a task-conditioned model (:func:`kml.modulate`);
            or a list of such models, one parameter set per mode (Multi-MAML: each task uses its mode's).
        inner_lr: the inner loop's learning rate.
        inner_steps: inner steps while ``training`` is True.
        eval_inner_steps: inner steps in eval mode (default: ``inner_steps``).
        first_order: treat the inner gradients as constants (no second derivatives).
        inner_grad_clip: clip each task's inner gradient to this L2 norm (all adapted parameters jointly).
        inner_grad_clamp: clamp every inner-gradient element to ``[-c, c]`` (MMAML).
        meta_sgd: learn one inner rate per adapted parameter element, starting at ``inner_lr`` (Meta-SGD).
        mode_inner_lr: an inner rate per mode (``episode.mode`` indexes it); excludes ``meta_sgd``.
        mode_inner_steps: an inner step count per mode (a task stops after its mode's count).
        batch_norm: ``"transductive"`` (batch statistics of each support and query set; MAML's convention) or
            ``"running"`` (the model's running statistics, never updated). The model itself is not changed.
        backend: ``"auto"``, ``"packed"`` or ``"vmap"`` (see :mod:`kml.algorithms.backends`; same numbers).

    The inner loop adapts the network's parameters that require gradients when the learner is built (freeze a
    pretrained trunk before, and it stays shared). Call it on an episode (float images; ``support_x
    [T, N*K, C, H, W]``, ``support_y [T, N*K]``, ``query_x [T, N*Q, C, H, W]``, ``query_y [T, N*Q]``, ``mode
    [T]``) to get a :class:`~kml.algorithms.contract.LearnerOutput`.
    """

    method = "maml"

    def __init__(
        self,
        model: nn.Module | Sequence[nn.Module],
        inner_lr: float = 0.05,
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        inner_grad_clip: float | None = None,
        inner_grad_clamp: float | None = None,
        *,
        meta_sgd: bool = False,
        mode_inner_lr: Sequence[float] | None = None,
        mode_inner_steps: Sequence[int] | None = None,
        batch_norm: str = "transductive",
        backend: str = "auto",
    ) -> None:
        super().__init__(model, batch_norm, backend)
        # the rules kml-train applies to the same settings (a negative clip would reverse every inner gradient)
        given = {
            "inner_lr": inner_lr,
            "inner_steps": inner_steps,
            "eval_inner_steps": eval_inner_steps,
            "inner_grad_clip": inner_grad_clip,
            "inner_grad_clamp": inner_grad_clamp,
        }
        checked = check_values(given, _KEYWORDS, where="MAML")
        for name, flag in (("first_order", first_order), ("meta_sgd", meta_sgd)):
            if not isinstance(flag, bool):
                raise KMLError(f"MAML: {setting(name)} must be true or false, got {flag!r}")
        self.inner_lr = float(checked["inner_lr"])
        self.inner_steps = checked["inner_steps"]
        self.eval_inner_steps = self.inner_steps if checked["eval_inner_steps"] is None else checked["eval_inner_steps"]
        self.first_order = first_order
        self.inner_grad_clip, self.inner_grad_clamp = checked["inner_grad_clip"], checked["inner_grad_clamp"]
        self.mode_inner_lr = self._per_mode("mode_inner_lr", mode_inner_lr, float)
        self.mode_inner_steps = self._per_mode("mode_inner_steps", mode_inner_steps, int)
        if self.mode_inner_lr is not None and meta_sgd:
            raise KMLError(
                "per-mode inner rates (mode_inner_lr) and learned Meta-SGD rates exclude each other; choose one"
            )
        # Second-order MAML on the packed backend: recompute each inner step in the outer backward instead of
        # keeping its graph (memory of one step instead of all; same numbers, more compute).
        self.activation_checkpointing = False
        # Fixed here, by name: under functional_call (the transference analyzer) the parameters are substituted
        # tensors, detached ones included, and must still be adapted; a parameter frozen now stays unadapted.
        trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        self.adapted = [name for name in self.network_names() if name in trainable]
        self.inner_rates: nn.ModuleList | None = None
        if meta_sgd:
            parameters = dict(self.model.named_parameters())
            self.inner_rates = nn.ModuleList(
                nn.ParameterDict(
                    {
                        self._rate_key(name): nn.Parameter(torch.full_like(parameters[name], self.inner_lr))
                        for name in self.adapted
                    }
                )
                for _ in self.models
            )

    def _per_mode(self, name: str, values: Sequence[Any] | None, kind: type) -> list[Any] | None:
        if values is None:
            return None
        values = [kind(v) for v in values]
        if self.num_modes > 1 and len(values) != self.num_modes:
            raise KMLError(f"learner {name} has {len(values)} entries for {self.num_modes} modes; give one per mode")
        return values

    def _rate_key(self, name: str) -> str:
        """The Meta-SGD rate of an adapted parameter (``name`` as in the model) is keyed by its name in the network."""
        return rate_key(name[len(self._calls.network_prefix) :])

    def settings(self) -> dict[str, Any]:
        keys = ("inner_lr", "inner_steps", "eval_inner_steps", "first_order", "inner_grad_clip", "inner_grad_clamp")
        return {
            **super().settings(),
            **{key: getattr(self, key) for key in keys},
            "meta_sgd": self.inner_rates is not None,
            "mode_inner_lr": self.mode_inner_lr,
            "mode_inner_steps": self.mode_inner_steps,
        }

    def inner_parameter_names(self) -> list[str]:
        """Names (in ``named_parameters()``) adapted by the inner loop: the network's, not an encoder's or generator's."""
        return [f"models.{m}.{name}" for m in range(len(self.models)) for name in self.adapted]

    def steps(self, inner_steps: int | None = None) -> int:
        """The inner steps a forward pass takes (modes with fewer stop early: their rate turns 0)."""
        if inner_steps is not None:
            return int(inner_steps)
        if self.mode_inner_steps is not None:
            return max(self.mode_inner_steps)
        return self.inner_steps if self.training else self.eval_inner_steps

    def step_rates(self, mode: torch.Tensor, inner_steps: int | None, dtype: torch.dtype) -> torch.Tensor | None:
        """``[T, steps]`` inner rate of each task at each step when rates or step counts differ by mode, else ``None``.

        A task of a mode with fewer steps gets rate 0 after its last step, so its parameters stay exactly where
        its own step count leaves them. ``inner_steps`` given to :meth:`forward` applies to every mode.
        """
        by_steps = self.mode_inner_steps is not None and inner_steps is None
        if self.mode_inner_lr is None and not by_steps:
            return None
        steps = self.steps(inner_steps)
        if self.mode_inner_lr is not None:
            rates = torch.tensor(self.mode_inner_lr, dtype=dtype, device=mode.device)[mode]  # [T]
        else:
            rates = torch.full((len(mode),), self.inner_lr, dtype=dtype, device=mode.device)
        active = torch.ones(len(mode), steps, dtype=dtype, device=mode.device)
        if by_steps:
            counts = torch.tensor(self.mode_inner_steps, device=mode.device)[mode]  # [T]
            active = (torch.arange(steps, device=mode.device) < counts.unsqueeze(1)).to(dtype)
        return rates.unsqueeze(1) * active

    def _rates(self, episode: Episode, like: Params) -> dict[str, torch.Tensor | float]:
        """Each adapted parameter's inner rate: a number, or Meta-SGD's learned ``[...]`` (``[T, ...]`` by mode)."""
        if self.inner_rates is None:
            return dict.fromkeys(like, self.inner_lr)
        # through named_parameters, so that functional_call's substitutes are the ones used
        params = dict(self.named_parameters())
        per_mode = [
            {name: params[f"inner_rates.{m}.{self._rate_key(name)}"] for name in like} for m in range(self.num_modes)
        ]
        if len(per_mode) == 1:  # [T, ...] views, as the parameters they update
            return {name: rate.expand(episode.num_tasks, *rate.shape) for name, rate in per_mode[0].items()}
        return {name: torch.stack([rates[name] for rates in per_mode])[episode.mode] for name in like}

    def _logits(self, execution: Execution, episode: Episode, inner_steps: int | None) -> torch.Tensor:
        """Query logits ``[T, N*Q, N]`` after each task's inner loop on its support set."""
        tasks = episode.num_tasks
        adapted = set(self.adapted)
        with torch.enable_grad():  # a view made under an outer no_grad would not connect to its parameter
            shared, per_task = execution.prepare(*self.task_parameters(episode), tasks)
            fast = {
                **execution.per_task({n: p for n, p in shared.items() if n in adapted}, tasks),
                **{n: p for n, p in per_task.items() if n in adapted},
            }
        modulation = execution.modulation(shared, per_task, episode.support_x, episode.support_y)
        fixed_shared = {n: p for n, p in shared.items() if n not in adapted}
        fixed_own = {n: p for n, p in per_task.items() if n not in adapted}
        rates = self._rates(episode, fast)
        step_rates = self.step_rates(episode.mode, inner_steps, episode.support_x.dtype)
        second_order = not self.first_order and torch.is_grad_enabled()

        def inner_step(fast: Params, rates: dict[str, Any]) -> Params:
            def support_loss(fast: Params) -> torch.Tensor:  # [T]
                logits = execution.network(
                    fixed_shared, {**fixed_own, **fast}, episode.support_x, modulation, inner=True
                )
                return cross_entropy(logits, episode.support_y)

            grads = execution.gradients(support_loss, fast, create_graph=second_order)
            grads = clip_task_gradients(grads, self.inner_grad_clip, self.inner_grad_clamp)
            return {name: p - rates[name] * grads[name] for name, p in fast.items()}

        # the inner loop runs in float32 under bf16 autocast
        with float32_inner_loop(episode.support_x.device.type):
            for step in range(self.steps(inner_steps)):
                # rates by mode: this step's [T] rates, shaped to broadcast over [T, ...] parameters
                step_rate = (
                    rates if step_rates is None else {n: _per_task(step_rates[:, step], p) for n, p in fast.items()}
                )
                if self.activation_checkpointing and second_order and execution.supports_checkpointing:
                    # keep only each step's parameters; its graph is rebuilt during the outer backward
                    fast = checkpoint(inner_step, fast, step_rate, use_reentrant=False, preserve_rng_state=False)
                else:
                    fast = inner_step(fast, step_rate)
        return execution.network(fixed_shared, {**fixed_own, **fast}, episode.query_x, modulation)

    def forward(self, episode: Episode, inner_steps: int | None = None) -> LearnerOutput:
        """Meta-batch loss with every task adapted and evaluated at once (no Python loop over tasks)."""
        episode = self.float_episode(episode)
        with self.running() as execution:
            logits = self._logits(execution, episode, inner_steps)
        self.check_classes(logits, episode.ways)
        task_loss = cross_entropy(logits, episode.query_y)
        return LearnerOutput(task_loss.mean(), task_loss, accuracy(logits, episode.query_y))

    def predict(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        inner_steps: int | None = None,
        mode: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Query logits of T tasks, each adapted to its labelled support set (queries need no labels).

        Shapes: ``support_x [T, N*K, C, H, W]``, ``support_y [T, N*K]``, ``query_x [T, M, C, H, W]``, ``mode [T]``
        (default 0) -> ``[T, M, N]``. Differentiable like :meth:`forward`; wrap in ``torch.no_grad()`` to only predict.
        """
        episode = self.float_episode(self.unlabelled_episode(support_x, support_y, query_x, mode))
        with self.running() as execution:
            logits = self._logits(execution, episode, inner_steps)
        self.check_classes(logits, episode.ways)
        return logits

    def reference_forward(self, episode: Episode, inner_steps: int | None = None) -> LearnerOutput:
        """The same computation as :meth:`forward`, one task at a time with ordinary autograd (the test oracle)."""
        from kml.algorithms.reference import maml_loop

        return maml_loop(self, episode, inner_steps)


def _per_task(rate: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``[T]`` per-task rate shaped to broadcast over stacked ``[T, ...]`` parameters like ``like``."""
    return rate.view(-1, *([1] * (like.dim() - 1)))
