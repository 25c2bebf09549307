"""How the process runs its arithmetic: bf16 autocast where the hardware has it, and the CPU allocator.

Both are process settings, not part of a learner: a checkpoint does not record them, so a run
trained under bf16 evaluates in float32 wherever bf16 is not native.
"""

from kml.runtime.allocator import tune_cpu_allocator
from kml.runtime.precision import autocast, bf16_native, check_bf16, float32_inner_loop

__all__ = ["autocast", "bf16_native", "check_bf16", "float32_inner_loop", "tune_cpu_allocator"]
