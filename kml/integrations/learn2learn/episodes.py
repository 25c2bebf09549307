"""kml episodes and learn2learn tasks, both ways.

:func:`episode_from_tasks` and :class:`TasksetSampler` turn learn2learn tasks into kml
:class:`~kml.data.episode.Episode` s; :func:`episode_to_tasks` and :func:`episode_to_batches` give
an episode's tasks in learn2learn's forms.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from kml.data.episode import Episode
from kml.errors import KMLError

__all__ = ["episode_from_tasks", "episode_to_batches", "episode_to_tasks", "TasksetSampler"]


def episode_from_tasks(
    tasks: Sequence[tuple[torch.Tensor, torch.Tensor]],
    shots: int,
    mode_name: str = "learn2learn",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Episode:
    """learn2learn tasks ``[(data [n, C, H, W], labels [n]), ...]`` -> one kml :class:`Episode`.

    Every task must hold N classes with the same number of samples each (``KShots(dataset, k=shots +
    queries)``); the first ``shots`` samples of a class (in task order) are its support, the rest its
    query, as ``learn2learn.data.partition_task`` splits. kml label ``n`` stands for the task's
    ``n``-th label in sorted order, or in the order of a random permutation drawn from ``generator``
    when one is given; ``episode.classes`` holds those learn2learn labels. Images come out as
    ``dtype`` in [0, 1] (uint8 data is scaled by 1/255, float data is taken as it is; ``dtype=torch.uint8``
    keeps raw uint8 data).
    """
    if not tasks:
        raise KMLError("no tasks given")
    parts: list[tuple[torch.Tensor, ...]] = []
    layout = None
    for number, task in enumerate(tasks):
        data, labels, values, per_class = _read_task(task, number, shots)
        shape = (len(values), per_class, *data.shape[1:])
        if layout is not None and shape != layout:
            raise KMLError(f"task {number} has shape {shape} (ways, samples per class, C, H, W), task 0 has {layout}")
        layout = shape
        if generator is not None:
            values = values[torch.randperm(len(values), generator=generator)]
        parts.append(_partition(data, labels, values, shots))
    return _stack_tasks(parts, mode_name, dtype)


def _read_task(
    task: tuple[torch.Tensor, torch.Tensor], number: int, shots: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A task's ``data [n, C, H, W]``, ``labels [n]``, sorted label values and samples per class (checked)."""
    data, labels = task[0], torch.as_tensor(task[1])
    if data.dim() == 3:
        data = data.unsqueeze(1)
    if labels.dim() != 1 or len(labels) != len(data):
        raise KMLError(f"task {number}: labels {list(labels.shape)} do not match data {list(data.shape)}")
    values, counts = labels.unique(sorted=True, return_counts=True)
    per_class = int(counts[0])
    if (counts != per_class).any() or per_class <= shots:
        raise KMLError(
            f"task {number}: classes hold {sorted(set(counts.tolist()))} samples; every class needs the same "
            f"number, more than shots={shots} (sample tasks with KShots(dataset, k=shots + queries))"
        )
    return data, labels, values, per_class


def _partition(data: torch.Tensor, labels: torch.Tensor, values: torch.Tensor, shots: int) -> tuple[torch.Tensor, ...]:
    """One task's ``(support_x, support_y, query_x, query_y, classes)``; kml label n is ``values[n]``."""
    grouped = torch.stack([data[labels == value] for value in values.to(labels.device)])  # [N, K+Q, C, H, W]
    ways, per_class = grouped.shape[:2]
    return (
        grouped[:, :shots].flatten(0, 1),
        torch.arange(ways).repeat_interleave(shots),
        grouped[:, shots:].flatten(0, 1),
        torch.arange(ways).repeat_interleave(per_class - shots),
        values.cpu().long(),
    )


def _stack_tasks(parts: list[tuple[torch.Tensor, ...]], mode_name: str, dtype: torch.dtype) -> Episode:
    """The tasks' parts (:func:`_partition`) stacked into one episode on the device of the images."""
    support_x, support_y, query_x, query_y, classes = (list(column) for column in zip(*parts))
    device = support_x[0].device
    return Episode(
        support_x=_stacked_images(support_x, dtype),
        support_y=torch.stack(support_y).to(device),
        query_x=_stacked_images(query_x, dtype),
        query_y=torch.stack(query_y).to(device),
        mode=torch.zeros(len(parts), dtype=torch.int64, device=device),
        classes=torch.stack(classes).to(device),
        mode_names=(mode_name,),
    )


def _stacked_images(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Stack as ``dtype``: uint8 data scaled to [0, 1] unless ``dtype`` is uint8, float data kept as it is."""
    x = torch.stack(parts)
    if dtype == torch.uint8 or x.dtype != torch.uint8:
        return x.to(dtype)
    return x.to(dtype) / 255


class TasksetSampler:
    """Meta-batches of learn2learn tasks as kml episodes: learn2learn draws the tasks, kml learns.

    Args:
        taskset: a learn2learn ``Taskset``/``TaskDataset`` whose tasks hold N classes with the same
            number of samples each, e.g. ``get_tasksets(name, train_ways=5, train_samples=1 + 15).train``.
        shots: K, the support samples per class (the rest of each class is the query).
        meta_batch: tasks per :meth:`sample`.
        shuffle_labels: give the classes of a task kml labels in a random order (kml's convention;
            learn2learn's ``RemapLabels`` shuffles too); otherwise in sorted label order.
        seed: seed of the label shuffling. The tasks themselves follow learn2learn's own sampling
            (Python's global ``random``); seed that for reproducible tasks.
        device, dtype: where the episodes go and their image dtype (float in [0, 1] by default).
        mode_name: ``episode.mode_names[0]``.

    Has the samplers' interface: :meth:`sample`, iteration, ``state_dict``/``load_state_dict``.
    """

    def __init__(
        self,
        taskset: Any,
        shots: int,
        meta_batch: int = 1,
        shuffle_labels: bool = True,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        mode_name: str = "learn2learn",
    ) -> None:
        if shots < 1 or meta_batch < 1:
            raise KMLError(f"shots and meta_batch must be at least 1, got {shots} and {meta_batch}")
        if not hasattr(taskset, "sample"):
            raise KMLError(f"expected a learn2learn Taskset (with .sample()), got {type(taskset).__name__}")
        self.taskset = taskset
        self.shots = int(shots)
        self.meta_batch = int(meta_batch)
        self.device = torch.device(device)
        self.dtype = dtype
        self.mode_name = mode_name
        self.generator = torch.Generator().manual_seed(seed) if shuffle_labels else None

    def sample(self, num_tasks: int | None = None) -> Episode:
        """Draw ``num_tasks`` (default ``meta_batch``) learn2learn tasks as one :class:`Episode`."""
        tasks = [self.taskset.sample() for _ in range(self.meta_batch if num_tasks is None else int(num_tasks))]
        tasks = [
            (torch.as_tensor(data).to(self.device), torch.as_tensor(labels).to(self.device))
            for data, labels, *_ in tasks
        ]
        return episode_from_tasks(tasks, self.shots, self.mode_name, self.generator, self.dtype)

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()

    def state_dict(self) -> dict[str, Any]:
        import random

        return {
            "generator": None if self.generator is None else self.generator.get_state(),
            "random": random.getstate(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import random

        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])
        random.setstate(state["random"])


def episode_to_tasks(
    episode: Episode,
) -> list[tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
    """Per task ``((support_x [N*K, C, H, W], support_y [N*K]), (query_x, query_y))``, as ``partition_task`` returns."""
    return [
        ((episode.support_x[t], episode.support_y[t]), (episode.query_x[t], episode.query_y[t]))
        for t in range(episode.num_tasks)
    ]


def episode_to_batches(
    episode: Episode, layout: str = "partition"
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per task the concatenated ``(data [n, C, H, W], labels [n], support_mask [n] bool)`` of a learn2learn task.

    Classes are consecutive (label 0's samples first, as ``ConsecutiveLabels`` orders them). Within a class:

    - ``layout="partition"``: its K support samples, then its Q query samples, so that
      ``learn2learn.data.partition_task(data, labels, shots=K)`` gives back the episode's support and query;
    - ``layout="interleaved"`` (needs Q == K): support and query alternate, so the support sits at
      the even positions, as learn2learn's example scripts select it
      (``adaptation_indices[np.arange(shots * ways) * 2] = True``).
    """
    if layout not in ("partition", "interleaved"):
        raise KMLError(f"unknown layout {layout!r}; choose partition or interleaved")
    ways, shots, queries = episode.ways, episode.shots, episode.queries
    if layout == "interleaved" and queries != shots:
        raise KMLError(f"the interleaved layout needs as many queries as shots per class, got {queries} and {shots}")
    batches = []
    for t in range(episode.num_tasks):
        support = episode.support_x[t].reshape(ways, shots, *episode.support_x.shape[2:])
        query = episode.query_x[t].reshape(ways, queries, *episode.query_x.shape[2:])
        support_labels = episode.support_y[t].reshape(ways, shots)
        order = support_labels[:, 0].argsort()  # class blocks in label order
        support, query, class_labels = support[order], query[order], support_labels[order, 0]
        if layout == "partition":
            data = torch.cat([support, query], dim=1)
            mask = torch.cat(
                [torch.ones(ways, shots, dtype=torch.bool), torch.zeros(ways, queries, dtype=torch.bool)], dim=1
            )
        else:
            data = torch.stack([support, query], dim=2).flatten(1, 2)
            mask = torch.tensor([True, False]).repeat(shots).expand(ways, -1)
        labels = class_labels.unsqueeze(1).expand(ways, shots + queries)
        batches.append((data.flatten(0, 1), labels.flatten(), mask.flatten().to(data.device)))
    return batches
