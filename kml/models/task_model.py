"""The per-task model: task encoder -> modulation generator -> modulated backbone (-> head), built from a
:class:`~kml.config.learner.LearnerConfig` (kml's backbones, or a network named by import path)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from kml.config.learner import LearnerConfig
from kml.errors import KMLError
from kml.models.backbone import Backbone
from kml.models.encoder import TaskEncoder
from kml.models.modulate import ModulatedNetwork, TaskConditionedModel, modulate
from kml.models.modulation import FiLMGenerator, KMLGenerator
from kml.models.resnet12 import ResNet12, resnet12_widths

__all__ = ["TaskModel", "network_model", "resolve_network"]

# Callables a saved config may name are constructors of modules; these make modules from files or code.
_REFUSED_MODULES = ("torch.jit", "torch.hub", "torch.package", "torch.export")


def resolve_network(path: str) -> Callable[..., nn.Module]:
    """The network constructor named ``"package.module:name"``: an ``nn.Module`` subclass, or a function
    annotated to return one. Nothing else is called (a config file or checkpoint names it, and loading one
    must not run arbitrary code)."""
    import importlib
    import typing

    module_name, _, attribute = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as error:
        raise KMLError(f"network {path!r} cannot be imported ({error}); install its package or fix the path") from None
    if isinstance(target, type) and issubclass(target, nn.Module):
        return target
    returns = None
    if callable(target) and not str(getattr(target, "__module__", "")).startswith(_REFUSED_MODULES):
        try:
            returns = typing.get_type_hints(target).get("return")
        except (NameError, TypeError, AttributeError):  # unresolvable annotations: treated as none
            returns = None
    if not (isinstance(returns, type) and issubclass(returns, nn.Module)):
        raise KMLError(
            f"network {path!r} is neither an nn.Module subclass nor a function annotated to return one "
            f"(-> nn.Module); kml calls nothing else"
        )
    return target


def network_model(config: LearnerConfig) -> nn.Module:
    """The network ``config.network`` names, built with ``config.network_args`` and modulated as
    ``config.modulation`` says (kml's task encoder drives KML or FiLM on it)."""
    assert config.network is not None
    network = resolve_network(config.network)(**(config.network_args or {}))
    if not isinstance(network, nn.Module):
        raise KMLError(f"network {config.network!r} returned {type(network).__name__}, not an nn.Module")
    if config.modulation == "none":
        return network
    return modulate(
        network,
        config.modulation,
        in_channels=config.in_channels,
        encoder_channels=config.encoder_channels,
        encoder_hidden=config.encoder_hidden,
        form=config.kml_form,
        factor_split=config.factor_split,
        identity_init=config.identity_init,
    )


class TaskModel(TaskConditionedModel):
    """Backbone (+ MAML head) with an optional task encoder and modulation generator.

    Submodules: ``backbone`` (adapted in MAML's inner loop), ``encoder`` and
    ``generator`` (``None`` for ``modulation="none"``; updated by the outer loop only),
    (Meta-SGD's learned rates belong to the method: :class:`kml.algorithms.maml.MAML`.)
    """

    def __init__(self, config: LearnerConfig) -> None:
        super().__init__()
        ways = config.ways if config.algorithm == "maml" else None
        self.backbone: nn.Module
        if config.backbone == "resnet12":  # an ordinary module whose convs (KML) or norms (FiLM) take the modulation
            resnet = ResNet12(
                config.in_channels,
                resnet12_widths(config.base_channels),
                ways,
                config.head,
                config.image_size,
                config.batchnorm_affine,
            )
            self.backbone = ModulatedNetwork(resnet, config.modulation)
        else:
            self.backbone = Backbone(
                config.in_channels,
                config.base_channels,
                config.image_size,
                config.backbone,
                ways,
                config.head,
                config.batchnorm_affine,
            )
        self.backbone.fused_norm = config.algorithm == "protonet" or config.first_order  # no second derivatives
        self.encoder: TaskEncoder | None = None
        self.generator: nn.Module | None = None
        if config.modulation != "none":
            default_init = config.init == "pytorch"
            self.encoder = TaskEncoder(
                config.in_channels,
                config.encoder_channels,
                config.ways if config.encoder_uses_labels else None,
                config.encoder_hidden,
                default_init,
            )
            if config.modulation == "kml":
                self.generator = KMLGenerator(
                    self.encoder.embedding_dim,
                    self.backbone.conv_shapes,
                    config.kml_form,
                    config.factor_split,
                    config.identity_init,
                    default_init,
                    bias_after_norm=config.kml_bias == "after_norm",
                )
            else:
                self.generator = FiLMGenerator(self.encoder.embedding_dim, self.backbone.channels, config.identity_init)
