"""kml-eval: accuracy of a checkpoint on a fixed, seeded set of meta-test episodes per mode.

    kml-eval --checkpoint train_dir/<run>/checkpoints/last.pt
    kml-eval --checkpoint ... --modes omniglot --episodes 600 --inner-steps 10
    kml-eval --checkpoint <protonet run>/checkpoints/last.pt --ways 20   # trained 5-way, tested 20-way
    kml-eval --checkpoint <protonet run>/checkpoints/last.pt --setups 5w1s 5w5s 20w1s   # one table

Prints per-mode mean accuracy (percent) with 95% confidence intervals and their average, and writes a report
(.json) and its table (.csv) beside the checkpoint, named by every setting that changes the numbers, e.g.
eval_last_test_5w1s15q_1000ep_seed0_inner10.json: another evaluation never overwrites it.
Evaluating the same checkpoint twice gives identical numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kml.cli.common import ArgumentParser
from kml.config.checks import EVAL_NUMBERS, check_device, check_output_path, check_values
from kml.errors import KMLError, exit_on_kml_error
from kml.runtime.threads import configure_threads

__all__ = ["build_parser", "main"]


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
    parser.add_argument(
        "--setups",
        nargs="+",
        metavar="NwKs",
        help="several N-way K-shot setups in one call, e.g. 5w1s 5w5s 20w1s: one table, a report each "
        "(instead of --ways and --shots)",
    )
    parser.add_argument("--queries", type=int, help="query images per class (default: the run's)")
    parser.add_argument("--tasks-per-batch", type=int, default=10, help="tasks evaluated together")
    parser.add_argument("--data-root", help="dataset cache folder (default: the run's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--output",
        help="JSON report path (default: beside the checkpoint, named by the evaluation's settings); with several "
        "--setups, each report is this name with _NwKs added",
    )
    parser.add_argument(
        "--released-protocol",
        choices=("mmaml", "kml"),
        help="also summarise the same episodes as a released code's test did: mmaml (mean of mixed meta-batch means, "
        "interval from their ddof-0 std) or kml (per-mode means over windows of 100 meta-batches)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def _setups(args: argparse.Namespace) -> list[tuple[int | None, int | None]]:
    """The (ways, shots) to evaluate: those of --setups, or --ways and --shots (``None``: the run's)."""
    if not args.setups:
        return [(args.ways, args.shots)]
    if args.ways is not None or args.shots is not None:
        raise KMLError("--setups sets the ways and shots of each evaluation; drop --ways and --shots")
    from kml.results.runs import Setup

    setups = [Setup.parse(text) for text in args.setups]
    if len(set(setups)) != len(setups):
        raise KMLError(f"--setups {' '.join(args.setups)} repeats a setup")
    return [(setup.ways, setup.shots) for setup in setups]


def _check_output(args: argparse.Namespace, checkpoint: Path) -> Path | None:
    """The --output path, or ``None`` (reports beside the checkpoint), checked before anything is evaluated."""
    if args.output:
        check_output_path(args.output)
        if Path(args.output).suffix.lower() == ".csv":  # the table is written beside the report as <name>.csv
            raise KMLError(f"--output {args.output} names the JSON report; give a .json name, the CSV goes beside it")
        return Path(args.output)
    if checkpoint.parent.is_dir() and not os.access(checkpoint.parent, os.W_OK):  # before evaluating, not after
        raise KMLError(
            f"the report goes beside the checkpoint, and {checkpoint.parent} is not writable; "
            f"pass --output FILE.json in a writable folder"
        )
    return None


def _report_path(report: dict, output: Path | None, checkpoint: Path, run_modes: list[str], several: bool) -> Path:
    """Where ``report`` goes: --output (with _NwKs for one of several setups), or beside the checkpoint, named
    by its settings (:func:`kml.evaluation.report_name`)."""
    if output is None:
        from kml.evaluation import report_name

        return checkpoint.with_name(report_name(report, checkpoint, run_modes))
    if several:
        return output.with_name(f"{output.stem}_{report['ways']}w{report['shots']}s{output.suffix or '.json'}")
    return output


def _shown(table):
    """The table with folder modes by their short names (the report keeps the full mode)."""
    from kml.data.modes import mode_label

    return table.assign(mode=table["mode"].map(mode_label))


def _print_reports(reports: list[dict]) -> None:
    """One table: a single evaluation as before; several setups with a setup column."""
    import pandas as pd

    first = reports[0]
    formatters = {"accuracy": "{:.2f}".format, "ci95": "±{:.2f}".format, "loss": "{:.4f}".format}
    if len(reports) == 1:
        print(
            f"{first['ways']}-way {first['shots']}-shot, {first['episodes_per_mode']} {first['split']} episodes "
            f"per mode, step {first['step']}"
        )
        print(_shown(pd.DataFrame(first["results"])).to_string(index=False, formatters=formatters))
        return
    print(f"{first['episodes_per_mode']} {first['split']} episodes per mode and setup, step {first['step']}")
    rows = [{"setup": f"{r['ways']}w{r['shots']}s", **row} for r in reports for row in r["results"]]
    print(_shown(pd.DataFrame(rows)).to_string(index=False, formatters=formatters))


def _print_released(summary: dict | None) -> None:
    """The released protocol's summary in one line per number, as the released code would print it."""
    if summary is None:
        return
    if summary["protocol"] == "mmaml":
        print(
            f"released mmaml protocol: {summary['accuracy']:.2f} ± {summary['ci95']:.2f} over {summary['batches']} "
            f"mixed meta-batches of {summary['meta_batch']}"
        )
        return
    for number, window in enumerate(summary["windows"], start=1):
        modes = " ".join(f"{m}: {v['accuracy']:.2f}±{v['ci95']:.2f}" for m, v in window["modes"].items())
        print(f"released kml protocol, window {number} ({window['tasks']} tasks): {modes}")


@exit_on_kml_error
def main(argv: list[str] | None = None) -> int:
    configure_threads()  # before torch loads OpenMP: a short spin, threads from the CPU affinity
    args = build_parser().parse_args(argv)
    # every number, the device and the output folder are checked before the checkpoint is read (kml.config.checks)
    vars(args).update(check_values(vars(args), EVAL_NUMBERS))
    check_device(args.device)
    checkpoint = Path(args.checkpoint)
    setups = _setups(args)
    output = _check_output(args, checkpoint)

    from kml.evaluation import run_reports, write_report
    from kml.runtime import tune_cpu_allocator
    from kml.training.checkpoint import checkpoint_step, load_learner
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
    reports = run_reports(
        learner,
        config,
        setups,
        episodes=args.episodes,
        seed=args.seed,
        split=args.split,
        modes=args.modes,
        queries=args.queries,
        inner_steps=args.inner_steps,
        tasks_per_batch=args.tasks_per_batch,
        data_root=args.data_root,
        device=device,
        data=state.get("data"),
        progress=args.progress,
        released=args.released_protocol,
    )
    reports = [{"checkpoint": str(checkpoint), "step": step, **report} for report in reports]
    paths = [_report_path(r, output, checkpoint, list(config.modes), len(reports) > 1) for r in reports]
    for report, path in zip(reports, paths):
        write_report(report, path)
    _print_reports(reports)
    for report in reports:
        _print_released(report.get("released_protocol"))
    for path in paths:
        print(f"written: {path} and {path.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
