"""Meta-training: :class:`Trainer` (the loop, whose settings are a :class:`RunConfig`'s), kml-train's launch policy
(:mod:`kml.training.launch`) and checkpoints.

The names below load on first use, so importing a submodule (``kml.training.run_lock``) stays light.
"""

from __future__ import annotations

from kml._lazy import lazy_exports

_EXPORTS = {
    "Trainer": "kml.training.trainer",
    "RunConfig": "kml.config.run",
    "load_checkpoint": "kml.training.checkpoint",
    "save_checkpoint": "kml.training.checkpoint",
}
__all__ = list(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
