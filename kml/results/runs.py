"""The runs behind a results table: one ``kml-train`` run per (setup, method, seed), then one ``kml-eval`` report,
through the library (:mod:`kml.training.launch`, :mod:`kml.evaluation`).

Runs live under ``<out>/runs/<setup>/<method>/seed<k>/`` as ordinary kml run folders. A finished run is reused,
an interrupted one resumed, a folder without a checkpoint started again; an evaluation is reused when its
episodes, seed and training step match. So the same command continues where it stopped.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kml.config.learner import upgrade_field_names
from kml.errors import KMLError
from kml.files import write_json

if TYPE_CHECKING:
    from kml.training.distributed import DistInfo
    from kml.training.trainer import Trainer

__all__ = [
    "episode_rows",
    "evaluate",
    "Method",
    "parse_assignments",
    "plan",
    "Run",
    "Setup",
    "train",
    "TrainingStopped",
]


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


def _split_top_level(text: str) -> list[str]:
    """``text`` split at the commas outside brackets, braces and quotes (a JSON value may hold commas)."""
    parts, depth, quoted, start = [], 0, False, 0
    for index, char in enumerate(text):
        if char == '"' and (index == 0 or text[index - 1] != "\\"):
            quoted = not quoted
        elif not quoted and char in "[{":
            depth += 1
        elif not quoted and char in "]}":
            depth -= 1
        elif not quoted and depth == 0 and char == ",":
            parts.append(text[start:index])
            start = index + 1
    return [*parts, text[start:]]


@dataclass(frozen=True)
class Method:
    """A row of the table: a recipe (``kml-train --recipe``) and values that override it.

    Written ``RECIPE`` or ``LABEL=RECIPE,key=value,...`` (values read as JSON where they parse,
    e.g. ``kml-bare=kml-maml,kml_form=bare`` or ``long=kml-maml,steps=2000``); your own network is a method too:
    ``mine=kml-protonet,network=my_pkg.nets:Net,network_args={"width":64}``.
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
        name, *pairs = _split_top_level(rest)
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
    from kml.training.checkpoint import checkpoint_step, load_checkpoint

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


def _run_values(run: Run, modes: list[str], common: Mapping[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """The settings ``run`` trains with (its request file records them), and the common ones left out as inert."""
    left_out = inert_common(run.method, common, modes, run.setup.ways)
    values = {
        **{k: v for k, v in common.items() if k not in left_out},
        **run.method.overrides,
        "modes": modes,
        "ways": run.setup.ways,
        "shots": run.setup.shots,
        "seed": run.seed,
    }
    return values, left_out


def check_settings(run: Run, modes: list[str], steps: int, common: Mapping[str, Any]) -> None:
    """Refuse, with kml-train's one-line error naming the run, settings that ``run`` would be refused with when it
    starts: checked before anything trains or is queued (a misspelt override would otherwise fail in its job)."""
    from kml.config.checks import check_values
    from kml.training import launch

    values, _ = _run_values(run, modes, common)
    label = f"{run.method.label} {run.setup.tag} seed {run.seed}"
    checked = check_values({**values, "steps": steps}, where=label)  # "<label>: lr must be ..."
    try:
        launch.config_from_values(launch.checked_values({**checked, "recipe": run.method.recipe}))
    except KMLError as error:
        raise KMLError(f"{label}: {error}") from None


def train(
    run: Run,
    modes: list[str],
    steps: int,
    common: Mapping[str, Any],
    progress: bool,
    *,
    device: str | None = None,
    dist_info: DistInfo | None = None,
    started: Callable[[Trainer], None] | None = None,
) -> tuple[str, int]:
    """Make sure ``run`` is trained to ``steps``; returns what was done (trained, resumed, reused) and the step
    of its last checkpoint now.

    ``device`` (a job's own GPU) is not one of the run's settings: a resume may move it. ``dist_info``: the ranks of
    a DDP run (every rank calls this). ``started`` is given the trainer before it trains (a job's preemption hook).
    """
    values, left_out = _run_values(run, modes, common)
    request = run.folder.parent / f"{run.folder.name}.request.json"
    step = _trained_step(run)
    if step is not None:  # a run made before: only with the same settings (the step budget may grow)
        _check_request(run, request, values, left_out)
    if step is not None and step > steps:  # its last.pt is not the asked run: the rate schedule went on
        raise KMLError(
            f"{run.folder} is trained to step {step}, past the {steps} steps asked; ask --steps {step} (or more), "
            f"use another --out, or delete that run folder to train it to {steps}"
        )
    if step == steps:
        return "reused", step
    location = {"train_dir": str(run.folder.parent), "run_name": run.folder.name}
    location |= {"device": device} if device else {}
    if step is not None:
        _train(run, {"steps": steps, **location}, progress, resume=True, dist_info=dist_info, started=started)
        return "resumed", steps
    overwrite = run.folder.exists()  # killed before its first checkpoint
    if dist_info is None or dist_info.is_main:
        run.folder.parent.mkdir(parents=True, exist_ok=True)
        write_json(request, {**values, "steps": steps})
    if dist_info is not None:
        from kml.training.distributed import barrier

        barrier(dist_info)  # the other ranks read the request file the main one wrote
    new = {"recipe": run.method.recipe, **location}
    _train(run, new, progress, overwrite=overwrite, request=request, dist_info=dist_info, started=started)
    return "trained", steps


def _check_request(run: Run, request: Path, values: dict[str, Any], left_out: set[str]) -> None:
    """Refuse to continue a run made with other settings than ``values`` (its request file records them)."""
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


class TrainingStopped(KMLError):
    """Training a run of the table stopped: the run's one line, and ``cause``, the error it stopped with (``None``
    when it was interrupted), which kml-results shows first."""

    def __init__(self, message: str, cause: KMLError | None) -> None:
        super().__init__(message)
        self.cause = cause


def _train(
    run: Run,
    values: dict[str, Any],
    progress: bool,
    resume: bool = False,
    overwrite: bool = False,
    request: Path | None = None,
    dist_info: DistInfo | None = None,
    started: Callable[[Trainer], None] | None = None,
) -> None:
    """Train ``run`` as kml-train does with ``values`` and those of ``request`` (a new run), or ``resume`` it; a stop
    is :class:`TrainingStopped`."""
    from kml.config.checks import check_values
    from kml.training import launch

    cause, status = None, 0
    try:
        if request is not None:  # read as kml-train reads a config file
            values = {**check_values(json.loads(request.read_text()), where=f"config file {request}"), **values}
        trainer = launch.start(
            launch.checked_values(values, resume),
            resume=resume,
            overwrite=overwrite,
            dist_info=dist_info,
            progress=progress,
        )
        if started is not None:
            started(trainer)
        trainer.fit()
        status = 130 if trainer.interrupted else 0  # kml-train's exit status
    except KMLError as error:
        cause, status = error, 2
    if status != 0:
        log = run.folder / "log.txt"
        where = f"see {log}" if log.is_file() else "see the error above"  # refused before the run folder was made
        message = (
            f"training {run.method.label} {run.setup.tag} seed {run.seed} stopped (exit {status}); "
            f"{where} and rerun the same command to continue"
        )
        raise TrainingStopped(message, cause)


def evaluate(
    run: Run, step: int, episodes: int, eval_seed: int, progress: bool, device: str | None = None
) -> dict[str, Any]:
    """The run's ``kml-eval`` report on meta-test episodes, reused when episodes, seed and ``step`` (that of
    its last checkpoint, as :func:`train` returns it) match; on ``device`` (default: a GPU when there is one)."""
    if run.evaluation.is_file():
        report, problem = _read_json(run.evaluation)
        problem = problem or _report_problem(report)
        if problem:  # a report is only a cache of kml-eval's output: evaluate again
            print(f"warning: {run.evaluation} is broken ({problem}); evaluating again", file=sys.stderr)
        elif (report.get("episodes_per_mode"), report.get("seed"), report.get("step")) == (episodes, eval_seed, step):
            return report
    from kml.evaluation import run_report, write_report
    from kml.training.checkpoint import checkpoint_step, load_learner
    from kml.training.distributed import DistInfo, resolve_device

    device = resolve_device(device or "auto", DistInfo())
    learner, config, state = load_learner(run.checkpoint, device)
    found = checkpoint_step(state, run.checkpoint)
    report = run_report(
        learner, config, episodes=episodes, seed=eval_seed, device=device, data=state.get("data"), progress=progress
    )
    write_report({"checkpoint": str(run.checkpoint), "step": found, **report}, run.evaluation)
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
