"""Evaluation protocol: a fixed, seeded set of test episodes per mode, mean accuracy and 95% CI; and the report
``kml-eval`` writes for a run's learner (:func:`run_report`, :func:`write_report`)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from kml.config.checks import EVAL_NUMBERS, check_values
from kml.data.sampler import EpisodeSampler
from kml.data.store import ImageStore
from kml.errors import KMLError, setting
from kml.runtime import autocast

if TYPE_CHECKING:
    from kml.config.learner import LearnerConfig
    from kml.config.run import RunConfig

__all__ = [
    "average",
    "confidence_interval95",
    "DRAW_CHUNK",
    "episode_seed",
    "evaluate",
    "ModeResult",
    "report_name",
    "run_report",
    "run_reports",
    "ways_refusal",
    "write_report",
]

# Episodes are drawn this many at a time whatever tasks_per_batch is: a speed knob must not change the tasks.
DRAW_CHUNK = 10


@dataclass
class ModeResult:
    """Accuracy over the episodes of one mode (``accuracy`` and ``ci95`` in percent).

    ``episode_accuracy`` holds each episode's accuracy in percent, in the fixed episode order, so that two
    learners evaluated with the same seed can be compared episode by episode (empty for an average).
    """

    mode: str
    accuracy: float
    ci95: float
    loss: float
    episodes: int
    episode_accuracy: list[float] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        """The summary figures (without the per-episode list)."""
        return {k: v for k, v in asdict(self).items() if k != "episode_accuracy"}


def confidence_interval95(values: torch.Tensor) -> float:
    """Half-width of the normal 95% confidence interval of the mean of ``values``."""
    if values.numel() < 2:
        return float("nan")
    return 1.96 * float(values.double().std(unbiased=True)) / math.sqrt(values.numel())


def episode_seed(seed: int, mode: str) -> int:
    """Per-mode episode seed: adding or removing a mode leaves the other modes' episodes unchanged."""
    return (seed * 1_000_003 + zlib.crc32(mode.encode())) & 0x7FFFFFFF


@torch.no_grad()
def evaluate(
    learner: torch.nn.Module,
    stores: Sequence[ImageStore],
    ways: int,
    shots: int,
    queries: int,
    episodes: int,
    seed: int = 0,
    tasks_per_batch: int = 10,
    inner_steps: int | None = None,
    rotate: Sequence[bool] | None = None,
    bf16: bool = False,
    progress: bool = True,
    mode_indices: Sequence[int] | None = None,
    mode_names: Sequence[str] | None = None,
) -> list[ModeResult]:
    """Evaluate ``learner`` on ``episodes`` seeded tasks per store; the same arguments give the same numbers.

    ``learner`` is any module returning a :class:`~kml.algorithms.LearnerOutput` for a float
    :class:`~kml.data.episode.Episode`; it is called as ``learner(episode)``, or as
    ``learner(episode, inner_steps=inner_steps)`` when ``inner_steps`` is given.

    The learner's own ``mode`` index for a task (what Multi-MAML uses to pick its parameter set, and
    per-mode inner rates their rate) is ``mode_indices[i]`` for ``stores[i]``, by default its position;
    ``mode_names`` are the names those indices refer to (by default the stores' modes).
    ``tasks_per_batch`` only sets how many tasks run together: the episodes, hence the numbers, do not depend on it.
    """
    check_values(
        {"episodes": episodes, "tasks_per_batch": tasks_per_batch, "seed": seed, "inner_steps": inner_steps},
        EVAL_NUMBERS,
    )
    was_training = learner.training
    learner.eval()
    names = tuple(mode_names) if mode_names is not None else tuple(store.mode for store in stores)
    indices = list(mode_indices) if mode_indices is not None else list(range(len(stores)))
    results = []
    try:
        for index, store in enumerate(stores):
            sampler = EpisodeSampler(
                store,
                ways,
                shots,
                queries,
                rotate=bool(rotate[index]) if rotate else False,
                seed=episode_seed(seed, store.mode),
                mode_index=indices[index],
                mode_names=names,
                dtype=torch.uint8,
            )
            draws = [
                sampler.draw_rows(min(DRAW_CHUNK, episodes - start), sampler.generator)
                for start in range(0, episodes, DRAW_CHUNK)
            ]
            classes, rows = torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])
            turns = torch.cat([d[2] for d in draws]) if sampler.rotate else None
            accuracies, losses = [], []
            bar = tqdm(total=episodes, desc=f"eval {store.mode}", leave=False, disable=not progress)
            for start in range(0, episodes, tasks_per_batch):
                tasks = slice(start, min(start + tasks_per_batch, episodes))
                count = tasks.stop - start
                episode = sampler.episode_from_rows(
                    classes[tasks], rows[tasks], None if turns is None else turns[tasks]
                ).to_float()
                with autocast(episode.device, bf16):
                    # a learner without an inner loop need not take inner_steps: it is passed only when asked for
                    output = learner(episode) if inner_steps is None else learner(episode, inner_steps=inner_steps)
                accuracies.append(output.task_accuracy.detach().float().cpu())
                losses.append(output.task_loss.detach().float().cpu())
                bar.update(count)
            bar.close()
            accuracy = torch.cat(accuracies) * 100
            results.append(
                ModeResult(
                    store.mode,
                    float(accuracy.mean()),
                    confidence_interval95(accuracy),
                    float(torch.cat(losses).mean()),
                    episodes,
                    accuracy.tolist(),
                )
            )
    finally:
        learner.train(was_training)
    return results


def average(results: Sequence[ModeResult]) -> ModeResult:
    """The mean over modes (each mode weighs the same, as the published tables average)."""
    n = len(results)
    ci = math.sqrt(sum(r.ci95**2 for r in results)) / n  # independent modes
    return ModeResult(
        "average",
        sum(r.accuracy for r in results) / n,
        ci,
        sum(r.loss for r in results) / n,
        sum(r.episodes for r in results),
    )


def ways_refusal(learner: LearnerConfig) -> str | None:
    """Why a learner cannot be evaluated at another N, or ``None`` when its parameters do not depend on N."""
    if learner.algorithm == "maml":
        return f"this learner's MAML head is Linear(features, {learner.ways}), sized for its training N"
    if learner.modulation != "none" and learner.encoder_uses_labels:
        return f"its task encoder reads {learner.ways} one-hot label planes, sized for its training N"
    return None


def _run_stores(
    config: RunConfig,
    modes: Sequence[str] | None,
    split: str,
    data_root: str | None,
    device: str,
    data: Any,
    progress: bool = True,
) -> tuple[list[ImageStore], list[int] | None, list[str] | None]:
    """The stores of ``modes`` (default: the run's), checked against the caches the run recorded (``data``), and
    each one's mode index in the run where the learner picks by mode (Multi-MAML, per-mode inner rates)."""
    from kml.data.modes import expand_modes, load_stores
    from kml.data.store import check_run_caches

    modes = expand_modes(modes) if modes else config.modes
    learner = config.learner
    by_mode = learner.multi_maml or learner.mode_inner_lr is not None or learner.mode_inner_steps is not None
    if by_mode and set(modes) - set(config.modes):
        raise KMLError(
            f"this learner ({learner.method}, per-mode settings) only knows its training modes {config.modes}; got {modes}"
        )
    stores = load_stores(modes, split, data_root or config.data_root, config.image_size, 3, device, progress=progress)
    check_run_caches(data, stores)
    if not by_mode:
        return stores, None, None
    by_name = {s.mode: s for s in stores}  # each mode at the index of its own parameter set / rate, also for a subset
    stores = [by_name[m] for m in config.modes if m in by_name]
    return stores, [config.modes.index(s.mode) for s in stores], list(config.modes)


def _checked_ways(
    config: RunConfig, ways: int | None, shots: int | None, queries: int | None, inner_steps: int | None
) -> int:
    """N to evaluate at (default: the run's); refused where the learner is sized for its training N, as are N, K,
    Q out of range and inner steps for a learner without an inner loop."""
    check_values({"ways": ways, "shots": shots, "queries": queries}, EVAL_NUMBERS)
    ways = ways or config.ways
    if ways != config.ways and ways_refusal(config.learner):
        raise KMLError(f"{setting('ways', ways)}: {ways_refusal(config.learner)}; evaluate it {config.ways}-way")
    if inner_steps is not None and config.learner.algorithm != "maml":
        raise KMLError(
            f"{setting('inner_steps')} applies to MAML; this checkpoint is {config.learner.method}, which has no inner "
            f"loop: drop it"
        )
    return ways


def run_report(
    learner: torch.nn.Module,
    config: RunConfig,
    *,
    ways: int | None = None,
    shots: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """kml-eval's report of a kml-train run's ``learner`` (its RunConfig ``config``) at one N-way K-shot setup
    (default: the run's); ``options`` as :func:`run_reports` takes them (``episodes`` is required)."""
    return run_reports(learner, config, [(ways, shots)], **options)[0]


def run_reports(
    learner: torch.nn.Module,
    config: RunConfig,
    setups: Sequence[tuple[int | None, int | None]],
    *,
    episodes: int,
    seed: int = 0,
    split: str = "test",
    modes: Sequence[str] | None = None,
    queries: int | None = None,
    inner_steps: int | None = None,
    tasks_per_batch: int = 10,
    data_root: str | None = None,
    device: str = "cpu",
    data: Any = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """:func:`run_report` for each ``(ways, shots)`` of ``setups`` (``None``: the run's), the images loaded once;
    each report is the one :func:`run_report` gives alone. Every setup is checked before any is evaluated."""
    from kml.data.modes import ROTATED_BY_DEFAULT
    from kml.runtime import bf16_native

    checked = [
        (_checked_ways(config, ways, shots, queries, inner_steps), shots or config.shots) for ways, shots in setups
    ]
    stores, mode_indices, mode_names = _run_stores(config, modes, split, data_root, device, data, progress)
    queries = queries or config.queries
    bf16 = config.bf16 and bf16_native(device)  # trained with bf16 on another device: float32 here
    inner = inner_steps if inner_steps is not None else config.learner.eval_inner_steps
    reports = []
    for ways, shots in checked:
        torch.manual_seed(seed)
        results = evaluate(
            learner,
            stores,
            ways,
            shots,
            queries,
            episodes,
            seed=seed,
            tasks_per_batch=tasks_per_batch,
            inner_steps=inner_steps,
            rotate=[config.rotate_omniglot and s.mode in ROTATED_BY_DEFAULT for s in stores],
            bf16=bf16,
            progress=progress,
            mode_indices=mode_indices,
            mode_names=mode_names,
        )
        reports.append(
            {
                "split": split,
                "ways": ways,
                "trained_ways": config.ways,
                "shots": shots,
                "queries": queries,
                "episodes_per_mode": episodes,
                "seed": seed,
                "inner_steps": inner if config.learner.algorithm == "maml" else None,
                "precision": "bf16" if bf16 else "float32",
                "method": dataclasses.asdict(config.learner),
                "results": [r.as_dict() for r in [*results, average(results)]],
                "episode_accuracy": {r.mode: r.episode_accuracy for r in results},  # per episode, paired comparisons
            }
        )
    return reports


def report_name(report: dict[str, Any], checkpoint: str | os.PathLike, run_modes: Sequence[str] = ()) -> str:
    """The file name (``.json``) of ``report``, an evaluation of ``checkpoint``: named by every setting that
    changes its numbers, so a different evaluation never overwrites it (the same one again does), e.g.
    ``eval_last_test_5w1s15q_1000ep_seed0_inner10.json``; the modes are named when they are not the run's
    ``run_modes``, the precision when it is bf16."""
    name = (
        f"eval_{Path(checkpoint).stem}_{report['split']}_{report['ways']}w{report['shots']}s{report['queries']}q_"
        f"{report['episodes_per_mode']}ep_seed{report['seed']}"
    )
    if report.get("inner_steps") is not None:
        name += f"_inner{report['inner_steps']}"
    if report.get("precision") == "bf16":
        name += "_bf16"
    modes = [r["mode"] for r in report["results"] if r["mode"] != "average"]
    if modes != list(run_modes):
        named = "+".join(re.sub(r"[^A-Za-z0-9.-]+", "_", mode.replace("folder:", "")) for mode in modes)
        if len(named) > 80:  # many modes, long folder paths: their checksum keeps the name short and unique
            named = f"{len(modes)}modes-{zlib.crc32(chr(0).join(modes).encode()):08x}"
        name += f"_{named}"
    return f"{name}.json"


def write_report(report: dict[str, Any], output: str | Path) -> Path:
    """Write ``report`` to ``output`` (JSON) and its results table beside it (``.csv``); returns the JSON's path."""
    import pandas as pd

    output = Path(output)
    try:
        output.write_text(json.dumps(report, indent=2))
        pd.DataFrame(report["results"]).to_csv(output.with_suffix(".csv"), index=False)
    except OSError as error:
        raise KMLError(
            f"cannot write {error.filename or output}: {error.strerror or error}; pass {setting('output')} elsewhere"
        ) from None
    return output
