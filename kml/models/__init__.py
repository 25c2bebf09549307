"""Models: backbones (the 4-block conv nets, ResNet-12), the task encoder, the modulation generators
(KML, FiLM) and :func:`modulate`, which puts KML or FiLM on any CNN."""

from kml.models.backbone import Backbone, Modulation, block_channels, output_side
from kml.models.encoder import TaskEncoder
from kml.models.modulate import ModulatedModel, ModulatedNetwork, TaskConditionedModel, modulate
from kml.models.modulation import FiLMGenerator, KMLGenerator, factor_shape, film_as_kml, kernel_factor
from kml.models.resnet12 import ResNet12, resnet12_widths
from kml.models.task_model import TaskModel

__all__ = [
    "Backbone",
    "FiLMGenerator",
    "KMLGenerator",
    "Modulation",
    "ModulatedModel",
    "ModulatedNetwork",
    "ResNet12",
    "TaskConditionedModel",
    "TaskEncoder",
    "TaskModel",
    "block_channels",
    "factor_shape",
    "film_as_kml",
    "kernel_factor",
    "modulate",
    "output_side",
    "resnet12_widths",
]
