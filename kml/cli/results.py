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

Runs as jobs (pip install -e ".[cluster]"): each run trains and is evaluated in a job of its own; a preempted job
is requeued and resumes from its last checkpoint; a rerun submits only the runs missing or failed.

    kml-results ... --launcher slurm --slurm-partition gpu --gpus-per-run 1 --timeout-min 720   # a job array
    kml-results ... --launcher local --jobs 4 --devices cuda:0 cuda:1 cuda:2 cuda:3             # one per GPU
    kml-results ... --status                                             # where each run stands, with its log
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kml.cli.common import ArgumentParser, as_command
from kml.config.checks import SEED, check_number
from kml.errors import KMLError, exit_on_kml_error
from kml.runtime.threads import configure_threads

if TYPE_CHECKING:
    from kml.results.launchers import LaunchOptions
    from kml.results.runs import Run
    from kml.results.status import RunStatus

__all__ = ["build_parser", "DEFAULT_METHODS", "main"]

DEFAULT_METHODS = ["maml", "mmaml", "kml-maml", "protonet", "kml-protonet"]
LAUNCHERS = ("inline", "local", "slurm")


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
    jobs = parser.add_argument_group("runs as jobs (submitit)")
    jobs.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="inline",
        help="inline: one run after another in this process (default); local: a process per run on this machine; "
        "slurm: a Slurm job per run",
    )
    jobs.add_argument("--status", action="store_true", help="print where each run stands (submits nothing)")
    jobs.add_argument(
        "--no-wait", dest="wait", action="store_false", help="slurm: submit and exit (rerun to write the table)"
    )
    jobs.add_argument(
        "--gpus-per-run", type=int, default=1, metavar="K", help="GPUs of each run; K > 1: a DDP run of K processes"
    )
    jobs.add_argument(
        "--jobs", type=int, metavar="N", help="local: runs at a time (default: one per GPU group, else 1)"
    )
    jobs.add_argument(
        "--devices", nargs="+", metavar="DEVICE", help="local: cuda:0 cuda:1 ... or cpu (default: every GPU, else cpu)"
    )
    jobs.add_argument(
        "--timeout-min", type=int, metavar="MIN", help="slurm (required): a job's time limit; longer runs are requeued"
    )
    jobs.add_argument("--slurm-partition", metavar="NAME", help="slurm: partition")
    jobs.add_argument("--slurm-account", metavar="NAME", help="slurm: account")
    jobs.add_argument("--cpus-per-run", type=int, metavar="N", help="slurm: CPUs of each run")
    jobs.add_argument("--mem-per-run", metavar="MEM", help="slurm: memory of each run, e.g. 32G")
    jobs.add_argument("--slurm-array-parallelism", type=int, metavar="N", help="slurm: runs of the array at a time")
    jobs.add_argument(
        "--slurm-options", metavar="FILE", help="slurm: extra sbatch options, one a line (--qos=high, #SBATCH ...)"
    )
    jobs.add_argument(
        "--poll", type=float, metavar="SECONDS", help="seconds between looks at the jobs (local 2, slurm 60)"
    )
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

    launch = _launch_options(args)
    from kml.config.recipes import recipe_values
    from kml.data.modes import expand_modes
    from kml.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    modes = expand_modes(args.modes)
    out = Path(args.out)
    todo = list(plan(out, setups, methods, args.seeds))
    steps = {}
    for run in todo:  # each recipe's published schedule unless --steps (or the method's own steps=)
        given = {**common, **run.method.overrides, "ways": run.setup.ways, "modes": modes}
        steps[run.folder] = int(
            run.method.overrides.get("steps", args.steps) or recipe_values(run.method.recipe, given)["steps"]
        )
    if args.status:
        print(_status_table(todo, steps, args, out))
        return 0
    from kml.results.runs import check_settings

    for run in todo:  # every run's settings before the first trains or is queued
        check_settings(run, modes, steps[run.folder], common)
    if launch is None:
        rows = _run_inline(todo, steps, modes, common, args, out)
    else:
        finished = _run_as_jobs(todo, steps, modes, common, args, launch, out)
        if finished is None:
            return 0
        rows = finished
    _write_tables(rows, setups, modes, baseline, out)
    return 0


def _run_inline(
    todo: list[Run],
    steps: dict[Path, int],
    modes: list[str],
    common: dict[str, Any],
    args: argparse.Namespace,
    out: Path,
) -> list[dict[str, Any]]:
    """Train and evaluate the runs one after another in this process; their episode rows."""
    from kml.results import runs

    rows = []
    try:
        for number, run in enumerate(todo, 1):
            which = f"[{number}/{len(todo)}] {run.setup.tag} {run.method.label} seed {run.seed}"
            print(which, flush=True)  # a line of its own: training prints its validations below it
            done, step = _train(run, modes, steps[run.folder], common, args.progress)
            report = runs.evaluate(run, step, args.episodes, args.eval_seed, args.progress)
            average = next(r["accuracy"] for r in report["results"] if r["mode"] == "average")
            print(f"{which}: {done}, step {report['step']}, average {average:.2f}%", flush=True)
            rows += runs.episode_rows(run, report)
    finally:
        print(_status_table(todo, steps, args, out), flush=True)
    return rows


def _launch_options(args: argparse.Namespace) -> LaunchOptions | None:
    """The jobs' :class:`~kml.results.launchers.LaunchOptions` (``None`` for inline), flags checked for the launcher."""
    slurm_only = {
        "--timeout-min": args.timeout_min,
        "--slurm-partition": args.slurm_partition,
        "--slurm-account": args.slurm_account,
        "--cpus-per-run": args.cpus_per_run,
        "--mem-per-run": args.mem_per_run,
        "--slurm-array-parallelism": args.slurm_array_parallelism,
        "--slurm-options": args.slurm_options,
    }
    local_only = {"--jobs": args.jobs, "--devices": args.devices}
    wrong = [flag for flag, value in slurm_only.items() if value is not None and args.launcher != "slurm"]
    wrong += [flag for flag, value in local_only.items() if value is not None and args.launcher != "local"]
    if args.timeout_min is not None and args.launcher == "local":
        wrong.remove("--timeout-min")  # a local job's time limit too
    if wrong:
        raise KMLError(f"{' '.join(wrong)}: not for --launcher {args.launcher}")
    if not args.wait and args.launcher != "slurm":
        raise KMLError("--no-wait is for --launcher slurm (local jobs need this command to hand out their devices)")
    for flag, value in {"--gpus-per-run": args.gpus_per_run, "--jobs": args.jobs, "--poll": args.poll}.items():
        if value is not None and value <= 0:
            raise KMLError(f"{flag} must be positive")
    for flag, value in {"--timeout-min": args.timeout_min, "--cpus-per-run": args.cpus_per_run}.items():
        if value is not None and value < 1:
            raise KMLError(f"{flag} must be at least 1")
    if args.launcher == "inline":
        if args.gpus_per_run > 1:
            raise KMLError("--gpus-per-run above 1 needs --launcher local or slurm (or torchrun kml-train)")
        return None
    if args.launcher == "slurm" and args.timeout_min is None and not args.status:
        raise KMLError("--launcher slurm needs --timeout-min (at most the partition's limit; longer runs are requeued)")
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise KMLError(f'--launcher {args.launcher} needs submitit: pip install -e ".[cluster]"') from None
    from kml.results.launchers import LaunchOptions, read_sbatch_options

    devices = args.devices
    if args.launcher == "local" and devices is None:
        import torch

        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    return LaunchOptions(
        launcher=args.launcher,
        jobs=args.jobs,
        devices=devices or [],
        gpus_per_run=args.gpus_per_run,
        timeout_min=args.timeout_min,
        partition=args.slurm_partition,
        account=args.slurm_account,
        cpus_per_run=args.cpus_per_run,
        mem_per_run=args.mem_per_run,
        array_parallelism=args.slurm_array_parallelism,
        sbatch_options=read_sbatch_options(args.slurm_options) if args.slurm_options else {},
        poll_s=args.poll or (60.0 if args.launcher == "slurm" else 2.0),
    )


def _statuses(todo: list[Run], steps: dict[Path, int], args: argparse.Namespace, out: Path) -> list[RunStatus]:
    """Where each run stands (:func:`kml.results.status.run_status`), the scheduler asked about submitted jobs."""
    from kml.results.status import job_record, run_status

    records = [record for run in todo if (record := job_record(run)) is not None]
    scheduler = {}
    if records:
        from kml.results.launchers import jobs_folder, scheduler_states

        scheduler = scheduler_states(records, jobs_folder(out))
    return [run_status(run, steps[run.folder], args.episodes, args.eval_seed, scheduler) for run in todo]


def _status_table(todo: list[Run], steps: dict[Path, int], args: argparse.Namespace, out: Path) -> str:
    from kml.results.status import format_table

    return format_table(_statuses(todo, steps, args, out))


def _run_as_jobs(
    todo: list[Run],
    steps: dict[Path, int],
    modes: list[str],
    common: dict[str, Any],
    args: argparse.Namespace,
    launch: LaunchOptions,
    out: Path,
) -> list[dict[str, Any]] | None:
    """Submit the runs missing or failed as jobs, wait for every run (unless --no-wait), print where each stands;
    the table's episode rows when all are done, ``None`` when some are still queued or running (--no-wait)."""
    import time

    from kml.results import launchers, runs
    from kml.results.jobs import RunJob
    from kml.results.status import finished_report, format_table

    statuses = _statuses(todo, steps, args, out)
    again = [s.run for s in statuses if s.state in ("missing", "failed")]
    jobs = [RunJob(run, modes, steps[run.folder], dict(common), args.episodes, args.eval_seed) for run in again]

    def announce(job: RunJob, job_id: str) -> None:
        run = job.run
        print(f"submitted {run.setup.tag} {run.method.label} seed {run.seed}: {args.launcher} job {job_id}", flush=True)

    if not jobs:
        print("nothing to submit: every run is done, queued or running", flush=True)
    elif args.launcher == "local":
        launchers.submit_local(jobs, out, launch, announce)
    else:
        launchers.submit_slurm(jobs, out, launch, announce)
    statuses = _statuses(todo, steps, args, out)
    while args.wait and any(s.state in ("pending", "running") for s in statuses):
        time.sleep(launch.poll_s)  # runs submitted earlier, or queued on the cluster
        statuses = _statuses(todo, steps, args, out)
    print(format_table(statuses), flush=True)
    failed = [s for s in statuses if s.state == "failed"]
    if failed:
        raise KMLError(
            f"{len(failed)} of {len(todo)} runs failed (their last error line is in the table above, their logs "
            f"in {out}/jobs); fix the cause and rerun the same command: it submits only those"
        )
    if any(s.state != "done" for s in statuses):
        print("rerun the same command (or with --status) later: it writes the table once every run is done")
        return None
    reports = [finished_report(run, steps[run.folder], args.episodes, args.eval_seed) for run in todo]
    return [row for run, report in zip(todo, reports) for row in runs.episode_rows(run, report or {})]


def _write_tables(rows: list, setups: list, modes: list[str], baseline: str, out: Path) -> None:
    """results.md, results.csv, differences.csv, episodes.csv and results.png from the runs' episode rows."""
    import pandas as pd

    from kml.results import plots, table
    from kml.results.published import published_rows

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
