"""kml-transference: task-level transference of a saved model, as a table and plots.

    kml-transference --checkpoint train_dir/<run>/checkpoints/last.pt
    kml-transference --checkpoint ... --batches 20 --parameters modulation
    kml-transference --checkpoint ... --source-mode glyphs --source-split train \\
                     --target-mode textures --target-split test --sources 200   # the paper's design

Z(i->j) = 1 - L_j(Theta - rate * grad L_i(Theta)) / L_j(Theta): > 0 means a meta-update on task i
helps task j. Writes transference_<checkpoint>.csv and PNG plots beside the checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kml.cli.common import ArgumentParser
from kml.config.checks import TRANSFERENCE_NUMBERS, check_device, check_output_path, check_values
from kml.errors import KMLError, exit_on_kml_error
from kml.runtime.threads import configure_threads

__all__ = ["build_parser", "main"]


def build_parser() -> ArgumentParser:
    from kml.data.store import SPLITS  # here: importing kml.cli.transference must not import torch
    from kml.transference.analyzer import PARAMETER_GROUPS

    parser = ArgumentParser(
        prog="kml-transference", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="a .pt file written by kml-train")
    parser.add_argument("--modes", nargs="+", help="modes mixed in the analysed meta-batches (default: the run's)")
    parser.add_argument("--split", default="train", choices=SPLITS, help="classes of the analysed tasks")
    parser.add_argument("--batches", type=int, default=10, help="meta-batches analysed (all ordered pairs in each)")
    parser.add_argument("--meta-batch", type=int, help="tasks per analysed meta-batch (default: the run's)")
    parser.add_argument("--rate", type=float, help="lookahead rate eta (default: the run's outer lr)")
    parser.add_argument(
        "--parameters", default="all", choices=PARAMETER_GROUPS, help="meta-parameters that take the lookahead"
    )
    parser.add_argument("--source-mode", help="paper design: source tasks from this mode ...")
    parser.add_argument("--source-split", default="train", choices=SPLITS, help="... and split")
    parser.add_argument("--target-mode", help="... target tasks from this mode ...")
    parser.add_argument("--target-split", default="test", choices=SPLITS, help="... and split")
    parser.add_argument("--sources", type=int, default=100, help="paper design: source tasks per target task")
    parser.add_argument("--targets", type=int, default=1, help="paper design: target tasks")
    parser.add_argument("--seed", type=int, default=0, help="seed of the analysed episodes")
    parser.add_argument("--data-root", help="dataset cache folder (default: the run's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--output", help="CSV output path (default: beside the checkpoint)")
    return parser


@exit_on_kml_error
def main(argv: list[str] | None = None) -> int:
    configure_threads()  # before torch loads OpenMP: a short spin, threads from the CPU affinity
    args = build_parser().parse_args(argv)
    if (args.source_mode is None) != (args.target_mode is None):
        raise KMLError("--source-mode and --target-mode go together")
    # every number, the device and the output folder are checked before any work (kml.config.checks)
    vars(args).update(check_values(vars(args), TRANSFERENCE_NUMBERS))
    check_device(args.device)
    if args.output:
        check_output_path(args.output)
    elif Path(args.checkpoint).parent.is_dir() and not os.access(Path(args.checkpoint).parent, os.W_OK):
        raise KMLError(
            f"the table and plots go beside the checkpoint, and {Path(args.checkpoint).parent} is not writable; "
            f"pass --output FILE.csv in a writable folder"
        )

    import dataclasses

    import numpy as np
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    from kml.cli.evaluate import checkpoint_step
    from kml.data.modes import ROTATED_BY_DEFAULT, canonical_mode, expand_modes, load_stores
    from kml.data.sampler import MixtureSampler
    from kml.data.store import check_run_caches
    from kml.runtime import tune_cpu_allocator
    from kml.training.checkpoint import load_learner
    from kml.training.distributed import DistInfo, resolve_device
    from kml.transference.aggregate import mode_matrix
    from kml.transference.analyzer import result_rows, task_transference
    from kml.transference.plots import save_all

    tune_cpu_allocator()
    device = resolve_device(args.device, DistInfo())
    learner, config, state = load_learner(args.checkpoint, device)
    step = checkpoint_step(state, args.checkpoint)
    learner.train()  # the training inner loop, as during meta-training
    from kml.transference.analyzer import parameter_names

    if not parameter_names(learner, args.parameters):  # no lookahead step at all: every Z would be 0
        raise KMLError(
            f"--parameters {args.parameters}: this checkpoint ({config.learner.method}) has no such meta-parameters, "
            f"so every Z would be 0; use --parameters all"
        )
    rate = args.rate if args.rate is not None else config.lr
    root = args.data_root or config.data_root

    # Multi-MAML and per-mode inner rates/steps pick by the task's mode index: it must be the run's own index
    by_mode = (
        config.learner.multi_maml
        or config.learner.mode_inner_lr is not None
        or config.learner.mode_inner_steps is not None
    )

    def sampler_for(modes: list[str], split: str, tasks: int, seed: int) -> MixtureSampler:
        if by_mode and set(modes) - set(config.modes):
            raise KMLError(
                f"this learner ({config.learner.method}, per-mode settings) only knows its training modes "
                f"{config.modes}; got {modes}"
            )
        stores = load_stores(modes, split, root, config.image_size, 3, device)
        check_run_caches(state.get("data"), stores)
        rotate = [config.rotate_omniglot and s.mode in ROTATED_BY_DEFAULT for s in stores]
        return MixtureSampler(stores, config.ways, config.shots, config.queries, tasks, "mixed", None, rotate, seed)

    def run_indices(episode):
        """The episode with each task's mode as the run's index (a sampler of a subset counts from 0)."""
        if not by_mode:
            return episode
        lookup = torch.tensor([config.modes.index(m) for m in episode.mode_names], device=episode.mode.device)
        return dataclasses.replace(episode, mode=lookup[episode.mode], mode_names=tuple(config.modes))

    rows = []
    if args.source_mode:
        source_mode, target_mode = canonical_mode(args.source_mode), canonical_mode(args.target_mode)
        sources = sampler_for([source_mode], args.source_split, min(args.sources, 10), args.seed)
        targets = run_indices(sampler_for([target_mode], args.target_split, args.targets, args.seed + 1).sample())
        drawn = 0
        with tqdm(total=args.sources, desc="source tasks") as bar:
            while drawn < args.sources:
                batch = run_indices(sources.sample())
                batch = batch.select(slice(0, min(batch.num_tasks, args.sources - drawn)))
                result = task_transference(learner, batch, rate, targets=targets, parameters=args.parameters)
                for row in result_rows(result, step, batch=drawn):
                    row["task_i"] += drawn
                    rows.append(row)
                drawn += batch.num_tasks
                bar.update(batch.num_tasks)
    else:
        modes = expand_modes(args.modes) if args.modes else config.modes
        tasks = args.meta_batch if args.meta_batch is not None else config.meta_batch
        if tasks < 2:  # Z is defined for pairs of tasks of one meta-batch
            raise KMLError(
                f"the run's meta-batch has {tasks} task, so there are no task pairs; pass --meta-batch 2 or more"
            )
        sampler = sampler_for(modes, args.split, tasks, args.seed)
        for batch in tqdm(range(args.batches), desc="meta-batches"):
            result = task_transference(learner, run_indices(sampler.sample()), rate, parameters=args.parameters)
            rows += result_rows(result, step, batch)
    records = pd.DataFrame(rows)
    broken = int((~np.isfinite(records["Z"].to_numpy(dtype=float))).sum())
    if broken:  # before anything is written: a table of NaN would be kept, and the plots cannot be drawn
        raise KMLError(
            f"rate {rate:g} makes {broken} of {len(records)} lookahead losses non-finite; "
            f"pass a smaller --rate (the run's outer lr is {config.lr:g})"
        )
    checkpoint = Path(args.checkpoint)
    output = Path(args.output) if args.output else checkpoint.with_name(f"transference_{checkpoint.stem}.csv")
    try:
        records.to_csv(output, index=False)
        plots = save_all(records, output.parent, prefix=output.stem)
    except OSError as error:
        raise KMLError(
            f"cannot write {error.filename or output}: {error.strerror or error}; pass --output elsewhere"
        ) from None
    print(f"mean Z (rows: source mode, columns: target mode), rate {rate:g}, parameters {args.parameters}:")
    print(mode_matrix(records).to_string(float_format=lambda v: f"{v:+.4f}"))
    print(f"written: {output}, {', '.join(str(p) for p in plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
