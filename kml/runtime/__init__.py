"""How the process runs its arithmetic: threads, bf16 autocast where the hardware has it, and the CPU allocator.

These are process settings, not part of a learner: a checkpoint does not record them, so a run
trained under bf16 evaluates in float32 wherever bf16 is not native. Importing this package does
not import torch (:func:`configure_threads` must run before torch loads its OpenMP runtime).
"""

from __future__ import annotations

from kml._lazy import lazy_exports
from kml.runtime.threads import configure_threads

_LAZY = {
    "autocast": "kml.runtime.precision",
    "bf16_native": "kml.runtime.precision",
    "check_bf16": "kml.runtime.precision",
    "float32_inner_loop": "kml.runtime.precision",
    "tune_cpu_allocator": "kml.runtime.allocator",
}

__all__ = ["autocast", "bf16_native", "check_bf16", "configure_threads", "float32_inner_loop", "tune_cpu_allocator"]


__getattr__ = lazy_exports(__name__, _LAZY, globals())
