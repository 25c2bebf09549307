"""Pieces the benchmark scripts share: the published setup's flags, a random meta-batch, timing and memory helpers."""

from __future__ import annotations

import argparse
import resource
import time

from kml.runtime import configure_threads

# Every script imports this module before torch: kml's thread policy, as kml's entry points set it
# (KML_THREADS=torch measures with torch's and OpenMP's defaults instead).
configure_threads()

import torch  # noqa: E402

from kml.data.episode import Episode  # noqa: E402

# Every benchmark's main() calls kml.runtime.tune_cpu_allocator() first, as kml-train does
# (KML_MALLOC=system measures without it).
BF16_HELP = "bf16 autocast for kml (CUDA from Ampere on, or a CPU with AVX512-BF16/AMX)"


def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    """The published setup as flags: 5-way 1-shot 15-query, 84x84x3, meta-batch 10, 32 channels, 5 inner steps."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--side", type=int, default=84)
    parser.add_argument("--meta-batch", type=int, default=10)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--inner-steps", type=int, default=5, help="MAML inner steps")
    parser.add_argument("--bf16", action="store_true", help=BF16_HELP)


def add_timing_arguments(parser: argparse.ArgumentParser, steps: int = 5) -> None:
    """``--steps`` (timed), ``--warmup`` (untimed) and ``--smoke`` (see :func:`smoke_sized`)."""
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--smoke", action="store_true", help="tiny configuration for CI (figures meaningless)")


def smoke_sized(args: argparse.Namespace) -> argparse.Namespace:
    """With ``--smoke``, the setup shrunk to a CI-sized one (16 px, 4 channels, 2 tasks, 1 inner and 1 timed step)."""
    if args.smoke:
        args.side, args.channels, args.queries, args.meta_batch, args.inner_steps, args.steps = 16, 4, 2, 2, 1, 1
    return args


def random_episode(tasks: int, ways: int, shots: int, queries: int, side: int, device: str, modes: int = 1) -> Episode:
    """A meta-batch of random images with the right shapes and labels (speed does not depend on pixels).

    Task t belongs to mode ``t % modes``. Shapes: ``support_x [tasks, ways*shots, 3, side, side]``,
    ``query_x [tasks, ways*queries, 3, side, side]``.
    """
    g = torch.Generator().manual_seed(0)

    def labels(per_class: int) -> torch.Tensor:
        return torch.arange(ways).repeat_interleave(per_class).expand(tasks, -1).contiguous()

    episode = Episode(
        support_x=torch.rand(tasks, ways * shots, 3, side, side, generator=g),
        support_y=labels(shots),
        query_x=torch.rand(tasks, ways * queries, 3, side, side, generator=g),
        query_y=labels(queries),
        mode=torch.arange(tasks) % modes,
        classes=torch.arange(ways).expand(tasks, -1).contiguous(),
        mode_names=tuple(f"mode{m}" for m in range(modes)),
    )
    return episode.to(device)


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so that wall-clock timings include it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_mib(device: str, baseline: float = 0.0) -> float:
    """Peak device memory (CUDA) or the process's resident high-water mark above ``baseline`` (CPU)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline


def outer_step(forward, episode: Episode, optimizer: torch.optim.Optimizer, device: str, bf16: bool = False):
    """A closure running one outer step: ``forward(episode).loss`` (under bf16 autocast if asked), its backward
    and the optimiser step."""
    from kml.runtime import autocast

    def step() -> None:
        with autocast(device, bf16):
            loss = forward(episode).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def seconds_per_step(step, steps: int, warmup: int, device: str) -> float:
    """Run ``step()`` ``warmup`` times untimed, reset CUDA's peak memory, then time ``steps`` calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps
