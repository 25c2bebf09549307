"""The runs behind a results table: one ``kml-train`` run per (setup, method, seed), then one ``kml-eval``.

Runs live under ``<out>/runs/<setup>/<method>/seed<k>/`` as ordinary kml run folders. A finished run is reused,
an interrupted one resumed, a folder without a checkpoint started again; an evaluation is reused when its
episodes, seed and training step match. So the same command continues where it stopped.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kml.config.learner import upgrade_field_names
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
        from kml.config.recipes import recipe

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
    from kml.cli.evaluate import checkpoint_step
    from kml.training.checkpoint import load_checkpoint

    return checkpoint_step(load_checkpoint(run.checkpoint), run.checkpoint)


def _read_json(path: Path) -> tuple[Any, str | None]:
    """``(value, None)``, or ``(None, what is wrong)`` when ``path`` is not readable JSON."""
    try:
        return json.loads(path.read_bytes().decode("utf-8")), None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return None, str(error).splitlines()[0]


def inert_common(method: Method, common: Mapping[str, Any], modes: list[str], ways: int) -> set[str]:
    """The --set values that do nothing for ``method`` (inner steps for ProtoNet, ...): left out of its runs, so
    that one --set serves every method of a table (kml-train refuses them when given to a run)."""
    from dataclasses import fields

    from kml.config.checks import inert_settings
    from kml.config.learner import LearnerConfig
    from kml.config.recipes import recipe_values

    values = recipe_values(method.recipe, {**common, **method.overrides, "ways": ways, "modes": modes})
    names = {f.name for f in fields(LearnerConfig)}
    learner = LearnerConfig(**{k: v for k, v in values.items() if k in names})
    return set(inert_settings(learner)) & set(common) - set(method.overrides)


def train(run: Run, modes: list[str], steps: int, common: Mapping[str, Any], progress: bool) -> tuple[str, int]:
    """Make sure ``run`` is trained to ``steps``; returns what was done (trained, resumed, reused) and the step
    of its last checkpoint now."""
    from kml.cli import train as train_cli

    left_out = inert_common(run.method, common, modes, run.setup.ways)
    values = {
        **{k: v for k, v in common.items() if k not in left_out},
        **run.method.overrides,
        "modes": modes,
        "ways": run.setup.ways,
        "shots": run.setup.shots,
        "seed": run.seed,
    }
    request = run.folder.parent / f"{run.folder.name}.request.json"
    step = _trained_step(run)
    if step is not None:  # a run made before: only with the same settings (the step budget may grow)
        made, problem = _read_json(request) if request.is_file() else ({}, None)
        if problem or not isinstance(made, dict):
            raise KMLError(
                f"{request} is corrupt ({problem or 'not a mapping of settings'}); it records how {run.folder} was "
                f"trained: delete both to train that run again, or use another --out"
            )
        made = upgrade_field_names(made)  # names before 0.2 too
        made.pop("steps", None)
        changed = sorted(k for k in {*made, *values} - left_out if made.get(k) != values.get(k))
        if changed:
            raise KMLError(
                f"{run.folder} was trained with other settings ({', '.join(changed)}); "
                f"use another --out, or delete that run folder to train it again"
            )
    if step is not None and step > steps:  # its last.pt is not the asked run: the rate schedule went on
        raise KMLError(
            f"{run.folder} is trained to step {step}, past the {steps} steps asked; ask --steps {step} (or more), "
            f"use another --out, or delete that run folder to train it to {steps}"
        )
    if step == steps:
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
        log = run.folder / "log.txt"
        where = f"see {log}" if log.is_file() else "see the error above"  # refused before the run folder was made
        raise KMLError(
            f"training {run.method.label} {run.setup.tag} seed {run.seed} stopped (exit {status}); "
            f"{where} and rerun the same command to continue"
        )
    return done, steps


def evaluate(run: Run, step: int, episodes: int, eval_seed: int, progress: bool) -> dict[str, Any]:
    """The run's ``kml-eval`` report on meta-test episodes, reused when episodes, seed and ``step`` (that of
    its last checkpoint, as :func:`train` returns it) match."""
    from kml.cli import evaluate as eval_cli

    if run.evaluation.is_file():
        report, problem = _read_json(run.evaluation)
        problem = problem or _report_problem(report)
        if problem:  # a report is only a cache of kml-eval's output: evaluate again
            print(f"warning: {run.evaluation} is broken ({problem}); evaluating again", file=sys.stderr)
        elif (report.get("episodes_per_mode"), report.get("seed"), report.get("step")) == (episodes, eval_seed, step):
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


def _report_problem(report: Any) -> str | None:
    """What makes ``report`` unusable as a kml-eval report, or None."""
    if not isinstance(report, dict):
        return f"a {type(report).__name__}, not a kml-eval report"
    results, episodes = report.get("results"), report.get("episode_accuracy")
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        return "no list of results"
    if not any(r.get("mode") == "average" and isinstance(r.get("accuracy"), (int, float)) for r in results):
        return "no average accuracy"
    if not isinstance(episodes, dict) or not all(isinstance(v, list) for v in episodes.values()):
        return "no per-episode accuracies"
    return None


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
