"""Meta-training: :class:`Trainer` (the loop), :class:`LoopSettings`, :class:`RunConfig` and checkpoints.

The names below load on first use, so importing a submodule (``kml.training.run_lock``) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Trainer": "kml.training.trainer",
    "LoopSettings": "kml.training.trainer",
    "RunConfig": "kml.training.run_config",
    "load_checkpoint": "kml.training.checkpoint",
    "save_checkpoint": "kml.training.checkpoint",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kml.training' has no attribute {name!r}")
