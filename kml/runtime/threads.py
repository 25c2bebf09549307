"""How many CPU threads a kml process uses, and how long they spin while waiting for work.

torch's CPU kernels run on an OpenMP thread pool (libgomp). Between parallel regions its idle
threads busy-wait for up to ``GOMP_SPINCOUNT`` iterations before sleeping. Alone on a machine that
is what makes MAML's long chain of small operations fast; next to another CPU-heavy process the
spinning threads of one steal the cores the other needs at every region, and both slow down many
times over (benchmarks/shared_cpu.py and benchmarks/README.md have the figures). kml's entry points
therefore start with :func:`configure_threads`, which sets a short spin (by CPU vendor: a spin is counted in
iterations, and the count that shares the cores fairly without slowing a process alone was measured per CPU
type) and a thread count from the CPUs this process may run on, before torch starts its pool.

``KML_THREADS=torch`` leaves everything as torch and OpenMP would set it; ``KML_NUM_THREADS=N`` sets
the thread count; ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` set by the user are kept.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

__all__ = [
    "available_cpus",
    "configure_threads",
    "cpu_vendor",
    "SPIN_COUNT",
    "SPIN_COUNTS",
    "spin_count",
    "thread_count",
]

# Spins before an idle libgomp thread sleeps (the libgomp default is 300000), by the vendor id of /proc/cpuinfo:
# chosen by measurement in benchmarks/shared_cpu.py (benchmarks/README.md, "Sharing the CPU").
SPIN_COUNTS = {"GenuineIntel": 3000, "AuthenticAMD": 1500}
# Any other CPU: the count measured first (Intel).
SPIN_COUNT = 3000


def cpu_vendor(cpuinfo: str | None = None) -> str:
    """The CPU's vendor id (``"GenuineIntel"``, ``"AuthenticAMD"``) from ``/proc/cpuinfo``; ``""`` where unknown."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
                cpuinfo = file.read(65536)
        except OSError:  # not Linux
            return ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id":
            return value.strip()
    return ""


def spin_count(vendor: str | None = None) -> int:
    """The ``GOMP_SPINCOUNT`` kml sets on a CPU of ``vendor`` (default: this machine's)."""
    return SPIN_COUNTS.get(cpu_vendor() if vendor is None else vendor, SPIN_COUNT)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def thread_count(environ: MutableMapping[str, str] | None = None, cpus: int | None = None) -> int:
    """Threads per process: ``KML_NUM_THREADS``, else the available CPUs shared among the local torchrun ranks.

    Under torchrun (``LOCAL_WORLD_SIZE`` set) each of the R ranks on a machine gets ``cpus // R`` threads
    (at least one); torchrun's own default of ``OMP_NUM_THREADS=1`` would leave the other cores idle.
    Alone, a user's ``OMP_NUM_THREADS`` is kept.
    """
    environ = os.environ if environ is None else environ
    cpus = available_cpus() if cpus is None else cpus
    if environ.get("KML_NUM_THREADS"):
        return max(1, int(environ["KML_NUM_THREADS"]))
    local_ranks = int(environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if local_ranks > 1:
        return max(1, cpus // local_ranks)
    if environ.get("OMP_NUM_THREADS", "").isdigit() and int(environ["OMP_NUM_THREADS"]) > 0:
        return int(environ["OMP_NUM_THREADS"])
    return cpus


def configure_threads(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set kml's thread and wait policy in ``environ`` (default: this process) and return what it set.

    Call it before ``import torch``: libgomp reads its variables when torch loads it. If torch is
    already imported (kml-train called from Python), only the thread count takes effect.
    ``KML_THREADS=torch`` turns it off (returns ``{}``).
    """
    environ = os.environ if environ is None else environ
    if environ.get("KML_THREADS", "").lower() == "torch":
        return {}
    threads = str(thread_count(environ))
    chosen = {"OMP_NUM_THREADS": threads}
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        chosen["GOMP_SPINCOUNT"] = str(spin_count())
    environ.update(chosen)
    if environ is os.environ and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))
    return chosen
