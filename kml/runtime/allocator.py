"""Keep freed activation memory in the process (glibc), so a step does not page-fault its tensors in again."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_cpu_allocator"]

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_tuned = False


def tune_cpu_allocator() -> bool:
    """Serve large allocations from the heap and never give it back to the OS.

    glibc serves every allocation above 32 MiB with a fresh ``mmap`` and unmaps it on free, so each
    large activation of a step is page-faulted in again, which costs more than the arithmetic on it. With
    mmap off and trimming off (``M_TRIM_THRESHOLD = -1``), freed blocks stay mapped and later steps mostly
    reuse them (not always: glibc's best-fit splits free blocks; jemalloc or tcmalloc, preloaded, would do
    better still); the figures are in benchmarks/README.md, "Design measurements". Applies to the main
    heap, where torch's CPU tensors of the main thread live; other threads' arenas still map their largest
    blocks.

    The cost: the process keeps its peak resident memory until it exits, and the setting cannot be
    undone. So only the command-line entry points and the benchmark scripts call it, at the start of
    their ``main`` (calling one of those in-process, as the tests do, tunes the caller's process);
    importing kml never does. Returns whether it applied: Linux with glibc and ``KML_MALLOC`` not set
    to ``system``.
    """
    global _tuned
    if _tuned:
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
    _tuned = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))
    return _tuned
