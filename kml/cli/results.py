"""kml-results: train every method x setup x seed (or resume, or reuse), evaluate each on the same fixed
meta-test episodes, and write the results table: per mode and average, mean over seeds, 95% intervals over
seeds and over episodes, paired differences with a baseline method, published numbers where the setup matches.

    kml-results --modes synthetic --seeds 0 1 2 --steps 300 --set image_size=32 base_channels=16
    kml-results --methods maml mmaml kml-maml protonet kml-protonet --modes omniglot miniimagenet FC100 \\
                --setups 5w1s 5w5s --seeds 0 1 2                          # the published schedules: a GPU's work
    kml-results --methods kml-maml bare=kml-maml,kml_form=bare --baseline kml-maml ...   # an ablation
    kml-results --methods protonet mine=kml-protonet,network=my_pkg.nets:Net,network_args='{"width":64}' ...

A method is a recipe (kml-train --recipe) or LABEL=RECIPE,key=value,... Writes <out>/results.md, results.csv,
differences.csv, episodes.csv and results.png; the same command again continues where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kml.cli.common import ArgumentParser, as_command
from kml.config.checks import SEED, check_number
from kml.errors import KMLError, exit_on_kml_error
from kml.runtime.threads import configure_threads

__all__ = ["build_parser", "DEFAULT_METHODS", "main"]

DEFAULT_METHODS = ["maml", "mmaml", "kml-maml", "protonet", "kml-protonet"]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="kml-results", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        metavar="METHOD",
        help=f"recipes or LABEL=RECIPE,key=value,... (default: {' '.join(DEFAULT_METHODS)})",
    )
    parser.add_argument("--modes", nargs="+", default=["synthetic"], metavar="MODE", help="modes mixed in every run")
    parser.add_argument(
        "--setups", nargs="+", default=["5w1s"], metavar="NwKs", help="ways and shots, e.g. 5w1s 5w5s 20w1s"
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (>= 2 for intervals over seeds)"
    )
    parser.add_argument(
        "--steps", type=int, help="outer steps of every run (default: each recipe's published schedule)"
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        dest="common",
        help="kml-train values for every run, e.g. image_size=32 base_channels=16 meta_batch=6",
    )
    parser.add_argument("--episodes", type=int, default=600, help="meta-test episodes per mode and run")
    parser.add_argument(
        "--eval-seed", type=int, default=0, help="seed of the fixed meta-test episodes (same for every run)"
    )
    parser.add_argument("--baseline", help="method the paired differences are taken against (default: the first)")
    parser.add_argument("--data-root", help="dataset cache folder (default: kml-train's)")
    parser.add_argument("--out", default="train_dir/results", help="folder of the runs and the tables")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return parser


@exit_on_kml_error
def main(argv: list[str] | None = None) -> int:
    configure_threads()  # before torch loads OpenMP
    args = build_parser().parse_args(argv)
    from kml.results.runs import Method, Setup, parse_assignments, plan

    methods = [Method.parse(text) for text in args.methods]
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise KMLError(f"two methods share a label in {labels}; name them LABEL=RECIPE,...")
    baseline = args.baseline or labels[0]
    if baseline not in labels:
        raise KMLError(f"--baseline {baseline} is not one of the methods {labels}")
    setups = [Setup.parse(text) for text in args.setups]
    for seed in args.seeds:  # a seed kml-train refuses is refused here, before any run folder is named after it
        check_number("--seeds", seed, SEED)
    if len(set(args.seeds)) != len(args.seeds):
        raise KMLError(f"--seeds {args.seeds} repeats a seed")
    if args.episodes < 2 or (args.steps is not None and args.steps < 1):
        raise KMLError("--episodes must be at least 2 and --steps at least 1")
    common = parse_assignments(args.common, "--set") | ({"data_root": args.data_root} if args.data_root else {})

    import pandas as pd

    from kml.config.recipes import recipe_values
    from kml.data.modes import expand_modes
    from kml.results import plots, runs, table
    from kml.results.published import published_rows
    from kml.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    modes = expand_modes(args.modes)
    out = Path(args.out)
    rows = []
    todo = list(plan(out, setups, methods, args.seeds))
    for number, run in enumerate(todo, 1):
        given = {**common, **run.method.overrides, "ways": run.setup.ways, "modes": modes}
        steps = run.method.overrides.get("steps", args.steps) or recipe_values(run.method.recipe, given)["steps"]
        which = f"[{number}/{len(todo)}] {run.setup.tag} {run.method.label} seed {run.seed}"
        print(which, flush=True)  # a line of its own: training prints its validations below it
        done, step = _train(run, modes, int(steps), common, args.progress)
        report = runs.evaluate(run, step, args.episodes, args.eval_seed, args.progress)
        average = next(r["accuracy"] for r in report["results"] if r["mode"] == "average")
        print(f"{which}: {done}, step {report['step']}, average {average:.2f}%", flush=True)
        rows += runs.episode_rows(run, report)

    episodes = pd.DataFrame(rows)
    summary = table.summary(episodes)
    differences = table.paired_differences(episodes, baseline)
    published = {s.tag: published_rows(modes, s.ways, s.shots) for s in setups}
    text = table.markdown(summary, differences, published, modes)
    out.mkdir(parents=True, exist_ok=True)
    episodes.to_csv(out / "episodes.csv", index=False)
    summary.to_csv(out / "results.csv", index=False)
    differences.to_csv(out / "differences.csv", index=False)
    (out / "results.md").write_text(text)
    plots.bar_chart(summary, modes, out / "results.png")
    print(text)
    print(f"written: {out}/results.md, results.csv, differences.csv, episodes.csv, results.png")
    return 0


def _train(run, modes: list[str], steps: int, common: dict, progress: bool) -> tuple[str, int]:
    """:func:`kml.results.runs.train`; a stop shows kml-train's error line first, then the run's."""
    from kml.results import runs

    try:
        return runs.train(run, modes, steps, common, progress)
    except runs.TrainingStopped as stopped:
        if stopped.cause is not None:  # its runs are kml-train's: advice to continue one is its command
            print(f"error: {as_command(stopped.cause)}", file=sys.stderr)
        raise KMLError(str(stopped)) from None


if __name__ == "__main__":
    sys.exit(main())
