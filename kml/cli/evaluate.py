"""kml-eval: accuracy of a checkpoint on a fixed, seeded set of meta-test episodes per mode.

    kml-eval --checkpoint train_dir/<run>/checkpoints/last.pt
    kml-eval --checkpoint ... --modes omniglot --episodes 600 --inner-steps 10
    kml-eval --checkpoint <protonet run>/checkpoints/last.pt --ways 20   # trained 5-way, tested 20-way

Prints per-mode mean accuracy with 95% confidence intervals and their average,
and writes eval_<checkpoint>_<split>.json and .csv beside the checkpoint.
Evaluating the same checkpoint twice gives identical numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kml.cli.common import ArgumentParser
from kml.config.checks import EVAL_NUMBERS, check_device, check_output_path, check_values
from kml.errors import KMLError, exit_on_kml_error
from kml.runtime.threads import configure_threads

__all__ = ["build_parser", "checkpoint_step", "main", "ways_refusal"]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="kml-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a .pt file written by kml-train")
    parser.add_argument("--modes", nargs="+", help="modes to evaluate (default: the run's modes)")
    parser.add_argument(
        "--split", default="test", choices=("train", "val", "test"), help="class split to draw episodes from"
    )
    parser.add_argument("--episodes", type=int, default=1000, help="episodes per mode")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fixed evaluation episodes")
    parser.add_argument(
        "--inner-steps", type=int, help="MAML inner steps at test time (default: the run's eval_inner_steps)"
    )
    parser.add_argument(
        "--ways",
        type=int,
        help="classes per task (default: the run's); other values only for "
        "learners whose parameters do not depend on N (ProtoNet without encoder labels)",
    )
    parser.add_argument("--shots", type=int, help="support images per class (default: the run's)")
    parser.add_argument("--queries", type=int, help="query images per class (default: the run's)")
    parser.add_argument("--tasks-per-batch", type=int, default=10, help="tasks evaluated together")
    parser.add_argument("--data-root", help="dataset cache folder (default: the run's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--output", help="JSON output path (default: beside the checkpoint)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def checkpoint_step(state: dict, path: str | os.PathLike) -> int:
    """The training step a checkpoint records, or a one-line :class:`KMLError`."""
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise KMLError(f"checkpoint {path} records no training step (got {step!r}); it is not one kml-train wrote")
    return step


def ways_refusal(learner) -> str | None:
    """Why a learner cannot be evaluated at another N, or ``None`` when its parameters do not depend on N."""
    if learner.algorithm == "maml":
        return f"this learner's MAML head is Linear(features, {learner.ways}), sized for its training N"
    if learner.modulation != "none" and learner.encoder_uses_labels:
        return f"its task encoder reads {learner.ways} one-hot label planes, sized for its training N"
    return None


@exit_on_kml_error
def main(argv: list[str] | None = None) -> int:
    configure_threads()  # before torch loads OpenMP: a short spin, threads from the CPU affinity
    args = build_parser().parse_args(argv)
    # every number, the device and the output folder are checked before the checkpoint is read (kml.config.checks)
    vars(args).update(check_values(vars(args), EVAL_NUMBERS))
    check_device(args.device)
    checkpoint = Path(args.checkpoint)
    if args.output:
        check_output_path(args.output)
        if Path(args.output).suffix.lower() == ".csv":  # the table is written beside the report as <name>.csv
            raise KMLError(f"--output {args.output} names the JSON report; give a .json name, the CSV goes beside it")
    elif checkpoint.parent.is_dir() and not os.access(checkpoint.parent, os.W_OK):  # before evaluating, not after
        raise KMLError(
            f"the report goes beside the checkpoint, and {checkpoint.parent} is not writable; "
            f"pass --output FILE.json in a writable folder"
        )

    import dataclasses

    import pandas as pd
    import torch

    from kml.data.modes import ROTATED_BY_DEFAULT, expand_modes, load_stores
    from kml.data.store import check_run_caches
    from kml.evaluation import average, evaluate
    from kml.runtime import bf16_native, tune_cpu_allocator
    from kml.training.checkpoint import load_learner
    from kml.training.distributed import DistInfo, resolve_device

    tune_cpu_allocator()
    device = resolve_device(args.device, DistInfo())
    try:
        learner, config, state = load_learner(args.checkpoint, device)
    except KMLError as error:  # a value of the checkpoint's own config, not of a flag given here: say so
        if str(Path(args.checkpoint)) in str(error):  # messages print the path normalised
            raise
        raise KMLError(f"checkpoint {args.checkpoint} holds a config kml refuses: {error}") from None
    step = checkpoint_step(state, args.checkpoint)

    modes = expand_modes(args.modes) if args.modes else config.modes
    # Multi-MAML and per-mode inner rates/steps pick by the task's mode index: it must be the run's own index
    by_mode = (
        config.learner.multi_maml
        or config.learner.mode_inner_lr is not None
        or config.learner.mode_inner_steps is not None
    )
    if by_mode and set(modes) - set(config.modes):
        raise KMLError(
            f"this learner ({config.learner.method}, per-mode settings) only knows its training modes {config.modes}; got {modes}"
        )
    stores = load_stores(modes, args.split, args.data_root or config.data_root, config.image_size, 3, device)
    check_run_caches(state.get("data"), stores)
    mode_indices = mode_names = None
    if by_mode:  # keep each mode at the index of its own parameter set / rate, also for a subset of the modes
        by_name = {s.mode: s for s in stores}
        stores = [by_name[m] for m in config.modes if m in by_name]
        mode_indices, mode_names = [config.modes.index(s.mode) for s in stores], config.modes
    rotate = [config.rotate_omniglot and s.mode in ROTATED_BY_DEFAULT for s in stores]
    if args.ways is not None and args.ways < 2:
        raise KMLError(f"--ways must be at least 2, got {args.ways}")
    ways = args.ways or config.ways
    if ways != config.ways:
        refusal = ways_refusal(config.learner)
        if refusal:
            raise KMLError(f"--ways {ways}: {refusal}; evaluate it {config.ways}-way")
    if args.inner_steps is not None and config.learner.algorithm != "maml":
        raise KMLError(
            f"--inner-steps applies to MAML; this checkpoint is {config.learner.method}, which has no inner loop: drop it"
        )
    shots = args.shots if args.shots is not None else config.shots
    queries = args.queries if args.queries is not None else config.queries
    bf16 = config.bf16 and bf16_native(device)  # trained with bf16 on another device: float32 here
    torch.manual_seed(args.seed)
    results = evaluate(
        learner,
        stores,
        ways,
        shots,
        queries,
        args.episodes,
        seed=args.seed,
        tasks_per_batch=args.tasks_per_batch,
        inner_steps=args.inner_steps,
        rotate=rotate,
        bf16=bf16,
        progress=args.progress,
        mode_indices=mode_indices,
        mode_names=mode_names,
    )
    rows = [r.as_dict() for r in [*results, average(results)]]
    table = pd.DataFrame(rows)
    output = Path(args.output) if args.output else checkpoint.with_name(f"eval_{checkpoint.stem}_{args.split}.json")
    inner = args.inner_steps if args.inner_steps is not None else config.learner.eval_inner_steps
    report = {
        "checkpoint": str(checkpoint),
        "step": step,
        "split": args.split,
        "ways": ways,
        "trained_ways": config.ways,
        "shots": shots,
        "queries": queries,
        "episodes_per_mode": args.episodes,
        "seed": args.seed,
        "inner_steps": inner if config.learner.algorithm == "maml" else None,
        "precision": "bf16" if bf16 else "float32",
        "method": dataclasses.asdict(config.learner),
        "results": rows,
        "episode_accuracy": {r.mode: r.episode_accuracy for r in results},  # per episode, for paired comparisons
    }
    try:
        output.write_text(json.dumps(report, indent=2))
        table.to_csv(output.with_suffix(".csv"), index=False)
    except OSError as error:
        raise KMLError(
            f"cannot write {error.filename or output}: {error.strerror or error}; pass --output elsewhere"
        ) from None
    print(f"{ways}-way {shots}-shot, {args.episodes} {args.split} episodes per mode, step {step}")
    print(
        table.to_string(
            index=False, formatters={"accuracy": "{:.2f}".format, "ci95": "±{:.2f}".format, "loss": "{:.4f}".format}
        )
    )
    print(f"written: {output} and {output.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
