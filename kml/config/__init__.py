"""Configuration: the learner's settings, the run's settings, the published recipes, and their checks.

* :mod:`kml.config.learner`: :class:`LearnerConfig`, the method and network (saved with every checkpoint);
* :mod:`kml.config.run`: :class:`RunConfig`, a training run (``config.json`` in a run folder);
* :mod:`kml.config.recipes`: each published method's complete settings (``kml-train --recipe NAME``);
* :mod:`kml.config.checks`: every setting a user types, checked once (messages name fields in Python, flags
  on a command line);
* :mod:`kml.config.data_checks`: a published recipe's data, checked against the caches a new run opens.

``RunConfig`` and the recipes load on first use, so ``import kml.config`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kml._lazy import lazy_exports
from kml.config.learner import (
    ALGORITHMS,
    BACKBONES,
    FIELD_CHOICES,
    MODULATIONS,
    RENAMED_FIELDS,
    LearnerConfig,
    upgrade_field_names,
)

_LAZY = {
    "RunConfig": "kml.config.run",
    "learning_rate_at": "kml.config.run",
    "Recipe": "kml.config.recipes",
    "RECIPES": "kml.config.recipes",
    "recipe": "kml.config.recipes",
    "recipe_values": "kml.config.recipes",
}

__all__ = [
    "ALGORITHMS",
    "BACKBONES",
    "FIELD_CHOICES",
    "MODULATIONS",
    "RENAMED_FIELDS",
    "LearnerConfig",
    "upgrade_field_names",
    *sorted(_LAZY),
]

if TYPE_CHECKING:
    from kml.config.recipes import RECIPES, Recipe, recipe, recipe_values
    from kml.config.run import RunConfig, learning_rate_at

__getattr__ = lazy_exports(__name__, _LAZY, globals())
