"""The runs behind a results table: one ``kml-train`` run per (setup, method, seed), then one ``kml-eval``.

Runs live under ``<out>/runs/<setup>/<method>/seed<k>/`` as ordinary kml run folders. A finished run is reused,
an interrupted one resumed, a folder without a checkpoint started again; an evaluation is reused when its
episodes, seed and training step match. So the same command continues where it stopped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kml.config import upgrade_field_names
from kml.errors import KMLError

__all__ = ["episode_rows", "evaluate", "Method", "parse_assignments", "plan", "Run", "Setup", "train"]


def parse_assignments(pairs: list[str], where: str) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{key: value}`` (keys with ``_`` for ``-``; values read as JSON where they parse)."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise KMLError(f"{where}: {pair!r} is not key=value")
        try:
            values[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            values[key.replace("-", "_")] = value
    return values


@dataclass(frozen=True)
class Method:
    """A row of the table: a recipe (``kml-train --recipe``) and values that override it.

    Written ``RECIPE`` or ``LABEL=RECIPE,key=value,...`` (values read as JSON where they parse,
    e.g. ``kml-bare=kml-maml,kml_form=bare`` or ``long=kml-maml,steps=2000``).
    """

    label: str
    recipe: str
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Method:
        from kml.recipes import recipe

        label, sep, rest = text.partition("=")
        if not sep:
            label, rest = text, text
        name, *pairs = rest.split(",")
        recipe(name)  # a one-line error for an unknown recipe
        overrides = parse_assignments(pairs, f"method {text!r}")
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", label):
            raise KMLError(f"method label {label!r} must be letters, digits and . _ + - (it names a folder)")
        return cls(label, name, overrides)


@dataclass(frozen=True)
class Setup:
    """N-way K-shot, written ``5w1s``."""

    ways: int
    shots: int

    @classmethod
    def parse(cls, text: str) -> Setup:
        match = re.fullmatch(r"(\d+)w(\d+)s", text)
        if not match or int(match[1]) < 2 or int(match[2]) < 1:
            raise KMLError(f"setup {text!r} must look like 5w1s (ways >= 2, shots >= 1)")
        return cls(int(match[1]), int(match[2]))

    @property
    def tag(self) -> str:
        return f"{self.ways}w{self.shots}s"


@dataclass(frozen=True)
class Run:
    setup: Setup
    method: Method
    seed: int
    folder: Path

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoints" / "last.pt"

    @property
    def evaluation(self) -> Path:
        return self.folder / "results_eval.json"


def plan(out: Path, setups: list[Setup], methods: list[Method], seeds: list[int]) -> Iterator[Run]:
    for setup in setups:
        for method in methods:
            for seed in seeds:
                yield Run(setup, method, seed, out / "runs" / setup.tag / method.label / f"seed{seed}")


def _trained_step(run: Run) -> int | None:
    """The step of the run's last checkpoint, or None when it has none."""
    if not run.checkpoint.is_file():
        return None
    from kml.training.checkpoint import load_checkpoint

    return int(load_checkpoint(run.checkpoint)["step"])


def train(run: Run, modes: list[str], steps: int, common: Mapping[str, Any], progress: bool) -> tuple[str, int]:
    """Make sure ``run`` is trained to ``steps``; returns what was done (trained, resumed, reused) and the step
    of its last checkpoint now."""
    from kml.cli import train as train_cli

    values = {
        **common,
        **run.method.overrides,
        "modes": modes,
        "ways": run.setup.ways,
        "shots": run.setup.shots,
        "seed": run.seed,
    }
    request = run.folder.parent / f"{run.folder.name}.request.json"
    step = _trained_step(run)
    if step is not None:  # a run made before: only with the same settings (the step budget may grow)
        made = upgrade_field_names(json.loads(request.read_text())) if request.is_file() else {}  # names before 0.2 too
        made.pop("steps", None)
        changed = sorted(k for k in {*made, *values} if made.get(k) != values.get(k))
        if changed:
            raise KMLError(
                f"{run.folder} was trained with other settings ({', '.join(changed)}); "
                f"use another --out, or delete that run folder to train it again"
            )
    if step is not None and step >= steps:
        return "reused", step
    location = [
        "--train-dir",
        str(run.folder.parent),
        "--run-name",
        run.folder.name,
        *([] if progress else ["--no-progress"]),
    ]
    if step is not None:
        argv, done = ["--resume", "--steps", str(steps), *location], "resumed"
    else:
        run.folder.parent.mkdir(parents=True, exist_ok=True)
        request.write_text(json.dumps({**values, "steps": steps}, indent=2))
        overwrite = ["--overwrite"] if run.folder.exists() else []  # killed before its first checkpoint
        argv, done = ["--recipe", run.method.recipe, "--config", str(request), *overwrite, *location], "trained"
    try:
        status = train_cli.main(argv)
    except SystemExit as stop:
        status = stop.code
    if status != 0:
        raise KMLError(
            f"training {run.method.label} {run.setup.tag} seed {run.seed} stopped (exit {status}); "
            f"see {run.folder / 'log.txt'} and rerun the same command to continue"
        )
    return done, steps


def evaluate(run: Run, step: int, episodes: int, eval_seed: int, progress: bool) -> dict[str, Any]:
    """The run's ``kml-eval`` report on meta-test episodes, reused when episodes, seed and ``step`` (that of
    its last checkpoint, as :func:`train` returns it) match."""
    from kml.cli import evaluate as eval_cli

    if run.evaluation.is_file():
        report = json.loads(run.evaluation.read_text())
        if (report.get("episodes_per_mode"), report.get("seed"), report.get("step")) == (episodes, eval_seed, step):
            return report
    argv = [
        "--checkpoint",
        str(run.checkpoint),
        "--episodes",
        str(episodes),
        "--seed",
        str(eval_seed),
        "--output",
        str(run.evaluation),
        *([] if progress else ["--no-progress"]),
    ]
    try:
        status = eval_cli.main(argv)
    except SystemExit as stop:
        status = stop.code
    if status != 0:
        raise KMLError(f"evaluating {run.checkpoint} failed (exit {status})")
    return json.loads(run.evaluation.read_text())


def episode_rows(run: Run, report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Tidy rows (setup, method, seed, mode, episode, accuracy) of one evaluation report."""
    return [
        {
            "setup": run.setup.tag,
            "method": run.method.label,
            "seed": run.seed,
            "mode": mode,
            "episode": index,
            "accuracy": value,
        }
        for mode, values in report["episode_accuracy"].items()
        for index, value in enumerate(values)
    ]
