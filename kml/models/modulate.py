"""Task modulation for any CNN: ``modulate(model, "kml" | "film")``.

The wrapped network keeps its own forward; the layers that a modulation acts on read it at call time:

* ``"kml"``: every ``nn.Conv2d`` multiplies its kernel by the task's factor and adds the task's bias shift
  (:class:`ModulatedConv2d`; ``W * (1 + outer(v, u))`` in the residual form, ``W * outer(v, u)`` bare);
* ``"film"``: every ``nn.BatchNorm2d`` scales and shifts its normalised output per channel, as MMAML
  (:class:`FiLMBatchNorm2d`; a scale before a batch-statistics BatchNorm would be normalised away).

A :class:`TaskConditionedModel` bundles the task encoder (support set -> embedding), the generator
(embedding -> modulation, a flat dict of tensors keyed ``kernel{l}``/``bias{l}`` for the l-th modulated conv
or ``scale{l}``/``shift{l}`` for the l-th modulated BatchNorm) and the modulated network. kml's learners
compute the modulation once per task from the support set and adapt only the network's parameters in
MAML's inner loop; the encoder and generator are meta-learned by the outer loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import cast

import torch
from torch import nn

from kml.errors import KMLError
from kml.models.backbone import Modulation
from kml.models.encoder import TaskEncoder
from kml.models.modulation import FiLMGenerator, KMLGenerator

__all__ = [
    "FiLMBatchNorm2d",
    "ModulatedConv2d",
    "ModulatedNetwork",
    "ModulatedModel",
    "TaskConditionedModel",
    "modulate",
]

MODULATION_KINDS = ("kml", "film", "none")


class ModulatedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose kernel and bias take the current task's KML modulation when one is set.

    ``kernel_factor [out, in/groups, k, k]`` multiplies the kernel, ``bias_shift [out]`` is added to the
    bias (to zero for a conv without one). Both are ``None`` outside a modulated call: a plain conv.
    """

    kernel_factor: torch.Tensor | None = None
    bias_shift: torch.Tensor | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if self.kernel_factor is not None:
            weight = weight * self.kernel_factor
        if self.bias_shift is not None:
            bias = self.bias_shift if bias is None else bias + self.bias_shift
        return self._conv_forward(input, weight, bias)


class FiLMBatchNorm2d(nn.BatchNorm2d):
    """An ``nn.BatchNorm2d`` whose output is scaled and shifted per channel (``[C, 1, 1]``) by the current
    task's FiLM modulation when one is set."""

    film_scale: torch.Tensor | None = None
    film_shift: torch.Tensor | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = super().forward(input)
        if self.film_scale is not None:
            out = out * self.film_scale
        if self.film_shift is not None:
            out = out + self.film_shift
        return out


def _targets(
    network: nn.Module, kind: str, layers: Callable[[str, nn.Module], bool] | None
) -> list[tuple[str, nn.Module]]:
    """The layers a ``kind`` modulation acts on, in ``named_modules`` order (their index l, from 1, names them)."""
    if kind == "none":
        return []
    # exact types only: a subclass of nn.Conv2d may have its own forward, which the swap would replace
    exact = {nn.Conv2d, ModulatedConv2d} if kind == "kml" else {nn.BatchNorm2d, FiLMBatchNorm2d}
    found = [
        (name, m) for name, m in network.named_modules() if type(m) in exact and (layers is None or layers(name, m))
    ]
    if not found:
        what = "nn.Conv2d" if kind == "kml" else "nn.BatchNorm2d (FiLM scales and shifts their outputs)"
        raise KMLError(f"modulation {kind!r} found no {what} layer to modulate in {type(network).__name__}")
    return found


class ModulatedNetwork(nn.Module):
    """A network whose ``kind`` layers take a per-call modulation: ``forward(x, modulation=None)``.

    The network's ``nn.Conv2d`` (``"kml"``) or ``nn.BatchNorm2d`` (``"film"``) layers become
    :class:`ModulatedConv2d` / :class:`FiLMBatchNorm2d` in place (same parameters, same names, same output
    without a modulation). Its parameters appear under ``network.``.

    Args:
        network: any module mapping images ``[B, C, H, W]`` to logits or features.
        kind: ``"kml"``, ``"film"`` or ``"none"`` (a pass-through).
        layers: optional filter ``(name, module) -> bool`` of the layers to modulate (default: all of them).
    """

    def __init__(
        self, network: nn.Module, kind: str = "kml", layers: Callable[[str, nn.Module], bool] | None = None
    ) -> None:
        super().__init__()
        if kind not in MODULATION_KINDS:
            raise KMLError(f"unknown modulation {kind!r}; choose one of {', '.join(MODULATION_KINDS)}")
        self.network = network
        self.kind = kind
        self.layer_names = [name for name, _ in _targets(network, kind, layers)]
        for _, module in self.targets():
            module.__class__ = ModulatedConv2d if kind == "kml" else FiLMBatchNorm2d

    def targets(self) -> list[tuple[str, nn.Module]]:
        """``(name, layer)`` of the modulated layers, in order (layer ``l`` is entry ``l - 1``)."""
        modules = dict(self.network.named_modules())
        return [(name, modules[name]) for name in self.layer_names]

    @property
    def conv_shapes(self) -> list[tuple[int, int, int, int]]:
        """Kernel shapes ``[out, in/groups, k, k]`` of the modulated convs (what a KML generator sizes)."""
        shapes = [tuple(cast(nn.Conv2d, m).weight.shape) for _, m in self.targets()]
        return cast("list[tuple[int, int, int, int]]", shapes)  # a Conv2d kernel is 4-d

    @property
    def channels(self) -> list[int]:
        """Channels of the modulated BatchNorms (what a FiLM generator sizes)."""
        return [cast(nn.BatchNorm2d, m).num_features for _, m in self.targets()]

    @contextmanager
    def _applied(self, modulation: Modulation | None) -> Iterator[None]:
        """Set each modulated layer's part of ``modulation`` for the duration of one call."""
        if modulation is None:  # the layers compute as their plain base classes
            yield
            return
        # the layers' classes were swapped in __init__: ModulatedConv2d ("kml") or FiLMBatchNorm2d ("film")
        convs = [cast(ModulatedConv2d, m) for _, m in self.targets()] if self.kind == "kml" else []
        norms = [cast(FiLMBatchNorm2d, m) for _, m in self.targets()] if self.kind != "kml" else []
        for index, conv in enumerate(convs, start=1):
            conv.kernel_factor, conv.bias_shift = modulation.get(f"kernel{index}"), modulation.get(f"bias{index}")
        for index, norm in enumerate(norms, start=1):
            norm.film_scale, norm.film_shift = modulation.get(f"scale{index}"), modulation.get(f"shift{index}")
        try:
            yield
        finally:
            for conv in convs:
                conv.kernel_factor = conv.bias_shift = None
            for norm in norms:
                norm.film_scale = norm.film_shift = None

    def forward(self, x: torch.Tensor, modulation: Modulation | None = None) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> the network's output, its layers modulated by ``modulation`` (if any)."""
        with self._applied(modulation):
            return self.network(x)


class TaskConditionedModel(nn.Module):
    """A network conditioned on each task's support set, the form kml's learners recognise.

    Attributes:
        encoder: support set ``[N*K, C, H, W]`` (+ labels ``[N*K]``) -> task embedding ``[D]``, or ``None``.
        generator: task embedding ``[D]`` -> modulation (a flat dict of tensors), or ``None``.
        backbone: ``backbone(x [B, C, H, W], modulation) -> logits [B, N] or features [B, D']``; its
            parameters are what MAML's inner loop adapts.
    """

    encoder: nn.Module | None
    generator: nn.Module | None
    backbone: nn.Module

    def modulation(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Modulation | None:
        """One task's modulation from its support set ``[N*K, C, H, W]``, ``[N*K]`` (``None`` without one)."""
        if self.encoder is None or self.generator is None:
            return None
        return self.generator(self.encoder(support_x, support_y))

    def forward(self, x: torch.Tensor, modulation: Modulation | None = None) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> the backbone's output under ``modulation``."""
        return self.backbone(x, modulation)


class ModulatedModel(TaskConditionedModel):
    """Any CNN with a task encoder and a KML or FiLM generator (build it with :func:`modulate`)."""

    def __init__(self, backbone: ModulatedNetwork, encoder: nn.Module, generator: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.generator = generator
        self.backbone = backbone


def modulate(
    model: nn.Module,
    kind: str = "kml",
    *,
    in_channels: int = 3,
    encoder: nn.Module | None = None,
    encoder_channels: int = 32,
    encoder_hidden: int | None = None,
    form: str = "residual",
    factor_split: str = "plain",
    identity_init: bool = True,
    layers: Callable[[str, nn.Module], bool] | None = None,
) -> ModulatedModel:
    """Put KML (every conv kernel) or FiLM (every BatchNorm output) on ``model``, driven by a task encoder.

    ``model``'s layers are converted in place (same parameter names and values; without a modulation it
    computes what it computed before). With ``identity_init`` the generators start at the identity
    modulation, so the returned model equals ``model`` until meta-training moves them (residual KML and
    FiLM: zero modulation; bare KML: ``outer(v, u) = 1``).

    Args:
        model: any module mapping images ``[B, in_channels, H, W]`` to logits or features.
        kind: ``"kml"`` or ``"film"``.
        in_channels: image channels (sizes the default task encoder).
        encoder: the task encoder, a module mapping ``(support_x [N*K, C, H, W], support_y [N*K])`` to
            ``[D]`` with an ``embedding_dim`` attribute (D); default: kml's 4-block :class:`TaskEncoder`.
        encoder_channels, encoder_hidden: E and the optional per-image hidden layer of the default encoder.
        form: KML's ``"residual"`` (``W * (1 + M)``) or ``"bare"`` (``W * M``, the released code) form.
        factor_split: ``"plain"`` or ``"published"`` (see :func:`kml.models.modulation.factor_shape`).
        identity_init: start at the identity modulation.
        layers: optional filter ``(name, module) -> bool`` of the layers to modulate.

    Returns:
        A :class:`ModulatedModel`; pass it to :class:`kml.MAML` or :class:`kml.ProtoNet`.
    """
    if kind not in ("kml", "film"):
        raise KMLError(f"unknown modulation {kind!r}; choose kml or film")
    if form not in ("residual", "bare"):
        raise KMLError(f"unknown KML form {form!r}; choose residual or bare")
    backbone = ModulatedNetwork(model, kind, layers)
    if encoder is None:
        encoder = TaskEncoder(in_channels, encoder_channels, hidden=encoder_hidden)
    embedding_dim = getattr(encoder, "embedding_dim", None)
    if not isinstance(embedding_dim, int):
        raise KMLError("the task encoder needs an integer `embedding_dim` attribute (the size of its output)")
    if kind == "kml":
        generator: nn.Module = KMLGenerator(embedding_dim, backbone.conv_shapes, form, factor_split, identity_init)
    else:
        generator = FiLMGenerator(embedding_dim, backbone.channels, identity_init)
    return ModulatedModel(backbone, encoder, generator)
