"""Peak memory and step time of second-order MAML as the meta-batch and inner steps grow, with and without
task chunking (``--task-chunk``) and inner-loop activation checkpointing (``--activation-checkpointing``).

Each configuration runs in its own process (a KML+MAML meta-training step: chunked forward/backward as
kml-train runs it, then Adam), so the CPU figure is that configuration's resident high-water mark above
the process's baseline after importing torch; on CUDA it is ``torch.cuda.max_memory_allocated``.

    python benchmarks/memory.py                                   # 84 px, meta-batch 5/10/20, 1 and 5 inner steps
    python benchmarks/memory.py --device cuda --meta-batches 10 20 40 80
    python benchmarks/memory.py --smoke
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from common import add_setup_arguments, peak_memory_mib, random_episode, seconds_per_step

from kml.algorithms import build_learner
from kml.algorithms.chunking import accumulate_meta_gradient
from kml.config import LearnerConfig
from kml.runtime import autocast, tune_cpu_allocator

VARIANTS = {"plain": (None, False), "chunked": ("chunk", False), "checkpointed": (None, True), "both": ("chunk", True)}


def measure(meta_batch: int, inner_steps: int, chunk: int | None, checkpointing: bool, args) -> tuple[float, float]:
    """(seconds per step, peak MiB) of one configuration, in this process."""
    torch.manual_seed(0)
    baseline = peak_memory_mib("cpu")
    config = LearnerConfig(
        ways=args.ways,
        image_size=args.side,
        base_channels=args.channels,
        encoder_channels=args.channels,
        inner_steps=inner_steps,
    )
    learner = build_learner(config).to(args.device).train()
    learner.activation_checkpointing = checkpointing
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    episode = random_episode(meta_batch, args.ways, args.shots, args.queries, args.side, args.device, modes=3)

    def forward(chunk_episode):
        with autocast(args.device, args.bf16):
            return learner(chunk_episode)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        accumulate_meta_gradient(forward, episode, chunk)
        optimizer.step()

    return seconds_per_step(step, args.steps, 1, args.device), peak_memory_mib(args.device, baseline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_arguments(parser)
    parser.add_argument("--meta-batches", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--inner-step-counts", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--chunk", type=int, default=5, help="tasks per chunk of the chunked variants")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    parser.add_argument("--smoke", action="store_true", help="tiny configuration for CI (figures meaningless)")
    parser.add_argument(
        "--one", nargs=4, type=int, metavar=("META_BATCH", "INNER", "CHUNK", "CKPT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.smoke:
        args.side, args.channels, args.queries, args.meta_batches, args.inner_step_counts, args.chunk, args.steps = (
            16,
            4,
            2,
            [4],
            [2],
            2,
            1,
        )
    tune_cpu_allocator()
    if args.one:
        meta_batch, inner, chunk, checkpointing = args.one
        print(json.dumps(measure(meta_batch, inner, chunk or None, bool(checkpointing), args)))
        return
    memory = "CUDA peak allocated" if args.device.startswith("cuda") else "CPU peak RSS"
    print(
        f"device={args.device} KML+MAML second order {args.ways}w{args.shots}s{args.queries}q side={args.side} "
        f"channels={args.channels} chunk={args.chunk} bf16={args.bf16} memory={memory}"
    )
    print(f"{'meta-batch':>10}{'inner':>6}  {'variant':<13}{'s/step':>9}{'peak MiB':>10}{'memory':>8}{'time':>7}")
    for meta_batch in args.meta_batches:
        for inner in args.inner_step_counts:
            plain = None
            for variant in args.variants:
                chunk, checkpointing = VARIANTS[variant]
                chunk = args.chunk if chunk else 0
                child = [
                    sys.executable,
                    __file__,
                    *sys.argv[1:],
                    "--one",
                    str(meta_batch),
                    str(inner),
                    str(chunk),
                    str(int(checkpointing)),
                ]
                done = subprocess.run(child, capture_output=True, text=True)
                if done.returncode:
                    print(
                        f"{meta_batch:>10}{inner:>6}  {variant:<13}  failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
                    )
                    continue
                seconds, peak = json.loads(done.stdout.splitlines()[-1])
                plain = plain or (seconds, peak)
                print(
                    f"{meta_batch:>10}{inner:>6}  {variant:<13}{seconds:>9.3f}{peak:>10.0f}"
                    f"{peak / max(plain[1], 1e-9):>7.2f}x{seconds / plain[0]:>6.2f}x",
                    flush=True,
                )


if __name__ == "__main__":
    main()
