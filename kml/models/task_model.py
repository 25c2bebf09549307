"""The per-task model: task encoder -> modulation generator -> modulated backbone (-> head)."""

from __future__ import annotations

import torch
from torch import nn

from kml.config.learner import LearnerConfig
from kml.models.backbone import Backbone
from kml.models.encoder import TaskEncoder
from kml.models.modulate import ModulatedNetwork, TaskConditionedModel
from kml.models.modulation import FiLMGenerator, KMLGenerator
from kml.models.resnet12 import ResNet12, resnet12_widths

__all__ = ["rate_key", "TaskModel"]


def rate_key(name: str) -> str:
    """Meta-SGD rate key of a backbone parameter name (``ParameterDict`` keys cannot hold dots)."""
    return name.replace(".", "__")


class TaskModel(TaskConditionedModel):
    """Backbone (+ MAML head) with an optional task encoder and modulation generator.

    Submodules: ``backbone`` (adapted in MAML's inner loop), ``encoder`` and
    ``generator`` (``None`` for ``modulation="none"``; updated by the outer loop only),
    ``inner_rates`` (Meta-SGD: one learned inner rate per backbone parameter element,
    keyed by the parameter's name with ``.`` written ``__``; ``None`` otherwise).
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
        self.inner_rates: nn.ParameterDict | None = None
        if config.meta_sgd and config.algorithm == "maml":
            self.inner_rates = nn.ParameterDict(
                {
                    rate_key(name): nn.Parameter(torch.full_like(p, config.inner_lr))
                    for name, p in self.backbone.named_parameters()
                }
            )
