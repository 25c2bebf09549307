"""One meta-training step of the learner: the batched (vmap) path vs the per-task reference loop.

A step is forward, inner loop, outer backward and Adam step on one meta-batch
already on the device (sampling is benchmarked by sampler.py). Published setup:
5-way 1-shot, 15 queries, 84x84x3, meta-batch 10, 32 base channels, 5 inner
steps (MAML). Prints tasks/s and peak memory of each path and the ratio.

    python benchmarks/learner.py                       # published setup, CPU
    python benchmarks/learner.py --device cuda --bf16
    python benchmarks/learner.py --smoke               # tiny, for CI
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from common import add_setup_arguments, peak_memory_mib, random_episode, synchronize

from kml.algorithms import build_learner
from kml.config import LearnerConfig

METHODS = {"kml-maml": dict(algorithm="maml", model="kml"), "kml-protonet": dict(algorithm="protonet", model="kml")}


def measure(method: str, path: str, args) -> tuple[float, float]:
    """(tasks/s, peak MiB) of ``path`` ("batched" or "reference") for ``method``."""
    torch.manual_seed(0)
    baseline = peak_memory_mib("cpu")  # what importing torch costs, not this configuration
    config = LearnerConfig(ways=args.ways, image_size=args.side, base_channels=args.channels, encoder_channels=args.channels,
                           inner_steps=args.inner_steps, **METHODS[method])
    learner = build_learner(config).to(args.device).train()
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    episode = random_episode(args.meta_batch, args.ways, args.shots, args.queries, args.side, args.device, modes=3)
    forward = learner if path == "batched" else learner.reference_forward
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=args.bf16 and args.device.startswith("cuda"))

    def step() -> None:
        with autocast:
            loss = forward(episode).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    synchronize(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(args.device)
    seconds = time.perf_counter() - start
    return args.steps * args.meta_batch / seconds, peak_memory_mib(args.device, baseline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_arguments(parser)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny configuration for CI (figures meaningless)")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.side, args.channels, args.queries, args.meta_batch, args.inner_steps, args.steps = 16, 4, 2, 2, 1, 1
    if args.one:  # child process: one measurement, so the CPU peak memory is this configuration's own
        print(json.dumps(measure(*args.one, args)))
        return
    torch.set_num_threads(torch.get_num_threads())
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"{args.ways}w{args.shots}s{args.queries}q side={args.side} meta-batch={args.meta_batch} "
          f"channels={args.channels} inner-steps={args.inner_steps} bf16={args.bf16}")
    print(f"{'method':<14}{'path':<11}{'tasks/s':>10}{'ms/step':>10}{'peak MiB':>10}")
    for method in args.methods:
        figures = {}
        for path in ("reference", "batched"):
            child = [sys.executable, __file__, *sys.argv[1:], "--one", method, path]
            rate, memory = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            figures[path] = rate
            print(f"{method:<14}{path:<11}{rate:>10.2f}{1000 * args.meta_batch / rate:>10.1f}{memory:>10.0f}", flush=True)
        print(f"{method:<14}{'ratio':<11}{figures['batched'] / figures['reference']:>10.2f}x  (batched / reference)")


if __name__ == "__main__":
    main()
