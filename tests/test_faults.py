"""Fault injection (issue 18): kill -9 a tiny run at random points, checkpoint writes included, and resume.

Every kill is followed by the command the run's own messages advise (``--resume``, or ``--overwrite``
when the run died before its first checkpoint). At the end the run folder must be what an
uninterrupted run writes: metrics rows 1..steps once each, validation rows once, a loadable
``last.pt`` at the last step, no temporary or lock files; nothing lost beyond the steps since
the last checkpoint, which are trained again identically.
"""

from __future__ import annotations

import csv
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_training import tiny_args

from kml.training.checkpoint import load_checkpoint

STEPS = 24  # the default test; the slow one trains longer so that kills land all along the run
EVERY = 4
FLAGS = ("--checkpoint-every", str(EVERY), "--log-every", "1", "--val-every", "8")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: the reference and the resumed runs sum in one order


def command(tmp_path: Path, name: str, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kml.cli.train", *tiny_args(tmp_path, *FLAGS, *extra, steps=steps, name=name)]


def rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [{k: v for k, v in row.items() if k != "time"} for row in csv.DictReader(handle)]


def temp_files(run: Path) -> list[Path]:
    return [p for p in run.rglob(".*") if ".tmp-" in p.name]


def kill_at(process: subprocess.Popen, run: Path, kind: str, rng: random.Random) -> bool:
    """Kill -9 ``process`` at a point chosen by ``kind``; True if it was still running then."""
    deadline = time.time() + 60
    if kind == "checkpoint":  # inside a checkpoint write: its temporary file exists
        checkpoints = run / "checkpoints"
        while time.time() < deadline and process.poll() is None:
            try:
                if any(".tmp-" in name for name in os.listdir(checkpoints)):
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.0005)
    elif kind == "training":  # somewhere in the training loop
        while time.time() < deadline and process.poll() is None and not (run / "metrics.csv").is_file():
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.5))
    else:  # anywhere from the start: imports, data, run creation, step-0 checkpoint
        time.sleep(rng.uniform(0.5, 6.0))
    alive = process.poll() is None
    if alive:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return alive


def check_at_rest(run: Path) -> int:
    """What must hold after any kill: a loadable last.pt if any, no metrics step twice, at most the steps since
    the last checkpoint lost. Returns how many logged steps the next resume trains again."""
    last = run / "checkpoints" / "last.pt"
    saved = load_checkpoint(last)["step"] if last.is_file() else 0  # raises on a truncated, corrupt or non-finite one
    steps = [int(row["step"]) for row in rows(run / "metrics.csv")]
    assert len(steps) == len(set(steps)), steps
    lost = max(steps, default=0) - saved
    assert lost <= EVERY, (saved, steps)
    return max(lost, 0)


def inject(tmp_path: Path, kills: int, seed: int, kinds: tuple[str, ...], steps: int = STEPS) -> dict[str, int]:
    """Run, kill -9 ``kills`` times (resuming as advised each time), finish; return the figures."""
    rng = random.Random(seed)
    run = tmp_path / "train_dir" / "faulty"
    figures = {
        "kills": 0,
        "killed_alive": 0,
        "in_checkpoint_write": 0,
        "resumed": 0,
        "restarted": 0,
        "steps_retrained": 0,
    }
    for attempt in range(kills + 1):
        extra: tuple[str, ...] = ()
        if attempt:
            extra = ("--resume",) if (run / "checkpoints" / "last.pt").is_file() else ("--overwrite",)
            figures["resumed" if extra == ("--resume",) else "restarted"] += 1
        process = subprocess.Popen(
            command(tmp_path, "faulty", steps, *extra),
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if attempt == kills:  # the last one runs to the end
            _, err = process.communicate(timeout=300)
            assert process.returncode == 0, err[-2000:]
            break
        kind = kinds[attempt % len(kinds)]
        alive = kill_at(process, run, kind, rng)
        err = process.stderr.read()
        assert process.returncode in (-signal.SIGKILL, 0), err[-2000:]  # never an error line
        figures["kills"] += 1
        figures["killed_alive"] += alive
        figures["in_checkpoint_write"] += alive and kind == "checkpoint"
        figures["steps_retrained"] += check_at_rest(run)
    return figures


def check_finished(run: Path, reference: Path, steps: int = STEPS) -> None:
    got, want = rows(run / "metrics.csv"), rows(reference / "metrics.csv")
    assert [int(r["step"]) for r in got] == list(range(1, steps + 1))  # continuous, no duplicates
    for a, b in zip(got, want):
        for key in b:
            if b[key] and key != "step":
                assert math.isclose(float(a[key]), float(b[key]), rel_tol=1e-4, abs_tol=1e-6), (a, b)
    validation = [(r["step"], r["mode"]) for r in rows(run / "validation.csv")]
    assert validation == [(r["step"], r["mode"]) for r in rows(reference / "validation.csv")]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == steps
    assert not temp_files(run)
    assert sorted(p.name for p in run.parent.iterdir() if p.name.startswith(".")) == []  # no lock, nothing set aside


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of ``steps`` steps (made once per length)."""
    made: dict[int, Path] = {}

    def run(steps: int) -> Path:
        if steps not in made:
            tmp = tmp_path_factory.mktemp("reference")
            subprocess.run(command(tmp, "reference", steps), env=ENV, check=True, capture_output=True, timeout=300)
            made[steps] = tmp / "train_dir" / "reference"
        return made[steps]

    return run


def test_kill_9_at_random_points_then_resume(tmp_path, reference):
    """Three kills (at start-up, in the training loop, inside a checkpoint write), each resumed as advised."""
    figures = inject(tmp_path, kills=3, seed=0, kinds=("startup", "training", "checkpoint"))
    print(figures)
    check_finished(tmp_path / "train_dir" / "faulty", reference(STEPS))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_kill_9_many_times_then_resume(tmp_path, reference, seed):
    """Twelve kills in a 96-step run at random points of all three kinds."""
    figures = inject(tmp_path, kills=12, seed=seed, kinds=("training", "checkpoint", "startup", "checkpoint"), steps=96)
    print(figures)
    check_finished(tmp_path / "train_dir" / "faulty", reference(96), steps=96)
