"""Models: the conv backbone, the task encoder and the modulation generators (KML, FiLM)."""

from kml.models.backbone import Backbone, Modulation, block_channels, output_side
from kml.models.encoder import TaskEncoder
from kml.models.modulation import FiLMGenerator, KMLGenerator, factor_shape, film_as_kml, kernel_factor
from kml.models.task_model import TaskModel

__all__ = [
    "Backbone",
    "FiLMGenerator",
    "KMLGenerator",
    "Modulation",
    "TaskEncoder",
    "TaskModel",
    "block_channels",
    "factor_shape",
    "film_as_kml",
    "kernel_factor",
    "output_side",
]
