"""How the T tasks of a meta-batch are executed: the seam between a method and a model.

A method (:class:`~kml.algorithms.maml.MAML`, :class:`~kml.algorithms.protonet.ProtoNet`) is written once,
over stacked per-task tensors: parameters ``[T, ...]`` (or shared by every task), images ``[T, B, C, H, W]``,
modulations ``[T, ...]``. An :class:`Execution` runs the model on them:

* :class:`VmapExecution` (``"vmap"``): any ``nn.Module``, ``torch.func.vmap`` of ``functional_call`` over the
  tasks, inner gradients from ``torch.func.grad``. Composes with further transforms (the transference
  analyzer ``vmap``-s a learner again over lookahead parameters).
* :class:`PackedExecution` (``"packed"``): a network that says how to run T tasks at once, by a method
  ``forward_tasks(params, x, modulation, *, inner)`` taking parameters stacked ``[T, ...]`` (kml's 4-block
  :class:`~kml.models.backbone.Backbone`: grouped convolutions in a task-packed layout, no relayout between
  layers); inner gradients of all tasks from one ``autograd.grad`` of the summed task losses (each task's loss
  depends only on its own slice). A task encoder with ``forward_tasks`` (kml's
  :class:`~kml.models.encoder.TaskEncoder`) runs packed too.

:func:`choose_execution` picks one: ``"auto"`` is packed when the network supports it and no ``torch.func``
transform is active, else vmap. Both are held equal to the per-task loops of :mod:`kml.algorithms.reference`
in float64 (tests/test_algorithms.py, tests/test_generic.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, cast

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from kml.algorithms.functional import ModelCalls, Params, subset
from kml.errors import KMLError

__all__ = [
    "BACKENDS",
    "Execution",
    "PackedExecution",
    "SupportSetsAtOnce",
    "TasksAtOnce",
    "VmapExecution",
    "choose_execution",
    "supports_packed",
]

BACKENDS = ("auto", "packed", "vmap")

Modulation = dict[str, torch.Tensor]


class TasksAtOnce(Protocol):
    """A network that runs T tasks at once (what the packed backend needs): kml's 4-block backbones."""

    def forward_tasks(
        self, params: Params, x: torch.Tensor, modulation: Modulation | None, *, inner: bool = False
    ) -> torch.Tensor:
        """Per-task ``params`` ``[T, ...]`` (names as in the network), images ``[T, B, C, H, W]`` -> ``[T, B, ...]``;
        equal to the network's forward per task. ``inner``: a pass of MAML's inner loop (a layout hint)."""
        ...


class SupportSetsAtOnce(Protocol):
    """A task encoder that embeds T support sets at once: kml's :class:`~kml.models.encoder.TaskEncoder`."""

    def forward_tasks(self, params: Params, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Per-task ``params`` ``[T, ...]``, support sets ``[T, B, C, H, W]`` (+ labels ``[T, B]``) -> ``[T, D]``."""
        ...


def _in_function_transform() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad) is active: ``autograd.grad`` cannot run inside one."""
    return torch._C._functorch.maybe_current_level() is not None


def _network_module(calls: ModelCalls) -> nn.Module:
    return cast(nn.Module, calls.model.backbone) if calls.network_prefix else calls.model


def supports_packed(model: nn.Module) -> bool:
    """Whether ``model``'s network (its backbone, for a task-conditioned model) runs T tasks at once."""
    return callable(getattr(_network_module(ModelCalls(model)), "forward_tasks", None))


class Execution:
    """Runs one model on T tasks at once. Parameter dicts are named as in ``model.named_parameters()``;
    ``shared`` ones are the same for every task, ``per_task`` ones are stacked ``[T, ...]``."""

    name = ""
    # whether torch.utils.checkpoint may wrap an inner step (it needs ordinary autograd, not torch.func)
    supports_checkpointing = False

    def __init__(self, model: nn.Module) -> None:
        self.calls = ModelCalls(model)

    def per_task(self, params: Params, tasks: int) -> Params:
        """Shared parameters as ``[T, ...]`` views, so that each task's inner gradient is its own."""
        return {name: p.expand(tasks, *p.shape) for name, p in params.items()}

    def prepare(self, shared: Params, per_task: Params, tasks: int) -> tuple[Params, Params]:
        """``(shared, per_task)`` in the form this backend runs them (once per forward pass)."""
        del tasks
        return shared, per_task

    def modulation(
        self, shared: Params, per_task: Params, support_x: torch.Tensor, support_y: torch.Tensor
    ) -> Modulation | None:
        """Each task's modulation from its support set ``[T, N*K, C, H, W]``, ``[T, N*K]`` (``None`` for a plain model)."""
        raise NotImplementedError

    def network(
        self, shared: Params, per_task: Params, x: torch.Tensor, modulation: Modulation | None, *, inner: bool = False
    ) -> torch.Tensor:
        """The network on images ``[T, B, C, H, W]`` -> ``[T, B, ...]``; ``inner``: a pass of the inner loop."""
        raise NotImplementedError

    def gradients(self, loss_of: Callable[[Params], torch.Tensor], fast: Params, create_graph: bool) -> Params:
        """Each task's gradient ``[T, ...]`` of its loss (``loss_of(fast) -> [T]``) w.r.t. ``fast`` ``[T, ...]``;
        ``create_graph``: differentiable (second-order MAML), else detached."""
        raise NotImplementedError


class VmapExecution(Execution):
    """Any module: ``vmap`` of ``functional_call`` over the tasks, gradients from ``torch.func.grad``."""

    name = "vmap"

    def modulation(
        self, shared: Params, per_task: Params, support_x: torch.Tensor, support_y: torch.Tensor
    ) -> Modulation | None:
        if not self.calls.conditioned:
            return None

        def one(shared: Params, own: Params, x: torch.Tensor, y: torch.Tensor) -> Modulation | None:
            return self.calls.modulation({**shared, **own}, x, y)

        return vmap(one, in_dims=(None, 0, 0, 0), randomness="different")(shared, per_task, support_x, support_y)

    def network(
        self, shared: Params, per_task: Params, x: torch.Tensor, modulation: Modulation | None, *, inner: bool = False
    ) -> torch.Tensor:
        del inner  # a layout hint for networks that run tasks packed
        prefix = self.calls.network_prefix

        def one(shared: Params, own: Params, x: torch.Tensor, modulation: Modulation | None) -> torch.Tensor:
            return self.calls({**shared, **own}, x, modulation)

        dims = (None, 0, 0, None if modulation is None else 0)
        return vmap(one, in_dims=dims, randomness="different")(
            subset(shared, prefix), subset(per_task, prefix), x, modulation
        )

    def gradients(self, loss_of: Callable[[Params], torch.Tensor], fast: Params, create_graph: bool) -> Params:
        grads = grad(lambda params: loss_of(params).sum())(fast)
        return grads if create_graph else {name: g.detach() for name, g in grads.items()}


class PackedExecution(VmapExecution):
    """A network with ``forward_tasks`` (kml's backbones): T tasks in one packed call, ``autograd.grad``."""

    name = "packed"
    supports_checkpointing = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.network_module = cast(TasksAtOnce, _network_module(self.calls))

    def prepare(self, shared: Params, per_task: Params, tasks: int) -> tuple[Params, Params]:
        """The parameters of the packed parts (the network, and an encoder with ``forward_tasks``) per task
        ``[T, ...]``, expanded once: the passes of one forward share the expansion, so a parameter's meta-gradient
        is summed over tasks once, after all its passes' contributions. A generator stays shared (it runs vmap)."""
        packed = [self.calls.network_prefix]
        if self.calls.conditioned and callable(getattr(self.calls.model.encoder, "forward_tasks", None)):
            packed.append("encoder.")
        expand = {name: p for name, p in shared.items() if name.startswith(tuple(packed))}
        kept = {name: p for name, p in shared.items() if name not in expand}
        return kept, {**self.per_task(expand, tasks), **per_task}

    def modulation(
        self, shared: Params, per_task: Params, support_x: torch.Tensor, support_y: torch.Tensor
    ) -> Modulation | None:
        if not self.calls.conditioned:
            return None
        encoder = cast(nn.Module, self.calls.model.encoder)
        if not callable(getattr(encoder, "forward_tasks", None)):
            return super().modulation(shared, per_task, support_x, support_y)
        tasks = support_x.shape[0]
        params = {**self.per_task(subset(shared, "encoder."), tasks), **subset(per_task, "encoder.")}
        embedding = cast(SupportSetsAtOnce, encoder).forward_tasks(params, support_x, support_y)  # [T, D]
        generator = cast(nn.Module, self.calls.model.generator)

        def one(shared: Params, own: Params, embedding: torch.Tensor) -> Modulation:
            return functional_call(generator, {**shared, **own}, (embedding,))

        return vmap(one, in_dims=(None, 0, 0))(subset(shared, "generator."), subset(per_task, "generator."), embedding)

    def network(
        self, shared: Params, per_task: Params, x: torch.Tensor, modulation: Modulation | None, *, inner: bool = False
    ) -> torch.Tensor:
        prefix = self.calls.network_prefix
        params = {**self.per_task(subset(shared, prefix), x.shape[0]), **subset(per_task, prefix)}
        return self.network_module.forward_tasks(params, x, modulation, inner=inner)

    def gradients(self, loss_of: Callable[[Params], torch.Tensor], fast: Params, create_graph: bool) -> Params:
        # The inner loop differentiates the support loss even under an outer no_grad (evaluation).
        with torch.enable_grad():
            # Leaves where the parameters carry no graph (evaluation). Copied: an expanded view made under no_grad
            # still "requires grad" through its base, and autograd would not differentiate with respect to it.
            fast = {name: p if p.requires_grad else p.detach().clone().requires_grad_() for name, p in fast.items()}
            # Task t's loss depends only on slice t of the stacked parameters: the gradient of the sum holds
            # every task's own inner gradient.
            raw = torch.autograd.grad(loss_of(fast).sum(), list(fast.values()), create_graph=create_graph)
        return dict(zip(fast, raw))


def choose_execution(model: nn.Module, backend: str) -> Execution:
    """The execution ``backend`` names for ``model`` (``"auto"``: packed where the network supports it and no
    ``torch.func`` transform is active, else vmap)."""
    if backend not in BACKENDS:
        raise KMLError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    packable = supports_packed(model)
    if backend == "packed":
        if not packable:
            raise KMLError(
                f"the packed backend runs networks with forward_tasks (kml's 4-block backbones); "
                f"{type(_network_module(ModelCalls(model))).__name__} runs vmap"
            )
        if _in_function_transform():
            raise KMLError("the packed backend cannot run inside torch.func transforms (vmap, grad); use vmap")
        return PackedExecution(model)
    if backend == "auto" and packable and not _in_function_transform():
        return PackedExecution(model)
    return VmapExecution(model)
