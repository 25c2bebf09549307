"""What kml's fast special case buys: the generic learners (any module, vmap) vs the packed path, one network.

The same task model (kml's published 4-block backbone with KML, built from one LearnerConfig) is trained by
``kml.build_learner`` (task-packed layout: grouped convolutions, one fused BatchNorm) and by ``kml.MAML`` /
``kml.ProtoNet`` over that model (``torch.func.vmap`` over tasks, as for a user's network). A step is forward,
inner loop, outer backward and Adam step on one meta-batch already on the device. Prints tasks/s of each path
and the ratio; ``--paths packed generic resnet12`` adds ResNet-12 (64-160-320-640 at 32 channels; vmap only).

    python benchmarks/generic_learner.py                 # published setup (84 px, 32 channels), CPU
    python benchmarks/generic_learner.py --side 32 --channels 16 --queries 10    # the CPU-sized setup
    python benchmarks/generic_learner.py --device cuda
    python benchmarks/generic_learner.py --smoke         # tiny, for CI
"""

from __future__ import annotations

import argparse

import torch
from common import add_setup_arguments, add_timing_arguments, outer_step, random_episode, seconds_per_step, smoke_sized

import kml
from kml.config import LearnerConfig
from kml.runtime import check_bf16, tune_cpu_allocator

METHODS = {
    "kml-maml": dict(algorithm="maml", modulation="kml"),
    "kml-protonet": dict(algorithm="protonet", modulation="kml"),
}


def build(method: str, path: str, args) -> torch.nn.Module:
    """The learner of ``path``: ``packed`` (kml.build_learner), ``generic`` (kml.MAML/ProtoNet over the same
    task model) or ``resnet12`` (kml.build_learner with the ResNet-12 backbone, the vmap path)."""
    config = LearnerConfig(
        ways=args.ways,
        image_size=args.side,
        base_channels=args.channels,
        encoder_channels=args.channels,
        inner_steps=args.inner_steps,
        backbone="resnet12" if path == "resnet12" else "published",
        **METHODS[method],
    )
    learner = kml.build_learner(config)
    if path == "generic":
        task_model = learner.models[0]
        learner = (
            kml.MAML(task_model, inner_lr=config.inner_lr, inner_steps=config.inner_steps)
            if config.algorithm == "maml"
            else kml.ProtoNet(task_model, refine=config.proto_refine)
        )
    return learner.to(args.device).train()


def tasks_per_second(method: str, path: str, args) -> float:
    torch.manual_seed(0)
    learner = build(method, path, args)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    episode = random_episode(args.meta_batch, args.ways, args.shots, args.queries, args.side, args.device, modes=3)
    step = outer_step(learner, episode, optimizer, args.device, args.bf16)
    return args.meta_batch / seconds_per_step(step, args.steps, args.warmup, args.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_arguments(parser)
    add_timing_arguments(parser, steps=5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--paths", nargs="+", default=["packed", "generic"], choices=["packed", "generic", "resnet12"])
    args = smoke_sized(parser.parse_args())
    if args.smoke:
        args.paths = ["packed", "generic", "resnet12"]
    if args.bf16:
        check_bf16(args.device)
    tuned = tune_cpu_allocator()
    print(
        f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"{args.ways}w{args.shots}s{args.queries}q side={args.side} meta-batch={args.meta_batch} "
        f"channels={args.channels} inner-steps={args.inner_steps} bf16={args.bf16} allocator-tuned={tuned}"
    )
    print(f"{'method':<14}{'path':<10}{'tasks/s':>10}{'ms/step':>10}")
    for method in args.methods:
        rates = {}
        for path in args.paths:
            rates[path] = tasks_per_second(method, path, args)
            print(
                f"{method:<14}{path:<10}{rates[path]:>10.2f}{1000 * args.meta_batch / rates[path]:>10.1f}", flush=True
            )
        if {"packed", "generic"} <= set(rates):
            print(
                f"{method:<14}ratio     {rates['packed'] / rates['generic']:>10.2f}x  (packed / generic, same network)"
            )


if __name__ == "__main__":
    main()
