"""Evaluation protocol: a fixed, seeded set of test episodes per mode, mean accuracy and 95% CI."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from kml.config.checks import EVAL_NUMBERS, check_values
from kml.data.sampler import EpisodeSampler
from kml.data.store import ImageStore
from kml.runtime import autocast

__all__ = ["average", "confidence_interval95", "DRAW_CHUNK", "episode_seed", "evaluate", "ModeResult"]

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
