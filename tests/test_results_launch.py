"""kml-results with its runs as submitit jobs: local jobs give the inline table, a preempted job is requeued and
ends as if never interrupted, a failed job is reported and the rest finish, a rerun submits nothing, and the Slurm
path writes the sbatch script it should (a fake sbatch records it)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_results import TINY as RESULTS_TINY

from kml.cli import results as results_cli

pytest.importorskip("submitit")

# the grid tests' tiny settings, with an even meta-batch: two DDP ranks split it
TINY = [*(setting for setting in RESULTS_TINY if not setting.startswith("meta_batch=")), "meta_batch=2"]


def argv(tmp_path: Path, out: str, methods: list[str], *more: str, steps: int = 3, common=TINY) -> list[str]:
    return [
        "--methods",
        *methods,
        "--seeds",
        "0",
        "--steps",
        str(steps),
        "--episodes",
        "4",
        "--out",
        str(tmp_path / out),
        "--data-root",
        str(tmp_path / "data"),
        "--no-progress",
        *more,
        "--set",
        *common,
    ]


def test_local_jobs_give_the_inline_table_and_a_rerun_submits_nothing(tmp_path, capsys):
    methods = ["kml-maml", "protonet"]
    assert results_cli.main(argv(tmp_path, "inline", methods)) == 0
    assert (
        results_cli.main(argv(tmp_path, "local", methods, "--launcher", "local", "--jobs", "2", "--poll", "0.2")) == 0
    )
    first = capsys.readouterr().out
    assert first.count("submitted 5w1s") == 2 and "2 runs: 2 done" in first
    for name in ("results.csv", "episodes.csv", "differences.csv"):  # the same numbers, to the last digit
        pd.testing.assert_frame_equal(
            pd.read_csv(tmp_path / "inline" / name), pd.read_csv(tmp_path / "local" / name), check_exact=True
        )
    record = json.loads((tmp_path / "local" / "runs" / "5w1s" / "protonet" / "seed0.job.json").read_text())
    assert record["launcher"] == "local" and Path(record["log"]).is_file()
    jobs = sorted((tmp_path / "local" / "jobs").iterdir())
    # again: nothing submitted, the table written from the runs' reports
    assert results_cli.main(argv(tmp_path, "local", methods, "--launcher", "local", "--jobs", "2")) == 0
    again = capsys.readouterr().out
    assert "nothing to submit" in again and "submitted" not in again and "| protonet |" in again
    assert sorted((tmp_path / "local" / "jobs").iterdir()) == jobs
    # --status: where each run stands, with its job and log
    assert results_cli.main(argv(tmp_path, "local", methods, "--launcher", "local", "--status")) == 0
    status = capsys.readouterr().out
    assert f"5w1s protonet seed0  done   3     {record['job_id']}" in status and record["log"] in status


def test_two_tasks_per_run_are_one_ddp_run_with_the_single_process_numbers(tmp_path, capsys):
    """--gpus-per-run 2 on the CPU: each job is two gloo ranks over kml's distributed path (its GPU twin is
    tasks_per_node=2 under Slurm, checked in the sbatch script below)."""
    assert results_cli.main(argv(tmp_path, "inline", ["protonet"])) == 0
    ddp = argv(tmp_path, "ddp", ["protonet"], "--launcher", "local", "--gpus-per-run", "2", "--poll", "0.2")
    assert results_cli.main(ddp) == 0
    capsys.readouterr()
    job = json.loads((tmp_path / "ddp" / "runs" / "5w1s" / "protonet" / "seed0.job.json").read_text())
    assert "global_rank=1(2)" in Path(job["log"].replace("_0_log", "_1_log")).read_text()  # the second rank ran
    inline, ours = (pd.read_csv(tmp_path / name / "episodes.csv") for name in ("inline", "ddp"))
    pd.testing.assert_frame_equal(inline, ours, check_exact=True)


def test_a_misspelt_setting_is_refused_before_any_run_trains_or_is_queued(tmp_path, capsys):
    methods = ["protonet", "broken=protonet,no_such_setting=1"]
    for launcher in ("inline", "local"):
        with pytest.raises(SystemExit) as stopped:
            results_cli.main(argv(tmp_path, launcher, methods, "--launcher", launcher))
        assert stopped.value.code == 2
        assert capsys.readouterr().err == "error: broken 5w1s seed 0: unknown settings ['no_such_setting']\n"
        assert not (tmp_path / launcher / "runs").exists() and not (tmp_path / launcher / "jobs").exists()


def test_a_failed_job_is_reported_with_its_error_and_the_others_finish(tmp_path, capsys):
    methods = ["protonet", "broken=protonet,data_root=/dev/null/data"]  # settings fine, fails when it loads data
    args = argv(tmp_path, "out", methods, "--launcher", "local", "--jobs", "2", "--poll", "0.2")
    with pytest.raises(SystemExit):
        results_cli.main(args)
    captured = capsys.readouterr()
    assert "1 of 2 runs failed" in captured.err
    lines = captured.out.splitlines()
    broken = next(i for i, line in enumerate(lines) if line.startswith("5w1s broken seed0"))
    assert "failed" in lines[broken] and "/dev/null/data" in lines[broken + 1]
    assert any(line.startswith("5w1s protonet seed0") and " done " in line for line in lines)
    assert not (tmp_path / "out" / "results.md").exists()  # the table waits for every run
    # a rerun submits only the failed run
    with pytest.raises(SystemExit):
        results_cli.main(args)
    out = capsys.readouterr().out
    assert out.count("submitted") == 1 and "submitted 5w1s broken seed 0" in out


def _wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_a_preempted_job_is_requeued_and_ends_as_the_uninterrupted_run(tmp_path, capsys):
    common = [*TINY, "val_every=30", "checkpoint_every=5"]
    steps = 60
    assert results_cli.main(argv(tmp_path, "inline", ["protonet"], steps=steps, common=common)) == 0
    run = tmp_path / "local" / "runs" / "5w1s" / "protonet"
    outcome = {}

    def grid() -> None:
        args = argv(tmp_path, "local", ["protonet"], "--launcher", "local", "--poll", "0.1", steps=steps, common=common)
        outcome["status"] = results_cli.main(args)

    submitter = threading.Thread(target=grid)
    submitter.start()
    try:  # the requeue signal once training is under way (its first periodic checkpoint written)
        _wait_for(lambda: (run / "seed0" / "checkpoints" / "step_000005.pt").is_file(), "the first checkpoint")
        pid = json.loads((run / "seed0.state.json").read_text())["pid"]
        os.kill(pid, signal.SIGUSR2)
    finally:
        submitter.join(timeout=300)
    assert outcome == {"status": 0}
    log = (run / "seed0" / "log.txt").read_text()
    stopped = int(log.split("stopped by signal 12 at step ")[1].split(";")[0])
    assert 5 <= stopped < steps and f"at step {stopped}" in log.split("resumed")[1]
    job = json.loads((run / "seed0.job.json").read_text())
    assert "Requeued job" in Path(job["log"]).read_text()
    # the same parameters and the same evaluation as the run never interrupted
    ours = torch.load(run / "seed0" / "checkpoints" / "last.pt", weights_only=False)
    theirs = torch.load(
        tmp_path / "inline" / "runs" / "5w1s" / "protonet" / "seed0" / "checkpoints" / "last.pt", weights_only=False
    )
    assert ours["step"] == theirs["step"] == steps
    assert ours["model"].keys() == theirs["model"].keys()
    for name, tensor in ours["model"].items():
        assert torch.equal(tensor, theirs["model"][name]), name
    reports = [
        json.loads((folder / "seed0" / "results_eval.json").read_text())
        for folder in (run, tmp_path / "inline" / "runs" / "5w1s" / "protonet")
    ]
    assert reports[0]["episode_accuracy"] == reports[1]["episode_accuracy"]
    capsys.readouterr()


def test_a_job_stopped_by_sigterm_keeps_its_steps_and_a_rerun_continues_it(tmp_path, capsys):
    common = [*TINY, "val_every=30", "checkpoint_every=5"]
    args = argv(tmp_path, "out", ["protonet"], "--launcher", "local", "--poll", "0.1", steps=60, common=common)
    run = tmp_path / "out" / "runs" / "5w1s" / "protonet"
    outcome = {}

    def grid() -> None:
        try:
            results_cli.main(args)
        except SystemExit as stop:
            outcome["exit"] = stop.code

    submitter = threading.Thread(target=grid)
    submitter.start()
    try:
        _wait_for(lambda: (run / "seed0" / "checkpoints" / "step_000005.pt").is_file(), "the first checkpoint")
        os.kill(json.loads((run / "seed0.state.json").read_text())["pid"], signal.SIGTERM)
    finally:
        submitter.join(timeout=300)
    assert outcome == {"exit": 2}
    table = capsys.readouterr().out
    assert "5w1s protonet seed0  failed" in table and "stopped (exit 130)" in table
    stopped = int((run / "seed0" / "log.txt").read_text().split("stopped by signal 15 at step ")[1].split(";")[0])
    assert results_cli.main(args) == 0  # the rerun resumes the run where the signal left it
    assert f"resumed {run / 'seed0'} at step {stopped}" in (run / "seed0" / "log.txt").read_text()
    assert "1 run: 1 done" in capsys.readouterr().out


FAKE_SBATCH = """#!/bin/sh
mkdir -p "$FAKE_SLURM"
echo "$@" > "$FAKE_SLURM/argv"
cp "$1" "$FAKE_SLURM/script.sh"
echo "Submitted batch job 1234"
"""

FAKE_SACCT = """#!/bin/sh
echo "JobID|State|NodeList"
echo "1234_0|RUNNING|node1"
echo "1234_1|FAILED|node2"
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def test_slurm_submits_a_job_array_with_the_resources_asked(tmp_path, capsys, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", "#!/bin/sh\nexit 1\n")):
        _executable(bin_dir / name, text)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(tmp_path / "slurm"))
    options = tmp_path / "sbatch.txt"
    options.write_text("# our cluster\n--qos=high\n#SBATCH --constraint=a100\n")
    slurm = [
        "--launcher",
        "slurm",
        "--slurm-partition",
        "gpu",
        "--slurm-account",
        "lab",
        "--timeout-min",
        "720",
        "--gpus-per-run",
        "2",
        "--cpus-per-run",
        "16",
        "--mem-per-run",
        "64G",
        "--slurm-array-parallelism",
        "1",
        "--slurm-options",
        str(options),
        "--no-wait",
    ]
    args = argv(tmp_path, "out", ["kml-maml", "protonet"], *slurm)
    assert results_cli.main(args) == 0
    out = capsys.readouterr().out
    assert "submitted 5w1s kml-maml seed 0: slurm job 1234_0" in out and "slurm job 1234_1" in out
    script = (tmp_path / "slurm" / "script.sh").read_text()
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        "#SBATCH --time=720",
        "#SBATCH --nodes=1",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --ntasks-per-node=2",  # one DDP process per GPU
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64G",
        "#SBATCH --array=0-1%1",
        "#SBATCH --signal=USR2@90",  # the requeue signal, 90 s before the end
        "#SBATCH --qos=high",
        "#SBATCH --constraint=a100",
        "-m submitit.core._submit",
    ):
        assert line in script, line
    # each array task runs one run's RunJob
    submitted = [tmp_path / "out" / "jobs" / f"1234_{i}" / f"1234_{i}_submitted.pkl" for i in (0, 1)]
    folders = [pickle.loads(path.read_bytes()).function.run.folder for path in submitted]
    assert folders == [tmp_path / "out" / "runs" / "5w1s" / m / "seed0" for m in ("kml-maml", "protonet")]
    # --status asks sacct: the one running, the other failed with its log's last line
    _executable(bin_dir / "sacct", FAKE_SACCT)
    log = tmp_path / "out" / "jobs" / "1234_1" / "1234_1_0_log.out"
    log.write_text("submitit INFO (...) - Starting\nRuntimeError: CUDA error: an illegal memory access\n")
    assert results_cli.main([*args, "--status"]) == 0
    status = capsys.readouterr().out
    assert "5w1s kml-maml seed0  running  -     1234_0" in status
    assert "5w1s protonet seed0  failed   -     1234_1" in status
    assert "    error: RuntimeError: CUDA error: an illegal memory access" in status
    # a rerun submits only the failed one (and reports the one still running)
    assert results_cli.main(args) == 0
    assert "submitted 5w1s protonet seed 0: slurm job 1234" in capsys.readouterr().out
    assert "--array" not in (tmp_path / "slurm" / "script.sh").read_text()  # one job alone is not an array


def test_bad_launch_flags_are_one_line(tmp_path, capsys):
    for extra, message in (
        (["--jobs", "2"], "--jobs: not for --launcher inline"),
        (["--launcher", "local", "--no-wait"], "--no-wait is for --launcher slurm"),
        (["--launcher", "slurm"], "needs --timeout-min"),
        (["--gpus-per-run", "2"], "needs --launcher local or slurm"),
        (["--launcher", "local", "--devices", "gpu0"], "--devices gpu0"),
    ):
        with pytest.raises(SystemExit):
            results_cli.main(argv(tmp_path, "out", ["protonet"], *extra))
        assert message in capsys.readouterr().err
