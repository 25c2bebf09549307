"""kml's batched MAML step vs learn2learn's MAML on the same model and meta-batch.

A step is the meta-batch's forward (inner loop included), the outer backward
and an Adam step. "kml" is the learner's batched forward (all tasks at once,
``torch.func.vmap`` + ``grad``); "learn2learn" is ``learn2learn.algorithms.MAML``
wrapping the same learner's backbone with each task's modulation, task by task:
``clone()``, ``adapt()`` ``inner_steps`` times, query loss
(:func:`kml.integrations.learn2learn.maml_forward`). Both start from the same
parameters and compute the same loss (printed as a check). Published setup:
5-way 1-shot, 15 queries, 84x84x3, meta-batch 10, 32 base channels, 5 inner
steps, second order. Prints tasks/s of each and the ratio.

    python benchmarks/learn2learn_maml.py                   # published setup, CPU
    python benchmarks/learn2learn_maml.py --device cuda
    python benchmarks/learn2learn_maml.py --smoke           # tiny, for CI (figures meaningless)

Needs learn2learn: python -m kml.integrations.install_learn2learn
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import add_setup_arguments, add_timing_arguments, random_episode, smoke_sized, synchronize

from kml.algorithms import build_learner
from kml.config import LearnerConfig
from kml.data.episode import Episode
from kml.errors import exit_on_kml_error
from kml.integrations.learn2learn import maml_forward, require_learn2learn
from kml.runtime import autocast, check_bf16, tune_cpu_allocator

METHODS = {"maml": dict(algorithm="maml", modulation="none"), "kml-maml": dict(algorithm="maml", modulation="kml")}


def measure(learner: torch.nn.Module, forward, episode: Episode, args) -> tuple[float, float]:
    """(tasks/s, first loss) of ``forward(learner, episode)`` + backward + Adam over ``args.steps`` steps."""
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    first = None

    def step() -> float:
        with autocast(args.device, args.bf16):  # both paths alike
            loss = forward(learner, episode).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    for _ in range(args.warmup):
        loss = step()
        first = loss if first is None else first
    synchronize(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
        first = loss if first is None else first
    synchronize(args.device)
    return args.steps * args.meta_batch / (time.perf_counter() - start), first


@exit_on_kml_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_arguments(parser)
    parser.add_argument("--first-order", action="store_true")
    add_timing_arguments(parser, steps=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = smoke_sized(parser.parse_args(argv))
    l2l = require_learn2learn()
    tune_cpu_allocator()
    if args.bf16:
        check_bf16(args.device)
    print(
        f"device={args.device} torch={torch.__version__} learn2learn={l2l.__version__} threads={torch.get_num_threads()} "
        f"{args.ways}w{args.shots}s{args.queries}q side={args.side} meta-batch={args.meta_batch} channels={args.channels} "
        f"inner-steps={args.inner_steps} {'first' if args.first_order else 'second'}-order bf16={args.bf16}"
    )
    print(f"{'method':<10}{'path':<13}{'tasks/s':>10}{'ms/step':>10}{'first loss':>13}")
    episode = random_episode(args.meta_batch, args.ways, args.shots, args.queries, args.side, args.device)
    paths = {"learn2learn": maml_forward, "kml batched": lambda learner, e: learner(e)}
    for method in args.methods:
        torch.manual_seed(0)
        config = LearnerConfig(
            ways=args.ways,
            image_size=args.side,
            base_channels=args.channels,
            encoder_channels=args.channels,
            inner_steps=args.inner_steps,
            first_order=args.first_order,
            **METHODS[method],
        )
        learner = build_learner(config).to(args.device).train()
        rates, losses = {}, {}
        for path, forward in paths.items():
            rates[path], losses[path] = measure(copy.deepcopy(learner), forward, episode, args)
            print(
                f"{method:<10}{path:<13}{rates[path]:>10.2f}{1000 * args.meta_batch / rates[path]:>10.1f}"
                f"{losses[path]:>13.6f}",
                flush=True,
            )
        gap = abs(losses["kml batched"] - losses["learn2learn"])
        print(
            f"{method:<10}{'ratio':<13}{rates['kml batched'] / rates['learn2learn']:>10.2f}x  "
            f"(kml batched / learn2learn; |first loss difference| {gap:.1e})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
