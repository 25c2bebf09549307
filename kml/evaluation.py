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
from kml.data.sampler import EpisodeSampler, random_block_labels
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
    "RELEASED_PROTOCOLS",
    "released_protocol",
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
    shuffle_block_labels: bool = False,
) -> list[ModeResult]:
    """Evaluate ``learner`` on ``episodes`` seeded tasks per store; the same arguments give the same numbers.

    ``learner`` is any module returning a :class:`~kml.algorithms.LearnerOutput` for a float
    :class:`~kml.data.episode.Episode`; it is called as ``learner(episode)``, or as
    ``learner(episode, inner_steps=inner_steps)`` when ``inner_steps`` is given.

    The learner's own ``mode`` index for a task (what Multi-MAML uses to pick its parameter set, and
    per-mode inner rates their rate) is ``mode_indices[i]`` for ``stores[i]``, by default its position;
    ``mode_names`` are the names those indices refer to (by default the stores' modes).
    ``tasks_per_batch`` only sets how many tasks run together: the episodes, hence the numbers, do not depend on it.
    ``shuffle_block_labels``: the same images, with each task's class blocks labelled in a random order (the released
    loaders' layout, which ``released_refinement`` pairs by position).
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
            # drawn after the images, so that the episodes' images are the same either way
            labels = random_block_labels(episodes, ways, sampler.generator) if shuffle_block_labels else None
            accuracies, losses = [], []
            bar = tqdm(total=episodes, desc=f"eval {store.mode}", leave=False, disable=not progress)
            for start in range(0, episodes, tasks_per_batch):
                tasks = slice(start, min(start + tasks_per_batch, episodes))
                count = tasks.stop - start
                episode = sampler.episode_from_rows(
                    classes[tasks],
                    rows[tasks],
                    None if turns is None else turns[tasks],
                    None if labels is None else labels[tasks],
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


# The released codes' test summaries, computed from the same fixed episodes (kml-eval --released-protocol).
RELEASED_PROTOCOLS = ("mmaml", "kml")
# The released KML code prints a summary every log_interval = 100 meta-batches (scripts/trainer.py line 239).
KML_WINDOW_BATCHES = 100


def released_ci95(values: torch.Tensor) -> float:
    """``np.std(values) * 1.96 / sqrt(n)``: both released codes' interval, population std (ddof 0)."""
    values = values.double()
    return 1.96 * float(values.std(unbiased=False)) / math.sqrt(values.numel())


def mixed_stream(results: Sequence[ModeResult], meta_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each mode's episodes interleaved as the released test loader mixes its meta-batches: slot ``g`` takes the next
    episode of mode ``(g + meta_batch) % M`` (its start index advances by the meta-batch, mod M, every batch).

    Returns the accuracies ``[M*E]`` (percent) and each one's mode index ``[M*E]`` (E: the fewest episodes of a mode).
    """
    modes, episodes = len(results), min(len(r.episode_accuracy) for r in results)
    table = torch.tensor([r.episode_accuracy[:episodes] for r in results], dtype=torch.float64)  # [M, E]
    mode = (torch.arange(modes * episodes) + meta_batch) % modes
    turn = torch.arange(modes * episodes) // modes  # the g-th slot of a mode is its (g // M)-th episode
    return table[mode, turn], mode


def released_protocol(results: Sequence[ModeResult], protocol: str, meta_batch: int = 10) -> dict[str, Any]:
    """The released codes' test summary of kml's fixed episodes (``results`` from :func:`evaluate`, one per mode).

    ``"mmaml"`` (``maml/trainer.py`` lines 92-132): the mean over meta-batches of ``meta_batch`` mixed tasks of
    each batch's mean accuracy, the interval from :func:`released_ci95` of those batch means.
    ``"kml"`` (``scripts/trainer.py`` lines 239-267): windows of 100 meta-batches (1000 tasks at meta-batch 10),
    each with every mode's mean and :func:`released_ci95` over its tasks in the window.
    The released tests also pick their tasks with replacement; here every task is one of the fixed episodes.
    """
    if protocol not in RELEASED_PROTOCOLS:
        raise KMLError(f"unknown released protocol {protocol!r}; choose one of {', '.join(RELEASED_PROTOCOLS)}")
    accuracy, mode = mixed_stream(results, meta_batch)
    if protocol == "mmaml":
        batches = accuracy[: len(accuracy) // meta_batch * meta_batch].view(-1, meta_batch).mean(dim=1)
        if not len(batches):
            raise KMLError(f"the mmaml protocol needs at least one meta-batch of {meta_batch} tasks")
        return {
            "protocol": "mmaml",
            "meta_batch": meta_batch,
            "batches": len(batches),
            "accuracy": float(batches.mean()),
            "ci95": released_ci95(batches),
        }
    size = KML_WINDOW_BATCHES * meta_batch
    windows = []
    for start in range(0, len(accuracy) - size + 1, size):
        part, part_mode = accuracy[start : start + size], mode[start : start + size]
        per_mode = {
            r.mode: {"accuracy": float(part[part_mode == m].mean()), "ci95": released_ci95(part[part_mode == m])}
            for m, r in enumerate(results)
            if bool((part_mode == m).any())
        }
        windows.append({"tasks": size, "accuracy": float(part.mean()), "ci95": released_ci95(part), "modes": per_mode})
    if not windows:
        raise KMLError(f"the kml protocol's window is {size} tasks; evaluate at least that many in all")
    return {"protocol": "kml", "meta_batch": meta_batch, "windows": windows}


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
    released: str | None = None,
) -> list[dict[str, Any]]:
    """:func:`run_report` for each ``(ways, shots)`` of ``setups`` (``None``: the run's), the images loaded once;
    each report is the one :func:`run_report` gives alone. Every setup is checked before any is evaluated.
    ``released``: add the released codes' summary of the same episodes (:func:`released_protocol`, at the run's
    meta-batch) as ``released_protocol``."""
    if released is not None and released not in RELEASED_PROTOCOLS:
        raise KMLError(f"unknown released protocol {released!r}; choose one of {', '.join(RELEASED_PROTOCOLS)}")
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
            shuffle_block_labels=config.learner.released_refinement,
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
        if released is not None:
            reports[-1]["released_protocol"] = released_protocol(results, released, config.meta_batch or 10)
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
    if report.get("released_protocol"):
        name += f"_released-{report['released_protocol']['protocol']}"
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
