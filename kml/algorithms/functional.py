"""Pieces shared by every learner: parameter dicts, inner-gradient clipping and BatchNorm modes.

A learner sees a model as a function of a parameter dict (``torch.func.functional_call``), so these
helpers work for any ``nn.Module``: kml's own backbones and a user's network alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from kml.errors import KMLError, setting

__all__ = [
    "ModelCalls",
    "Params",
    "clip_gradients",
    "clip_task_gradients",
    "subset",
    "BATCH_NORM_MODES",
    "batch_norm_mode",
    "check_batch_norm_mode",
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


BATCH_NORM_MODES = ("transductive", "running")


def check_batch_norm_mode(model: nn.Module, mode: str) -> None:
    """Refuse a BatchNorm mode ``model`` cannot run: ``"running"`` needs running statistics in every BatchNorm."""
    if mode not in BATCH_NORM_MODES:
        raise KMLError(f"unknown {setting('batch_norm')} {mode!r}; choose one of {', '.join(BATCH_NORM_MODES)}")
    if mode == "running":
        for name, module in model.named_modules():
            if isinstance(module, _BatchNorm) and (module.running_mean is None or module.running_var is None):
                raise KMLError(
                    f"{setting('batch_norm', 'running')} normalises with running statistics, but BatchNorm "
                    f"{name or type(module).__name__} keeps none (track_running_stats=False); use 'transductive'"
                )


@contextmanager
def batch_norm_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Within the block, every BatchNorm of ``model`` normalises as ``mode`` says; restored afterwards, so the
    user's module (its flags, its running statistics) is left as it was.

    ``"transductive"``: with the statistics of the batch it is given (one task's support or query set), in
    training and evaluation alike, and its running statistics are neither used nor updated (MAML's
    convention; an update would also be a buffer written by every task at once under ``vmap``).
    ``"running"``: with its running statistics (e.g. pretrained ones), never updated: each query is
    classified on its own (inductive). Not thread-safe: it sets the modules' flags for the block.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in norms]
    try:
        for norm in norms:
            if mode == "transductive":
                norm.training, norm.track_running_stats = True, False
            else:
                norm.training = False
        yield
    finally:
        for norm, (training, tracking) in zip(norms, saved):
            norm.training, norm.track_running_stats = training, tracking


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
            output = functional_call(self.model, network, (x,))
        else:  # a network prefix: the model is a TaskConditionedModel
            output = functional_call(cast(nn.Module, self.model.backbone), network, (x, modulation))
        if not isinstance(output, torch.Tensor):
            raise KMLError(
                f"{type(self.model).__name__} returned a {type(output).__name__}, not one tensor of logits or "
                f"features [B, ...]; wrap it in a module that returns the one tensor the method needs"
            )
        return output
