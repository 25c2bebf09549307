"""Pieces shared by every learner: parameter dicts, inner-gradient clipping and exact batch statistics.

A learner sees a model as a function of a parameter dict (``torch.func.functional_call``), so these
helpers work for any ``nn.Module``: kml's own backbones and a user's network alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ModelCalls",
    "Params",
    "clip_gradients",
    "clip_task_gradients",
    "exact_batch_norm",
    "subset",
    "use_batch_statistics",
]

Params = dict[str, torch.Tensor]


def subset(params: Mapping[str, torch.Tensor], prefix: str) -> Params:
    """Entries of ``params`` under ``prefix``, with the prefix removed."""
    return {name[len(prefix) :]: value for name, value in params.items() if name.startswith(prefix)}


def clip_task_gradients(grads: Params, max_norm: float | None, clamp: float | None = None) -> Params:
    """Scale each task's inner gradients (stacked ``[T, ...]``) to at most ``max_norm``, L2 over all jointly,
    then clamp every element to ``[-clamp, clamp]`` (MMAML's inner-loop clip)."""
    if max_norm is not None:
        # a sum of tensors is a tensor (sum's start value 0 only shows in its static type)
        squared = cast(torch.Tensor, sum(g.pow(2).flatten(1).sum(dim=1) for g in grads.values()))
        norm = torch.sqrt(squared)  # [T]
        factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        grads = {name: g * factor.view(-1, *([1] * (g.dim() - 1))) for name, g in grads.items()}
    if clamp is not None:
        grads = {name: g.clamp(-clamp, clamp) for name, g in grads.items()}
    return grads


def clip_gradients(grads: Params, max_norm: float | None, clamp: float | None = None) -> Params:
    """:func:`clip_task_gradients` for one task's gradients."""
    if max_norm is None and clamp is None:
        return grads
    clipped = clip_task_gradients({name: g.unsqueeze(0) for name, g in grads.items()}, max_norm, clamp)
    return {name: g.squeeze(0) for name, g in clipped.items()}


def use_batch_statistics(model: nn.Module) -> nn.Module:
    """Make every BatchNorm of ``model`` normalise with the statistics of the batch it is given, in training
    and evaluation alike, and keep no running statistics (MAML's convention; a running average would also
    be a buffer written by every task at once under ``vmap``). Changes ``model`` in place and returns it."""
    from torch.func import replace_all_batch_norm_modules_

    return replace_all_batch_norm_modules_(model)


def _elementary_batch_norm(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    """``F.batch_norm`` with batch statistics, written with elementary ops (any input rank ``[B, C, ...]``)."""
    del running_mean, running_var, training, momentum  # F.batch_norm's signature; batch statistics only
    dims = [0, *range(2, input.dim())]
    mean = input.mean(dim=dims, keepdim=True)
    normed = (input - mean) * torch.rsqrt((input - mean).pow(2).mean(dim=dims, keepdim=True) + eps)
    shape = [1, -1] + [1] * (input.dim() - 2)
    if weight is not None:
        normed = normed * weight.view(shape)
    if bias is not None:
        normed = normed + bias.view(shape)
    return normed


@contextmanager
def exact_batch_norm(enabled: bool = True) -> Iterator[None]:
    """Within the block, batch-statistics ``F.batch_norm`` (what ``nn.BatchNorm2d`` calls) runs as elementary
    ops, so that second-order MAML under ``vmap`` differentiates it correctly.

    In torch 2.14 the batching rule of the fused kernel's double backward gives wrong second-order
    meta-gradients (off by ~1e-3; the equality tests in tests/test_generic.py catch it). Calls with running
    statistics pass through unchanged. Not thread-safe: it swaps ``torch.nn.functional.batch_norm``.
    """
    if not enabled:
        yield
        return
    fused = F.batch_norm

    def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
        if running_mean is None and running_var is None:
            return _elementary_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return fused(input, running_mean, running_var, weight, bias, training, momentum, eps)

    F.batch_norm = batch_norm
    try:
        yield
    finally:
        F.batch_norm = fused


class ModelCalls:
    """How a learner evaluates its model from a parameter dict (names as in ``model.named_parameters()``).

    A plain module maps images to logits or features; a
    :class:`~kml.models.modulate.TaskConditionedModel` first turns the task's support set into a
    modulation with its encoder and generator, and its backbone (the part MAML's inner loop adapts)
    takes that modulation with the images.
    """

    def __init__(self, model: nn.Module) -> None:
        from kml.models.modulate import TaskConditionedModel

        self.model = model
        self.conditioned = (
            isinstance(model, TaskConditionedModel) and model.encoder is not None and model.generator is not None
        )
        self.network_prefix = "backbone." if isinstance(model, TaskConditionedModel) else ""

    def network_names(self) -> list[str]:
        """Names of the network's parameters: what the inner loop adapts (the encoder and generator are not)."""
        return [name for name, p in self.model.named_parameters() if name.startswith(self.network_prefix)]

    def modulation(
        self, params: Mapping[str, torch.Tensor], support_x: torch.Tensor, support_y: torch.Tensor
    ) -> dict[str, torch.Tensor] | None:
        """One task's modulation from its support set ``[N*K, C, H, W]``, ``[N*K]`` (``None`` for a plain model)."""
        if not self.conditioned:
            return None
        from torch.func import functional_call

        # self.conditioned: the model is a TaskConditionedModel with an encoder and a generator
        encoder, generator = cast(nn.Module, self.model.encoder), cast(nn.Module, self.model.generator)
        embedding = functional_call(encoder, subset(params, "encoder."), (support_x, support_y))
        return functional_call(generator, subset(params, "generator."), (embedding,))

    def __call__(self, network: Params, x: torch.Tensor, modulation: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """The network's output on ``x [B, C, H, W]`` with parameters ``network`` (names without the prefix)."""
        from torch.func import functional_call

        if not self.network_prefix:
            return functional_call(self.model, network, (x,))
        # a network prefix: the model is a TaskConditionedModel
        return functional_call(cast(nn.Module, self.model.backbone), network, (x, modulation))
