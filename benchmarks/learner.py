"""One meta-training step of the learner: the batched path vs the per-task reference loop.

A step is forward, inner loop, outer backward and Adam step on one meta-batch
already on the device (sampling is benchmarked by sampler.py). Published setup:
5-way 1-shot, 15 queries, 84x84x3, meta-batch 10, 32 base channels, 5 inner
steps (MAML). Prints tasks/s, the step's FLOPs (kml.runtime.flops: grouped-convolution
weight gradients counted right) and achieved GFLOP/s, the attainable GFLOP/s of the step's own
convolutions on this machine (ceiling.py) and the % of it reached, peak memory, and the ratio. With
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
from ceiling import attainable_gflops
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
from kml.runtime.flops import count_flops

# kml's network with each modulation; the MAML family adapts the backbone, the ProtoNet family does not
METHODS = {
    "maml": dict(algorithm="maml", modulation="none"),
    "film-maml": dict(algorithm="maml", modulation="film"),
    "kml-maml": dict(algorithm="maml", modulation="kml"),
    "protonet": dict(algorithm="protonet", modulation="none"),
    "film-protonet": dict(algorithm="protonet", modulation="film"),
    "kml-protonet": dict(algorithm="protonet", modulation="kml"),
}
DEFAULT_METHODS = ["kml-maml", "kml-protonet"]


def measure(method: str, path: str, bf16: bool, args) -> dict[str, float]:
    """Tasks/s, peak MiB, GFLOP per step and (batched path) attainable GFLOP/s of ``path`` for ``method``."""
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
    figures = {"tasks_per_s": args.meta_batch / seconds, "peak_mib": peak_memory_mib(args.device, baseline)}
    if path == "batched":  # after timing: counting and the ceiling allocate memory of their own
        work = count_flops(step)
        dtype = torch.bfloat16 if bf16 else torch.float32
        figures["gflop"] = work.total / 1e9
        figures["attainable"] = attainable_gflops(work.convolutions, dtype, args.device)[0]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_arguments(parser)
    add_timing_arguments(parser, steps=5)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
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
    header = ["tasks/s", "ms/step", "GFLOP", "GFLOP/s", "attain.", "% att.", "peak MiB"]
    print(f"{'method':<14}{'path':<11}{'precision':<11}" + "".join(f"{h:>10}" for h in header))
    precision = "bf16" if args.bf16 else "fp32"
    # the batched path first: its FLOP count and ceiling are printed beside the reference loop's timings too
    runs = [("batched", precision), ("reference", "fp32"), *([("reference", "bf16")] if args.bf16 else [])]
    for method in args.methods:
        figures: dict[tuple[str, str], float] = {}
        work = attainable = float("nan")
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
            measured = json.loads(result.stdout.splitlines()[-1])
            rate = figures[path, dtype] = measured["tasks_per_s"]
            work = measured.get("gflop", work)  # the batched step's count stands for the work of both paths
            achieved = work * rate / args.meta_batch
            attainable = measured.get("attainable", attainable)
            print(
                f"{method:<14}{path:<11}{dtype:<11}{rate:>10.2f}{1000 * args.meta_batch / rate:>10.1f}"
                f"{work:>10.1f}{achieved:>10.1f}{attainable:>10.1f}{100 * achieved / attainable:>9.0f}%"
                f"{measured['peak_mib']:>10.0f}",
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
