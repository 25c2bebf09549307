"""The meta-gradient of a meta-batch accumulated over chunks of its tasks.

Tasks are independent given the meta-parameters (each has its own inner loop, modulation and
batch-statistics BatchNorm), so the mean query loss over T tasks is the sum of per-chunk sums divided
by T: backpropagating each chunk's share in turn gives the same meta-gradient, to rounding, while only
one chunk's inner-loop graph is alive at a time. This is how a meta-batch larger than memory is trained
without changing the method (shrinking the meta-batch would change it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kml.algorithms.contract import LearnerOutput
from kml.data.episode import Episode

__all__ = ["accumulate_meta_gradient", "chunk_slices"]


def chunk_slices(tasks: int, chunk: int | None) -> list[slice]:
    """Consecutive task slices of at most ``chunk`` tasks covering ``range(tasks)`` (one slice if ``chunk`` is None)."""
    if chunk is None or chunk >= tasks:
        return [slice(0, tasks)]
    if chunk < 1:
        raise ValueError(f"task chunk must be at least 1, got {chunk}")
    return [slice(start, min(start + chunk, tasks)) for start in range(0, tasks, chunk)]


def accumulate_meta_gradient(
    forward: Callable[[Episode], LearnerOutput],
    episode: Episode,
    task_chunk: int | None = None,
    loss_scale: float = 1.0,
    preprocess: Callable[[Episode], Episode] | None = None,
) -> LearnerOutput:
    """Backpropagate ``loss_scale * mean query loss`` of ``episode``, ``task_chunk`` tasks at a time.

    Gradients are *added* to the parameters' ``.grad`` (zero them first). ``preprocess`` is applied to
    each chunk before ``forward`` (e.g. ``Episode.to_float``), so only one chunk is converted at a time.

    Returns the detached :class:`LearnerOutput` of the whole meta-batch: ``loss`` (scalar, unscaled mean),
    ``task_loss [T]`` and ``task_accuracy [T]``.
    """
    tasks = episode.num_tasks
    losses, accuracies = [], []
    for part in chunk_slices(tasks, task_chunk):
        chunk = episode if part == slice(0, tasks) else episode.select(part)
        output = forward(preprocess(chunk) if preprocess is not None else chunk)
        # the chunk's share of the meta-batch mean: sum over its tasks / all tasks
        (output.task_loss.sum() * (loss_scale / tasks)).backward()
        losses.append(output.task_loss.detach())
        accuracies.append(output.task_accuracy.detach())
    task_loss = torch.cat(losses)
    return LearnerOutput(task_loss.mean(), task_loss, torch.cat(accuracies))
