"""The batched episode: the one object that flows from samplers to learners."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

__all__ = ["Episode", "INDEX_FIELDS"]


@dataclass
class Episode:
    """A meta-batch of ``T`` N-way K-shot tasks.

    Inside a task, examples are grouped by class (class-major, shots fastest)
    and labels ``0..N-1`` are assigned to the drawn classes in a random order.

    Attributes:
        support_x: float32 ``[T, N*K, C, H, W]`` in ``[0, 1]`` (uint8 0..255 when the
            sampler was asked for raw images; see :meth:`to_float`).
        support_y: int64 ``[T, N*K]`` in ``0..N-1``.
        query_x: float32 ``[T, N*Q, C, H, W]``.
        query_y: int64 ``[T, N*Q]``.
        mode: int64 ``[T]``: index into ``mode_names`` of each task's mode.
        classes: int64 ``[T, N]``: class index (within its mode's split store)
            that label ``n`` stands for.
        mode_names: names of the modes that ``mode`` indexes.
        support_index: int64 ``[T, N*K]``: the row of each support image in its task's mode store
            (``store.images[support_index[t]]``, the store of mode ``mode_names[mode[t]]`` and the sampled
            split), or None when the episode does not come from a store (built by hand, learn2learn).
        query_index: int64 ``[T, N*Q]``: the same for the query images, or None.
        turns: int64 ``[T, N]``: quarter turns (``torch.rot90`` with ``k=turns``, dims ``(-2, -1)``) applied
            to every image of class ``n`` (Omniglot rotation; 0 for modes that are not rotated), or None
            when no rotation was applied.

    So ``store.images[support_index[t, i]]`` rotated by ``turns[t, support_y[t, i]]`` quarter turns is
    ``support_x[t, i]`` (as uint8; a float episode holds it divided by 255).
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    mode: torch.Tensor
    classes: torch.Tensor
    mode_names: tuple[str, ...]
    support_index: torch.Tensor | None = None
    query_index: torch.Tensor | None = None
    turns: torch.Tensor | None = None

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    @property
    def ways(self) -> int:
        return self.classes.shape[1]

    @property
    def shots(self) -> int:
        return self.support_x.shape[1] // self.ways

    @property
    def queries(self) -> int:
        return self.query_x.shape[1] // self.ways

    @property
    def device(self) -> torch.device:
        return self.support_x.device

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> Episode:
        """Move to ``device``; ``dtype`` (if given) applies to the images only."""
        return replace(
            self,
            support_x=self.support_x.to(device, dtype),
            support_y=self.support_y.to(device),
            query_x=self.query_x.to(device, dtype),
            query_y=self.query_y.to(device),
            mode=self.mode.to(device),
            classes=self.classes.to(device),
            **{name: _apply(getattr(self, name), lambda t: t.to(device)) for name in INDEX_FIELDS},
        )

    def to_float(self, dtype: torch.dtype = torch.float32) -> Episode:
        """Images as ``dtype`` in [0, 1] (uint8 episodes are scaled by 1/255; float ones are cast)."""

        def convert(x: torch.Tensor) -> torch.Tensor:
            return x.to(dtype).mul_(1.0 / 255) if x.dtype == torch.uint8 else x.to(dtype)

        return replace(self, support_x=convert(self.support_x), query_x=convert(self.query_x))

    def select(self, tasks: slice | Sequence[int] | torch.Tensor) -> Episode:
        """The sub-batch of the given tasks (used to split a meta-batch across ranks)."""
        if not isinstance(tasks, slice):
            tasks = torch.as_tensor(tasks, dtype=torch.int64, device=self.device)
        return replace(
            self,
            support_x=self.support_x[tasks],
            support_y=self.support_y[tasks],
            query_x=self.query_x[tasks],
            query_y=self.query_y[tasks],
            mode=self.mode[tasks],
            classes=self.classes[tasks],
            **{name: _apply(getattr(self, name), lambda t: t[tasks]) for name in INDEX_FIELDS},
        )

    @staticmethod
    def concat(episodes: Sequence[Episode]) -> Episode:
        """Join meta-batches that share ``mode_names`` and task shape along the task axis."""
        first = episodes[0]
        if any(e.mode_names != first.mode_names for e in episodes):
            raise ValueError("episodes with different mode_names cannot be concatenated")
        if len(episodes) == 1:
            return first
        indices = {}
        for name in ("support_index", "query_index"):  # known only when every part knows them
            parts = [getattr(e, name) for e in episodes]
            indices[name] = None if any(p is None for p in parts) else torch.cat(parts)
        turns = None
        if any(e.turns is not None for e in episodes):  # a part without turns was not rotated: 0 turns
            turns = torch.cat([e.turns if e.turns is not None else torch.zeros_like(e.classes) for e in episodes])
        return Episode(
            *(
                torch.cat([getattr(e, name) for e in episodes])
                for name in ("support_x", "support_y", "query_x", "query_y", "mode", "classes")
            ),
            mode_names=first.mode_names,
            **indices,
            turns=turns,
        )


INDEX_FIELDS = ("support_index", "query_index", "turns")


def _apply(value: torch.Tensor | None, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    return None if value is None else fn(value)
