"""Keep freed activation memory in the process (glibc), so a step does not page-fault its tensors in again."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_tuned = False


def tune_cpu_allocator() -> bool:
    """Serve large allocations from the heap and never give it back to the OS.

    glibc serves every allocation above 32 MiB with a fresh ``mmap`` and unmaps it on free, so each
    large activation of a step is page-faulted in again: on a 2-core VM an add of two
    ``[75, 320, 42, 42]`` float tensors took 51 ms instead of 14 (benchmarks/README.md). With mmap
    off and trimming off (``M_TRIM_THRESHOLD = -1``), freed blocks stay mapped and later steps mostly
    reuse them: page faults per training step fell about 10x in our measurement (not to zero: glibc's
    best-fit splits free blocks, so a given large block is not always reused; jemalloc or tcmalloc,
    preloaded, would do better still). Applies to the main heap, where torch's CPU tensors of the
    main thread live; other threads' arenas still map their largest blocks.

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
