"""kml: multimodal few-shot meta-learning with Kernel ModuLation.

Import is kept light: heavy optional libraries (matplotlib, pandas,
torchvision) are only imported by the modules that need them.
"""

from kml.errors import KMLError

__version__ = "0.1.0"

__all__ = ["KMLError", "__version__"]
