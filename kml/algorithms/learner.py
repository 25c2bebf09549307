"""The meta-learner: MAML inner loop or prototypical head, batched over the tasks of a meta-batch.

A task's loss is a pure function of the task model's parameters (a dict) and the
task's tensors (:meth:`MetaLearner._task_loss`). Two batched paths compute the
same numbers:

* ``"vmap"``: that function ``vmap``ped over the T tasks, inner gradients from
  :func:`torch.func.grad`. It composes with any further transform (the
  transference analyzer ``vmap``s it again over lookahead parameters).
* ``"packed"`` (the default for training and evaluation): parameters stacked per
  task and the backbone run in a task-packed layout
  (:func:`kml.models.backbone.packed_forward`: grouped convolutions with no relayout
  between layers, per-task BatchNorm as one fused BatchNorm); the inner gradients of
  all tasks come from one ``autograd.grad`` of the summed task losses (each task's loss
  depends only on its own slice). On a CPU it avoids the copies and strided
  elementwise work that ``vmap``'s batching rules put around every convolution.

:meth:`MetaLearner.reference_forward` is the obvious per-task Python loop with
ordinary autograd, kept as the oracle for tests and benchmarks.

Multi-MAML keeps one task model per mode; the batched path stacks their
parameters and gathers each task's set by ``episode.mode``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import cast

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.checkpoint import checkpoint

from kml.algorithms.functional import Params, clip_gradients, clip_task_gradients, exact_batch_norm, subset
from kml.algorithms.losses import accuracy, cross_entropy, prototypical_loss
from kml.config.learner import LearnerConfig
from kml.data.episode import Episode
from kml.errors import KMLError
from kml.models.backbone import Modulation, packed_forward
from kml.models.encoder import packed_task_embedding
from kml.models.task_model import TaskModel, rate_key
from kml.runtime import float32_inner_loop

__all__ = ["LearnerOutput", "MetaLearner", "build_learner"]


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


def _per_task(rate: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``[T]`` per-task rate shaped to broadcast over stacked ``[T, ...]`` parameters like ``like``."""
    return rate.view(-1, *([1] * (like.dim() - 1)))


class MetaLearner(nn.Module):
    """Task encoder -> modulation -> backbone (-> head), meta-trained by MAML or ProtoNet.

    Call it on a float :class:`~kml.data.episode.Episode` (``support_x [T, N*K, C, H, W]``,
    ``support_y [T, N*K]``, ``query_x [T, N*Q, C, H, W]``, ``query_y [T, N*Q]``, ``mode [T]``).
    ``inner_steps`` defaults to ``config.inner_steps`` in training mode and
    ``config.eval_inner_steps`` in eval mode (the module's ``training`` flag; BatchNorm
    always uses batch statistics). Works under ``torch.no_grad`` (the inner loop still
    differentiates the support loss) and under :func:`torch.func.functional_call`; inside a further
    ``vmap`` use ``with learner.batched_with("vmap")`` (the packed path calls ``autograd.grad``).
    """

    def __init__(self, config: LearnerConfig) -> None:
        super().__init__()
        self.config = config
        count = config.num_modes if config.multi_maml else 1
        for name in ("mode_inner_lr", "mode_inner_steps"):
            values = getattr(config, name)
            if values is not None and len(values) != config.num_modes:
                raise KMLError(
                    f"learner {name} has {len(values)} entries for {config.num_modes} modes; give one per mode"
                )
        if config.mode_inner_lr is not None and config.meta_sgd:
            raise KMLError(
                "per-mode inner rates (mode_inner_lr) and learned Meta-SGD rates exclude each other; choose one"
            )
        self.models = nn.ModuleList(TaskModel(config) for _ in range(count))
        # "packed" or "vmap" (see the module docstring); not part of the config: same numbers. The packed
        # layout is written for the 4-block backbones; ResNet-12 runs the vmap path.
        self.packable = config.backbone != "resnet12"
        self.batching = "packed" if self.packable else "vmap"
        # Second-order MAML on the packed path: recompute each inner step in the outer backward instead of
        # keeping its graph (memory of one step instead of all; same numbers, more compute).
        self.activation_checkpointing = False

    @contextmanager
    def batched_with(self, batching: str) -> Iterator[MetaLearner]:
        """Temporarily compute :meth:`forward` with the ``"packed"`` or ``"vmap"`` path."""
        if batching not in ("packed", "vmap"):
            raise ValueError(f"unknown batching {batching!r}; choose packed or vmap")
        if batching == "packed" and not self.packable:
            raise KMLError(
                f"the packed path runs the 4-block backbones only; backbone {self.config.backbone!r} runs vmap"
            )
        previous, self.batching = self.batching, batching
        try:
            yield self
        finally:
            self.batching = previous

    # ----------------------------------------------------------------- helpers
    def _task_model(self, index: int = 0) -> TaskModel:
        """Task model ``index`` of ``self.models`` (the first is the template of every mode's structure)."""
        return cast(TaskModel, self.models[index])

    def inner_parameter_names(self) -> list[str]:
        """Names (in ``named_parameters()``) adapted by the inner loop: the backbone and its head."""
        return [name for name, _ in self.named_parameters() if ".backbone." in name]

    def _steps(self, inner_steps: int | None) -> int:
        if inner_steps is not None:
            return int(inner_steps)
        if self.config.mode_inner_steps is not None:  # every task runs the longest; shorter ones stop (rate 0)
            return max(self.config.mode_inner_steps)
        return self.config.inner_steps if self.training else self.config.eval_inner_steps

    def _step_rates(
        self, mode: torch.Tensor, steps: int, inner_steps: int | None, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """``[T, steps]`` inner rate of each task at each step when rates or step counts differ by mode, else ``None``.

        A task of a mode with fewer steps gets rate 0 after its last step, so its parameters stay exactly
        where its own step count leaves them. ``inner_steps`` given to :meth:`forward` applies to every mode.
        """
        config = self.config
        by_steps = config.mode_inner_steps is not None and inner_steps is None
        if config.mode_inner_lr is None and not by_steps:
            return None
        lr = config.mode_inner_lr or [config.inner_lr] * config.num_modes
        rates = torch.tensor(lr, dtype=dtype, device=mode.device)[mode]  # [T]
        active = torch.ones(len(mode), steps, dtype=dtype, device=mode.device)
        if by_steps:
            counts = torch.tensor(config.mode_inner_steps, device=mode.device)[mode]  # [T]
            active = (torch.arange(steps, device=mode.device) < counts.unsqueeze(1)).to(dtype)
        return rates.unsqueeze(1) * active

    def _modulation(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Modulation | None:
        template = self._task_model()
        if template.encoder is None or template.generator is None:
            return None
        embedding = functional_call(template.encoder, subset(params, "encoder."), (support_x, support_y))
        return self._generate(subset(params, "generator."), embedding)

    def _generate(self, generator_params: Params, embedding: torch.Tensor) -> Modulation:
        """One task's modulation from its task embedding ``[D]``."""
        return functional_call(cast(nn.Module, self._task_model().generator), generator_params, (embedding,))

    def _backbone(self, params: Params, x: torch.Tensor, modulation: Modulation | None) -> torch.Tensor:
        return functional_call(self._task_model().backbone, params, (x, modulation))

    def _support_loss(
        self, fast: Params, modulation: Modulation | None, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        return cross_entropy(self._backbone(fast, x, modulation), y)

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
        step_rates: torch.Tensor | None = None,
        *,
        inner_steps: int,
        ways: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One task's (query loss, query accuracy) from its task model's ``params`` (names relative to it).

        Shapes: ``support_x [N*K, C, H, W]``, ``support_y [N*K]``, ``query_x [N*Q, C, H, W]``, ``query_y [N*Q]``;
        ``step_rates [inner_steps]``: the task's inner rate at each step (``None``: the config's rates);
        ``ways``: N of this episode (ProtoNet's prototypes do not depend on the trained N).
        """
        config = self.config
        modulation = self._modulation(params, support_x, support_y)  # from the support set only
        backbone = subset(params, "backbone.")
        if config.algorithm == "protonet":
            support_features = self._backbone(backbone, support_x, modulation)
            query_features = self._backbone(backbone, query_x, modulation)
            return prototypical_loss(support_features, support_y, query_features, query_y, ways, config.proto_refine)
        fast = backbone
        with float32_inner_loop(support_x.device.type):
            for step in range(inner_steps):
                grads = grad(self._support_loss)(fast, modulation, support_x, support_y)
                if config.first_order:
                    grads = {name: g.detach() for name, g in grads.items()}
                grads = clip_gradients(grads, config.inner_grad_clip, config.inner_grad_clamp)
                fast = {
                    name: p - (self._inner_rate(params, name) if step_rates is None else step_rates[step]) * grads[name]
                    for name, p in fast.items()
                }
        logits = self._backbone(fast, query_x, modulation)
        return cross_entropy(logits, query_y), accuracy(logits, query_y)

    def _task_params(self, episode: Episode) -> tuple[Params, int | None]:
        """Parameters per task and their vmap dimension: shared (``None``) or gathered by mode (``0``)."""
        params: Params = dict(self.named_parameters())
        if not self.config.multi_maml:
            return subset(params, "models.0."), None
        per_mode = [subset(params, f"models.{m}.") for m in range(len(self.models))]
        return {name: torch.stack([p[name] for p in per_mode])[episode.mode] for name in per_mode[0]}, 0

    def forward(self, episode: Episode, inner_steps: int | None = None) -> LearnerOutput:
        """Meta-batch loss with every task adapted and evaluated at once (no Python loop over tasks)."""
        if self.batching == "packed":
            steps = self._steps(inner_steps)
            return self._forward_packed(
                episode, steps, self._step_rates(episode.mode, steps, inner_steps, episode.support_x.dtype)
            )
        params, params_dim = self._task_params(episode)
        steps = self._steps(inner_steps)
        step_rates = self._step_rates(episode.mode, steps, inner_steps, episode.support_x.dtype)
        task = partial(self._task_loss, inner_steps=steps, ways=episode.ways)
        # ResNet-12's nn.BatchNorm2d calls the fused kernel, whose second derivative under vmap is not exact
        exact = not self.packable and self.config.algorithm == "maml" and not self.config.first_order
        with exact_batch_norm(exact):
            task_loss, task_accuracy = vmap(task, in_dims=(params_dim, 0, 0, 0, 0, None if step_rates is None else 0))(
                params, episode.support_x, episode.support_y, episode.query_x, episode.query_y, step_rates
            )
        return LearnerOutput(task_loss.mean(), task_loss, task_accuracy.detach())

    # ------------------------------------------------------------ packed path
    def _forward_packed(
        self, episode: Episode, inner_steps: int, step_rates: torch.Tensor | None = None
    ) -> LearnerOutput:
        config = self.config
        tasks = episode.num_tasks
        params, params_dim = self._task_params(episode)

        def stacked(prefix: str) -> Params:  # per task [T, ...]: shared parameters are expanded, not copied
            selected = subset(params, prefix)
            return selected if params_dim == 0 else {n: p.expand(tasks, *p.shape) for n, p in selected.items()}

        # Channels-last is faster for oneDNN's grouped convolutions on a CPU (benchmarks/README.md, "Design
        # measurements"); unmeasured on a GPU, so CUDA keeps the default layout.
        channels_last = episode.support_x.device.type == "cpu"
        modulation = None
        template = self._task_model()
        if template.encoder is not None and template.generator is not None:  # from the support set only
            embedding = packed_task_embedding(
                stacked("encoder."), episode.support_x, episode.support_y, template.encoder.label_ways, channels_last
            )
            modulation = vmap(self._generate, in_dims=(params_dim, 0))(subset(params, "generator."), embedding)

        layout, pool = config.backbone, config.head
        # packed_forward's fused BatchNorm is exact here, second order included: the torch bug that makes
        # the vmap path avoid it is in vmap's batching rule (tests hold both paths to the reference).
        if config.algorithm == "protonet":
            backbone = stacked("backbone.")
            support_features = packed_forward(
                backbone, episode.support_x, modulation, layout, channels_last=channels_last, pool=pool
            )
            query_features = packed_forward(
                backbone, episode.query_x, modulation, layout, channels_last=channels_last, pool=pool
            )
            task_loss, task_accuracy = prototypical_loss(
                support_features, episode.support_y, query_features, episode.query_y, episode.ways, config.proto_refine
            )
            return LearnerOutput(task_loss.mean(), task_loss, task_accuracy.detach())
        second_order = not config.first_order and torch.is_grad_enabled()
        # The inner loop needs gradients even in evaluation; under bf16 autocast it runs in float32.
        with torch.enable_grad(), float32_inner_loop(episode.support_x.device.type):
            # Expanded here, not under an outer no_grad: a view made there still "requires grad" through
            # its base, and autograd would not differentiate with respect to it.
            fast = {
                n: p if p.requires_grad else p.detach().clone().requires_grad_()
                for n, p in stacked("backbone.").items()
            }
            rate_params = stacked("inner_rates.")
            rates = {name: rate_params.get(rate_key(name), config.inner_lr) for name in fast}
            step = partial(self._packed_inner_step, rates=rates, second_order=second_order)
            for index in range(inner_steps):
                if step_rates is not None:  # rates (and step counts) by mode: this step's [T] rates
                    step = partial(
                        self._packed_inner_step,
                        second_order=second_order,
                        rates={name: _per_task(step_rates[:, index], p) for name, p in fast.items()},
                    )
                if self.activation_checkpointing and second_order:
                    # keep only each step's parameters; its graph is rebuilt during the outer backward
                    fast = checkpoint(
                        step,
                        fast,
                        modulation,
                        episode.support_x,
                        episode.support_y,
                        use_reentrant=False,
                        preserve_rng_state=False,
                    )
                else:
                    fast = step(fast, modulation, episode.support_x, episode.support_y)
        # Channels-last for the query pass only: the inner loop's double backward runs slower in that layout.
        logits = packed_forward(fast, episode.query_x, modulation, layout, channels_last=channels_last, pool=pool)
        task_loss = cross_entropy(logits, episode.query_y)
        return LearnerOutput(task_loss.mean(), task_loss, accuracy(logits, episode.query_y))

    def _packed_inner_step(
        self,
        fast: Params,
        modulation: Modulation | None,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        rates: dict[str, torch.Tensor | float],
        second_order: bool,
    ) -> Params:
        """One inner step of every task: ``fast`` holds ``[T, ...]`` per-task parameters, ``support_x [T, N*K, C, H, W]``."""
        # Task t's loss depends only on slice t of the stacked parameters, so the gradient of
        # the sum holds every task's own inner gradient.
        support_loss = cross_entropy(
            packed_forward(fast, support_x, modulation, self.config.backbone, pool=self.config.head), support_y
        )
        raw = torch.autograd.grad(support_loss.sum(), list(fast.values()), create_graph=second_order)
        grads = clip_task_gradients(dict(zip(fast, raw)), self.config.inner_grad_clip, self.config.inner_grad_clamp)
        return {name: p - rates[name] * grads[name] for name, p in fast.items()}

    # ---------------------------------------------------------- reference path
    def reference_forward(self, episode: Episode, inner_steps: int | None = None) -> LearnerOutput:
        """The same computation as :meth:`forward`, one task at a time with ordinary autograd (the oracle)."""
        config = self.config
        steps = self._steps(inner_steps)
        modes = episode.mode.tolist()
        losses, accuracies = [], []
        for t in range(episode.num_tasks):
            model = self._task_model(modes[t] if config.multi_maml else 0)
            support_x, support_y = episode.support_x[t], episode.support_y[t]
            query_x, query_y = episode.query_x[t], episode.query_y[t]
            modulation = model.modulation(support_x, support_y)
            if config.algorithm == "protonet":
                loss, acc = prototypical_loss(
                    model(support_x, modulation),
                    support_y,
                    model(query_x, modulation),
                    query_y,
                    episode.ways,
                    config.proto_refine,
                )
            else:
                # Per-mode step counts and rates taken literally here (the batched paths run the longest and mask).
                task_steps = (
                    config.mode_inner_steps[modes[t]] if config.mode_inner_steps and inner_steps is None else steps
                )
                task_lr = config.mode_inner_lr[modes[t]] if config.mode_inner_lr else config.inner_lr
                fast: Params = dict(model.backbone.named_parameters())
                with torch.enable_grad(), float32_inner_loop(support_x.device.type):  # as the batched paths
                    fast = {n: p if p.requires_grad else p.detach().requires_grad_() for n, p in fast.items()}
                    for _ in range(task_steps):
                        support_loss = cross_entropy(
                            functional_call(model.backbone, fast, (support_x, modulation)), support_y
                        )
                        raw = torch.autograd.grad(
                            support_loss, list(fast.values()), create_graph=not config.first_order
                        )
                        grads = clip_gradients(dict(zip(fast, raw)), config.inner_grad_clip, config.inner_grad_clamp)
                        rates = model.inner_rates
                        fast = {
                            n: p - (rates[rate_key(n)] if rates is not None else task_lr) * grads[n]
                            for n, p in fast.items()
                        }
                logits = functional_call(model.backbone, fast, (query_x, modulation))
                loss, acc = cross_entropy(logits, query_y), accuracy(logits, query_y)
            losses.append(loss)
            accuracies.append(acc)
        task_loss = torch.stack(losses)
        return LearnerOutput(task_loss.mean(), task_loss, torch.stack(accuracies).detach())


def build_learner(config: LearnerConfig) -> MetaLearner:
    """The learner a config names (the one constructor used by training, evaluation and checkpoints)."""
    return MetaLearner(config)
