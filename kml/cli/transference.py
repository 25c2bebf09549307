"""kml-transference: task-level transference of a saved model, as a table with intervals and figures.

  Z(i->j) = 1 - L_j(Theta + Delta_i) / L_j(Theta)   (the paper's ratio: LR = 1 - Z)

Delta_i is one outer step on task i's meta-gradient alone: by default the step the run's optimiser would take
from its saved state (Adam's moments and step count, unchanged), or plain SGD (--lookahead sgd, Delta_i =
-rate * grad L_i). Z > 0: the step on task i helps task j.

  kml-transference --checkpoint train_dir/<run>/checkpoints/last.pt           # mixed meta-batches of the run
  kml-transference --checkpoint ... --batches 20 --parameters modulation --lookahead sgd --rate 1e-4
  kml-transference train_dir/<run> --source-mode glyphs --target-mode textures --sources 200
                   # the paper's experiment at every saved checkpoint (or --steps 1000 5000):
                   # sources from glyphs' meta-train classes, targets from textures' meta-test classes

With --checkpoint the table goes beside the checkpoint (transference_<checkpoint>.csv); with a run folder into
it (transference_<source>-<target>.csv, or transference_checkpoints.csv), with the figures (heatmap with 95%
intervals and n, histograms of Z and of LR per training stage, the linearisation check) and a per-step summary
beside it. Every checkpoint is analysed on the same seeded episodes. A warning names a rate too large for the
first-order regime (sum|Z - Z_linear| / sum|Z_linear| above --linear-bound).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kml.cli.common import ArgumentParser
from kml.config.checks import TRANSFERENCE_NUMBERS, Number, check_device, check_output_path, check_values
from kml.errors import KMLError, exit_on_kml_error
from kml.runtime.threads import configure_threads

__all__ = ["build_parser", "main"]

NUMBERS = {
    **TRANSFERENCE_NUMBERS,
    "steps": Number(int, 0, optional=True, many=True),
    "bins": Number(int, 1),
    "linear_bound": Number(float, 0, above=True),
}


def build_parser() -> ArgumentParser:
    from kml.data.store import SPLITS  # here: importing kml.cli.transference must not import torch
    from kml.transference.analyzer import PARAMETER_GROUPS
    from kml.transference.diagnostics import LINEAR_BOUND
    from kml.transference.lookahead import LOOKAHEADS

    parser = ArgumentParser(
        prog="kml-transference", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    what = parser.add_argument_group("what to analyse (one of)")
    what.add_argument("run", nargs="?", help="a run folder: analyse its step checkpoints (all, or --steps)")
    what.add_argument("--checkpoint", help="one .pt file written by kml-train")
    what.add_argument("--steps", type=int, nargs="+", help="with a run folder: only these checkpoint steps")
    step = parser.add_argument_group("the lookahead step")
    step.add_argument(
        "--lookahead",
        default="optimizer",
        choices=LOOKAHEADS,
        help="optimizer: the run's optimiser's next update from its saved state (Adam, AdamW, SGD); "
        "sgd: Theta - rate * grad L_i (default: optimizer)",
    )
    step.add_argument(
        "--rate",
        type=float,
        help="sgd: eta; optimizer: its learning rate replaced (default: the checkpoint's rate of its next update)",
    )
    step.add_argument(
        "--parameters",
        default="all",
        choices=PARAMETER_GROUPS,
        help="meta-parameters that take the lookahead (default all)",
    )
    mixed = parser.add_argument_group("mixed design: every ordered pair of the run's meta-batches")
    mixed.add_argument("--modes", nargs="+", help="modes mixed in the analysed meta-batches (default: the run's)")
    mixed.add_argument("--split", default="train", choices=SPLITS, help="classes of the analysed tasks (default train)")
    mixed.add_argument("--batches", type=int, default=10, help="meta-batches analysed per checkpoint (default 10)")
    mixed.add_argument("--meta-batch", type=int, help="tasks per analysed meta-batch (default: the run's)")
    paper = parser.add_argument_group("paper design: sources of one mode against targets of another")
    paper.add_argument("--source-mode", help="source tasks from this mode ...")
    paper.add_argument("--source-split", default="train", choices=SPLITS, help="... and split (default train)")
    paper.add_argument("--target-mode", help="target tasks from this mode ...")
    paper.add_argument("--target-split", default="test", choices=SPLITS, help="... and split (default test)")
    paper.add_argument("--sources", type=int, default=100, help="source tasks per checkpoint (default 100)")
    paper.add_argument("--targets", type=int, default=1, help="target tasks, each paired with every source (default 1)")
    out = parser.add_argument_group("episodes and outputs")
    out.add_argument(
        "--seed", type=int, default=0, help="seed of the analysed episodes, the same at every step (default 0)"
    )
    out.add_argument("--data-root", help="dataset cache folder (default: the run's)")
    out.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    out.add_argument("--output", help="CSV output path (default: beside the checkpoint, or in the run folder)")
    out.add_argument("--bins", type=int, default=30, help="histogram bins (default 30)")
    out.add_argument(
        "--linear-bound",
        type=float,
        default=LINEAR_BOUND,
        help=f"warn when sum|Z - Z_linear| / sum|Z_linear| exceeds this (default {LINEAR_BOUND:g})",
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    """Every choice, number, device and output folder checked before any work (one-line errors)."""
    if (args.source_mode is None) != (args.target_mode is None):
        raise KMLError("--source-mode and --target-mode go together")
    if (args.run is None) == (args.checkpoint is None):
        raise KMLError("give a run folder or --checkpoint FILE (one of them)")
    if args.steps and args.run is None:
        raise KMLError("--steps picks checkpoints of a run folder; give the run folder instead of --checkpoint")
    vars(args).update(check_values(vars(args), NUMBERS))
    check_device(args.device)
    if args.run is not None and not Path(args.run).is_dir():
        raise KMLError(f"run folder {args.run} not found")
    if args.output:
        check_output_path(args.output)
        return
    folder = Path(args.run) if args.run is not None else Path(args.checkpoint).parent
    if folder.is_dir() and not os.access(folder, os.W_OK):
        raise KMLError(f"the table and plots go into {folder}, which is not writable; pass --output FILE.csv elsewhere")


def _output(args: argparse.Namespace, design) -> Path:
    from kml.transference.offline import PaperDesign

    if args.output:
        return Path(args.output)
    if args.run is None:
        checkpoint = Path(args.checkpoint)
        return checkpoint.with_name(f"transference_{checkpoint.stem}.csv")
    name = design.name if isinstance(design, PaperDesign) else "checkpoints"
    return Path(args.run) / f"transference_{name}.csv"


@exit_on_kml_error
def main(argv: list[str] | None = None) -> int:
    configure_threads()  # before torch loads OpenMP: a short spin, threads from the CPU affinity
    args = build_parser().parse_args(argv)
    _check_arguments(args)

    import pandas as pd

    from kml.runtime import tune_cpu_allocator
    from kml.training.distributed import DistInfo, resolve_device
    from kml.transference.aggregate import mode_pair_stats
    from kml.transference.diagnostics import linearisation_warning
    from kml.transference.offline import CheckpointAnalyser, MixedDesign, PaperDesign
    from kml.transference.outputs import write_figures
    from kml.transference.runs import run_checkpoints

    tune_cpu_allocator()
    device = resolve_device(args.device, DistInfo())
    if args.source_mode:
        design = PaperDesign(
            args.source_mode, args.target_mode, args.source_split, args.target_split, args.sources, args.targets
        )
    else:
        design = MixedDesign(args.modes, args.split, args.batches, args.meta_batch)
    checkpoints = [Path(args.checkpoint)] if args.run is None else [p for _, p in run_checkpoints(args.run, args.steps)]
    analyser = CheckpointAnalyser(
        str(device), args.lookahead, args.rate, args.parameters, args.seed, args.data_root, not args.no_progress
    )
    records = pd.concat([analyser.records(path, design) for path in checkpoints], ignore_index=True)
    output = _output(args, design)
    try:
        records.to_csv(output, index=False)
    except OSError as error:
        raise KMLError(
            f"cannot write {error.filename or output}: {error.strerror or error}; pass --output elsewhere"
        ) from None
    written = write_figures(records, output, bins=args.bins)
    kinds = ", ".join(sorted(set(records["lookahead"])))
    rates = ", ".join(f"{r:g}" for r in sorted(set(records["rate"])))
    print(f"Z per ordered mode pair ({kinds} lookahead, rate {rates}, parameters {args.parameters}; 95% intervals):")
    table = mode_pair_stats(records, by_step=True)[
        ["step", "mode_i", "mode_j", "mean", "ci_low", "ci_high", "n", "count"]
    ]
    print(table.to_string(index=False, float_format=lambda v: f"{v:+.4f}"))
    warning = linearisation_warning(records, args.linear_bound)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"written: {output}, {', '.join(str(p) for p in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
