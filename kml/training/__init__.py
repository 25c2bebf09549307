"""Meta-training: :class:`Trainer` (the loop), :class:`LoopSettings`, :class:`RunConfig` and checkpoints.

The names below load on first use, so importing a submodule (``kml.training.run_lock``) stays light.
"""

from __future__ import annotations

from kml._lazy import lazy_exports

_EXPORTS = {
    "Trainer": "kml.training.trainer",
    "LoopSettings": "kml.training.trainer",
    "RunConfig": "kml.config.run",
    "load_checkpoint": "kml.training.checkpoint",
    "save_checkpoint": "kml.training.checkpoint",
}
__all__ = list(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
