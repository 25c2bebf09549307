"""End-to-end meta-training throughput: kml-train's loop vs the published code's approach.

Both train KML + ProtoNet (the only method the released KML code trains) on
the same images and setup: 5-way 1-shot 15-query, 84x84x3, meta-batch 10,
32 base channels. The reference (benchmarks/published_style.py) loops over
tasks in Python and decodes JPEGs in a DataLoader; kml draws meta-batches
on the device and runs all tasks as batched tensor work. kml's figure
includes sampling, metric logging, validation and checkpointing (the whole
``Trainer.fit``). Also printed: kml's KML + MAML training and evaluation
throughput, which the reference has no counterpart for.

    python benchmarks/train_throughput.py                # published setup
    python benchmarks/train_throughput.py --smoke        # tiny, for CI
    python benchmarks/train_throughput.py --bf16         # kml under bf16 autocast (AMX CPU or CUDA)
    python benchmarks/train_throughput.py --bf16 --compile  # and kml's ProtoNet step compiled
    python benchmarks/train_throughput.py --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import add_setup_arguments, synchronize
from published_style import PublishedStyleKML, published_style_step, task_loader

from kml.config import LearnerConfig
from kml.config.run import RunConfig
from kml.data.modes import load_stores
from kml.evaluation import evaluate
from kml.runtime import check_bf16, tune_cpu_allocator
from kml.runtime.flops import count_flops
from kml.training.trainer import Trainer


def reference_throughput(store, args, folder: Path) -> float:
    torch.manual_seed(0)
    model = PublishedStyleKML(args.channels, args.channels).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = iter(
        task_loader(
            store,
            folder,
            args.ways,
            args.shots,
            args.queries,
            (args.steps + 1) * args.meta_batch,
            args.side,
            args.workers,
        )
    )
    meta_batch = lambda: [next(loader) for _ in range(args.meta_batch)]  # noqa: E731
    published_style_step(model, optimizer, meta_batch(), args.ways, args.shots, args.device)  # warm-up
    synchronize(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        published_style_step(model, optimizer, meta_batch(), args.ways, args.shots, args.device)
    synchronize(args.device)
    return args.steps * args.meta_batch / (time.perf_counter() - start)


def kml_throughput(args, root: Path, train_dir: Path, algorithm: str, compile: bool = False) -> tuple[float, Trainer]:
    # No transductive refinement: the reference step (like a released-code step with it off) has none.
    learner = LearnerConfig(
        algorithm=algorithm,
        modulation="kml",
        base_channels=args.channels,
        encoder_channels=args.channels,
        **({"inner_steps": args.inner_steps} if algorithm == "maml" else {"proto_refine": False}),
    )
    config = RunConfig(
        modes=[args.mode],
        ways=args.ways,
        shots=args.shots,
        queries=args.queries,
        meta_batch=args.meta_batch,
        steps=args.steps + 1,
        device=args.device,
        data_root=str(root),
        image_size=args.side,
        train_dir=str(train_dir),
        run_name=algorithm,
        log_every=10,
        val_every=10**9,
        val_episodes=args.meta_batch,
        checkpoint_every=10**9,
        bf16=args.bf16,
        learner=learner,
        compile=compile,
    )
    trainer = Trainer.create(config, overwrite=True, progress=False)
    trainer.train_step(trainer.sampler.sample())  # warm-up (allocations, first-call dispatch, compiling)
    trainer.step = 1
    synchronize(args.device)
    start = time.perf_counter()
    trainer.fit()  # steps 2..steps+1, the final validation and checkpoint included
    synchronize(args.device)
    return args.steps * args.meta_batch / (time.perf_counter() - start), trainer


def gflop_per_step(trainer: Trainer) -> float:
    """The FLOPs of one more training step of ``trainer`` (kml.runtime.flops; after the timing, it steps once)."""
    episode = trainer.sampler.sample()
    return count_flops(lambda: trainer.train_step(episode)).total / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed outer steps")
    add_setup_arguments(parser)
    parser.add_argument("--mode", default="shapes", help="synthetic mode whose images both implementations read")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference")
    parser.add_argument("--eval-episodes", type=int, default=100)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile kml's ProtoNet step (compiling is in the untimed warm-up step; "
        "KML+MAML stays eager: torch.compile cannot differentiate twice)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI")
    args = parser.parse_args()
    tuned = tune_cpu_allocator()
    if args.bf16:
        check_bf16(args.device)
    if args.smoke:
        args.steps, args.side, args.channels, args.meta_batch, args.queries = 2, 32, 8, 2, 3
        args.inner_steps, args.workers, args.eval_episodes = 1, 0, 4
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = load_stores([args.mode], "train", tmp / "data", side=args.side)[0]
        reference = reference_throughput(store, args, tmp / "jpeg")
        protonet, protonet_trainer = kml_throughput(args, tmp / "data", tmp / "runs", "protonet", args.compile)
        maml, trainer = kml_throughput(args, tmp / "data", tmp / "runs", "maml")
        work = {"protonet": gflop_per_step(protonet_trainer), "maml": gflop_per_step(trainer)}
        test = load_stores([args.mode], "test", tmp / "data", side=args.side, device=args.device)
        start = time.perf_counter()
        evaluate(
            trainer.learner,
            test,
            args.ways,
            args.shots,
            args.queries,
            args.eval_episodes,
            tasks_per_batch=args.meta_batch,
            bf16=args.bf16,
            progress=False,
        )
        synchronize(args.device)
        eval_rate = args.eval_episodes / (time.perf_counter() - start)
    print(
        f"setup: {args.ways}-way {args.shots}-shot {args.queries}-query, {args.side}x{args.side}x3, meta-batch "
        f"{args.meta_batch}, {args.channels} channels, device {args.device}, torch {torch.__version__}, "
        f"kml bf16 {args.bf16}, ProtoNet compiled {args.compile}, allocator tuned {tuned}"
    )
    per_task = {name: gflop / args.meta_batch for name, gflop in work.items()}
    print(f"{'training loop':<46}{'tasks/s':>10}{'GFLOP/step':>12}{'GFLOP/s':>10}")
    print(
        f"{'published-style KML+ProtoNet (loop, DataLoader)':<46}{reference:>10.1f}{work['protonet']:>12.1f}"
        f"{reference * per_task['protonet']:>10.1f}"
    )
    print(
        f"{'kml KML+ProtoNet (kml-train loop, end to end)':<46}{protonet:>10.1f}{work['protonet']:>12.1f}"
        f"{protonet * per_task['protonet']:>10.1f}"
    )
    print(
        f"{f'kml KML+MAML, {args.inner_steps} inner steps (end to end)':<46}{maml:>10.1f}{work['maml']:>12.1f}"
        f"{maml * per_task['maml']:>10.1f}"
    )
    print(f"ratio kml / published-style (KML+ProtoNet): {protonet / reference:.1f}x")
    print(f"evaluation, KML+MAML: {eval_rate:.1f} episodes/s")
    hours = lambda steps, rate: steps * args.meta_batch / rate / 3600  # noqa: E731
    print(
        f"published schedules at these rates: KML+ProtoNet 30000 steps {hours(30000, protonet):.1f} h "
        f"(published-style {hours(30000, reference):.1f} h), KML+MAML 30000 steps {hours(30000, maml):.1f} h, "
        f"MMAML's 60000 steps {hours(60000, maml):.1f} h"
    )


if __name__ == "__main__":
    main()
