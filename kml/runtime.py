"""How the process runs its arithmetic: bf16 autocast where the hardware has it, and the CPU allocator.

Both are process settings, not part of a learner: a checkpoint trained with bf16 evaluates
in float32 and the other way round.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from contextlib import AbstractContextManager, nullcontext

import torch

from kml.errors import KMLError

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_allocator_tuned = False


def tune_cpu_allocator() -> bool:
    """Keep freed activation memory in the process for reuse, instead of returning it to the OS.

    glibc serves every allocation above 32 MiB with a fresh ``mmap`` and unmaps it on free, so each
    large activation of a step is page-faulted in again: on a 2-core VM an add of two
    ``[75, 320, 42, 42]`` float tensors took 51 ms instead of 14 (benchmarks/README.md). Serving them from the
    heap and never trimming it makes the next step reuse the same pages (the effect jemalloc or
    tcmalloc give, without preloading one). The resident size then stays at the run's peak.
    Returns whether it applied: Linux with glibc, and ``KML_MALLOC`` not set to ``system``.
    Called by the command-line entry points and the benchmarks, never on import.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("KML_MALLOC", "").lower() == "system":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; if the heap cannot grow, glibc still falls back to mmap.
    _allocator_tuned = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _allocator_tuned


def bf16_native(device: str | torch.device) -> bool:
    """Whether ``device`` computes bf16 matrix products natively (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def check_bf16(device: str | torch.device) -> None:
    """One-line error when bf16 autocast is asked for on a device that would only emulate it (slower, not faster)."""
    if not bf16_native(device):
        raise KMLError(
            f"--bf16 needs bf16 arithmetic in hardware (a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX); "
            f"{torch.device(device)} would emulate it and run slower; drop --bf16"
        )


def autocast(device: str | torch.device, bf16: bool) -> AbstractContextManager:
    """bf16 autocast on ``device`` when ``bf16``, else nothing.

    Convolutions and matrix products run in bf16 and BatchNorm on bf16 activations (accumulating
    in float32); losses, prototype distances (:func:`kml.algorithms.losses.squared_distances`) and
    accuracies are float32, and the parameters and optimiser state are float32 throughout.
    """
    if not bf16:
        return nullcontext()
    return torch.autocast(torch.device(device).type, torch.bfloat16)
