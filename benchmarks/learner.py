"""One meta-training step of the learner: the batched path vs the per-task reference loop.

A step is forward, inner loop, outer backward and Adam step on one meta-batch
already on the device (sampling is benchmarked by sampler.py). Published setup:
5-way 1-shot, 15 queries, 84x84x3, meta-batch 10, 32 base channels, 5 inner
steps (MAML). Prints tasks/s and peak memory of each path and the ratio. With
``--bf16`` the reference loop is measured twice: in float32 (the obvious
implementation, as the published code runs) and under the same bf16 autocast
(the effect of batching alone).

    python benchmarks/learner.py                       # published setup, CPU, float32
    python benchmarks/learner.py --bf16                # bf16 autocast (AMX CPU or CUDA)
    python benchmarks/learner.py --device cuda --bf16
    python benchmarks/learner.py --smoke               # tiny, for CI
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from common import (
    add_setup_arguments,
    add_timing_arguments,
    outer_step,
    peak_memory_mib,
    random_episode,
    seconds_per_step,
    smoke_sized,
)

from kml.algorithms import build_learner
from kml.config import LearnerConfig
from kml.runtime import check_bf16, tune_cpu_allocator

METHODS = {
    "kml-maml": dict(algorithm="maml", modulation="kml"),
    "kml-protonet": dict(algorithm="protonet", modulation="kml"),
}


def measure(method: str, path: str, bf16: bool, args) -> tuple[float, float]:
    """(tasks/s, peak MiB) of ``path`` ("batched" or "reference") for ``method``."""
    torch.manual_seed(0)
    baseline = peak_memory_mib("cpu")  # what importing torch costs, not this configuration
    config = LearnerConfig(
        ways=args.ways,
        image_size=args.side,
        base_channels=args.channels,
        encoder_channels=args.channels,
        inner_steps=args.inner_steps,
        **METHODS[method],
    )
    learner = build_learner(config).to(args.device).train()
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    episode = random_episode(args.meta_batch, args.ways, args.shots, args.queries, args.side, args.device, modes=3)
    forward = learner if path == "batched" else learner.reference_forward
    step = outer_step(forward, episode, optimizer, args.device, bf16)
    seconds = seconds_per_step(step, args.steps, args.warmup, args.device)
    return args.meta_batch / seconds, peak_memory_mib(args.device, baseline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_arguments(parser)
    add_timing_arguments(parser, steps=5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "PATH", "BF16"), help=argparse.SUPPRESS)
    args = smoke_sized(parser.parse_args())
    tuned = tune_cpu_allocator()
    if args.one:  # child process: one measurement, so the CPU peak memory is this configuration's own
        method, path, bf16 = args.one
        print(json.dumps(measure(method, path, bf16 == "bf16", args)))
        return
    if args.bf16:
        check_bf16(args.device)
    print(
        f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"{args.ways}w{args.shots}s{args.queries}q side={args.side} meta-batch={args.meta_batch} "
        f"channels={args.channels} inner-steps={args.inner_steps} bf16={args.bf16} allocator-tuned={tuned}"
    )
    print(f"{'method':<14}{'path':<11}{'precision':<11}{'tasks/s':>10}{'ms/step':>10}{'peak MiB':>10}")
    precision = "bf16" if args.bf16 else "fp32"
    runs = [("reference", "fp32"), *([("reference", "bf16")] if args.bf16 else []), ("batched", precision)]
    for method in args.methods:
        figures = {}
        for path, dtype in runs:
            child = [
                sys.executable,
                __file__,
                *[a for a in sys.argv[1:] if a != "--bf16"],
                "--one",
                method,
                path,
                dtype,
            ]
            result = subprocess.run(child, capture_output=True, text=True)
            if result.returncode:
                sys.exit(f"error: {method} {path} {dtype}: {(result.stderr.strip().splitlines() or ['failed'])[-1]}")
            rate, memory = json.loads(result.stdout.splitlines()[-1])
            figures[path, dtype] = rate
            print(
                f"{method:<14}{path:<11}{dtype:<11}{rate:>10.2f}{1000 * args.meta_batch / rate:>10.1f}{memory:>10.0f}",
                flush=True,
            )
        batched = figures["batched", precision]
        print(
            f"{method:<14}ratio      {batched / figures['reference', 'fp32']:>10.2f}x  (batched {precision} / reference fp32)"
        )
        if args.bf16:
            print(
                f"{method:<14}ratio      {batched / figures['reference', 'bf16']:>10.2f}x  (batched / reference, both bf16)"
            )


if __name__ == "__main__":
    main()
