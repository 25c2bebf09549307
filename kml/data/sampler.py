"""Episodic samplers that draw whole meta-batches with tensor indexing.

The store's images stay where the store is (on the GPU when training there);
classes and images are drawn with a seeded :class:`torch.Generator` on that
device, and a meta-batch is one gather from the store, not T*N*(K+Q) Python
calls.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch

from kml.data.episode import Episode
from kml.data.store import ImageStore
from kml.errors import KMLError

__all__ = ["assemble_episode", "EpisodeSampler", "MIXTURE_POLICIES", "MixtureSampler", "random_block_labels"]

MIXTURE_POLICIES = ("mixed", "random", "per-batch", "alternate")


def _generator(seed: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _gather(images: torch.Tensor, rows: torch.Tensor, turns: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Store rows ``[T, N, S]`` -> images ``[T, N*S, C, H, W]`` (float in [0, 1], or raw uint8)."""
    tasks, ways, per_class = rows.shape
    out = images.index_select(0, rows.reshape(-1)).view(tasks, ways * per_class, *images.shape[1:])
    if turns is not None:
        turns = turns.expand(tasks, ways, per_class).reshape(tasks, ways * per_class, 1, 1, 1)
        rotated = out
        for quarter in (1, 2, 3):
            rotated = torch.where(turns == quarter, torch.rot90(out, quarter, dims=(-2, -1)), rotated)
        out = rotated
    return out if dtype == torch.uint8 else out.to(dtype).mul_(1.0 / 255)


def assemble_episode(
    images: torch.Tensor,
    classes: torch.Tensor,
    rows: torch.Tensor,
    turns: torch.Tensor | None,
    mode: torch.Tensor,
    shots: int,
    mode_names: tuple[str, ...],
    dtype: torch.dtype = torch.float32,
    store_rows: torch.Tensor | None = None,
    block_labels: torch.Tensor | None = None,
) -> Episode:
    """Build an :class:`Episode` from drawn store rows with one gather each for support and query.

    ``images`` uint8 ``[num_images, C, H, W]``; ``rows`` ``[T, N, K+Q]`` (support first);
    ``turns`` ``[T, N, 1]`` quarter turns or None; ``mode`` ``[T]``. ``store_rows`` (default ``rows``)
    are the same images as rows of each task's own mode store, recorded as the episode's
    ``support_index``/``query_index`` (a mixture gathers from all modes' images joined into one tensor).
    ``block_labels`` ``[T, N]``: the label of each class block, a permutation per task (default: block n has label
    n); ``classes`` stays indexed by label.
    """
    tasks, ways, per_class = rows.shape
    labels = torch.arange(ways, device=rows.device).view(1, ways, 1)
    store_rows = rows if store_rows is None else store_rows
    if block_labels is not None:  # label block_labels[t, n] stands for the class of block n
        labels = block_labels.view(tasks, ways, 1)
        classes = torch.empty_like(classes).scatter_(1, block_labels, classes)
    return Episode(
        support_x=_gather(images, rows[:, :, :shots], turns, dtype),
        support_y=labels.expand(tasks, ways, shots).reshape(tasks, -1),
        query_x=_gather(images, rows[:, :, shots:], turns, dtype),
        query_y=labels.expand(tasks, ways, per_class - shots).reshape(tasks, -1),
        mode=mode,
        classes=classes,
        mode_names=mode_names,
        support_index=store_rows[:, :, :shots].reshape(tasks, -1),
        query_index=store_rows[:, :, shots:].reshape(tasks, -1),
        turns=None if turns is None else turns.reshape(tasks, ways),
    )


def random_block_labels(tasks: int, ways: int, generator: torch.Generator) -> torch.Tensor:
    """``[T, N]``: a uniformly random permutation of the labels ``0..N-1`` per task (the class blocks' labels)."""
    return torch.rand(tasks, ways, generator=generator, device=generator.device).argsort(dim=1)


class EpisodeSampler:
    """Draws N-way K-shot tasks from one mode's store.

    Args:
        store: the mode's images for one split (conformed to the common size already).
        ways, shots, queries: N, K and Q (query images per class).
        meta_batch: tasks per :meth:`sample` call when ``num_tasks`` is not given.
        rotate: rotate each class of a task by a random multiple of 90 degrees
            (the published Omniglot augmentation: rotated characters act as new classes).
        dtype: image dtype of the episodes: float (scaled to [0, 1]) or ``torch.uint8``
            (raw; call :meth:`Episode.to_float` next to the learner, which on a GPU
            saves the memory traffic of float images between sampler and model).
        seed: seed of the sampler's own generator (on the store's device).
        mode_index, mode_names: how the tasks' ``mode`` is recorded (a mixture sets these).
    """

    def __init__(
        self,
        store: ImageStore,
        ways: int,
        shots: int,
        queries: int = 15,
        meta_batch: int = 1,
        rotate: bool = False,
        seed: int = 0,
        mode_index: int = 0,
        mode_names: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        for name, value, low in (
            ("ways", ways, 2),
            ("shots", shots, 1),
            ("queries", queries, 0),
            ("meta_batch", meta_batch, 1),
        ):
            if int(value) < low:
                raise KMLError(f"{name} must be at least {low}, got {value}")
        where = f"mode {store.mode!r} split {store.split!r}"
        if ways > store.num_classes:
            raise KMLError(f"{where} has {store.num_classes} classes; {ways}-way tasks need at least {ways}")
        sizes = store.class_sizes
        smallest = int(sizes.argmin())
        if int(sizes[smallest]) < shots + queries:
            raise KMLError(
                f"{where}: class {store.class_names[smallest]!r} has {int(sizes[smallest])} images, "
                f"fewer than shots + queries = {shots} + {queries}"
            )
        if rotate and store.image_shape[1] != store.image_shape[2]:
            raise KMLError(f"{where}: rotation needs square images, got {list(store.image_shape[1:])}")
        self.store = store
        self.ways, self.shots, self.queries = int(ways), int(shots), int(queries)
        self.meta_batch = int(meta_batch)
        self.rotate = rotate
        self.dtype = dtype
        self.mode_index = mode_index
        self.mode_names = tuple(mode_names) if mode_names is not None else (store.mode,)
        self.generator = _generator(seed, store.device)
        self._class_sizes = sizes.to(store.device)
        self._class_offsets = store.class_offsets.to(store.device)
        self._max_class_size = int(sizes.max())

    @property
    def device(self) -> torch.device:
        return self.store.device

    def sample(self, num_tasks: int | None = None, generator: torch.Generator | None = None) -> Episode:
        """Draw ``num_tasks`` (default ``meta_batch``) tasks as one :class:`Episode`."""
        tasks = self.meta_batch if num_tasks is None else int(num_tasks)
        return self.episode_from_rows(*self.draw_rows(tasks, self.generator if generator is None else generator))

    def episode_from_rows(
        self,
        classes: torch.Tensor,
        rows: torch.Tensor,
        turns: torch.Tensor | None,
        block_labels: torch.Tensor | None = None,
    ) -> Episode:
        """The :class:`Episode` of tasks drawn by :meth:`draw_rows` (``classes [T, N]``, ``rows [T, N, K+Q]``;
        ``block_labels [T, N]`` as :func:`assemble_episode` takes them)."""
        mode = torch.full((len(classes),), self.mode_index, dtype=torch.int64, device=self.device)
        return assemble_episode(
            self.store.images,
            classes,
            rows,
            turns,
            mode,
            self.shots,
            self.mode_names,
            self.dtype,
            block_labels=block_labels,
        )

    def draw_rows(
        self, tasks: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Draw which classes and images make ``tasks`` tasks, without touching the images.

        Returns ``classes [T, N]`` (class indices; label n stands for class ``classes[:, n]``),
        ``rows [T, N, K+Q]`` (rows of ``store.images``, support first) and ``turns [T, N, 1]``
        (quarter turns per class, or None when not rotating).
        """
        device = self.device
        # Random scores -> topk gives a uniformly random subset in a random order,
        # so the label n of a task is a random one of its classes.
        class_scores = torch.rand(tasks, self.store.num_classes, generator=generator, device=device)
        classes = class_scores.topk(self.ways, dim=1).indices  # [T, N]
        image_scores = torch.rand(tasks, self.ways, self._max_class_size, generator=generator, device=device)
        sizes = self._class_sizes[classes]  # [T, N]
        positions = torch.arange(self._max_class_size, device=device)
        image_scores.masked_fill_(positions >= sizes.unsqueeze(-1), 2.0)  # never pick past a class's end
        within = image_scores.topk(self.shots + self.queries, dim=2, largest=False).indices  # [T, N, K+Q]
        rows = self._class_offsets[classes].unsqueeze(-1) + within
        turns = None
        if self.rotate:
            turns = torch.randint(0, 4, (tasks, self.ways, 1), generator=generator, device=device)
        return classes, rows, turns

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def _check_mixture(stores: Sequence[ImageStore], policy: str, weights: Sequence[float] | None) -> tuple[str, ...]:
    """Refuse a mixture the samplers cannot draw from together; return its mode names."""
    if not stores:
        raise KMLError("a mixture needs at least one mode")
    if policy not in MIXTURE_POLICIES:
        raise KMLError(f"unknown mixture policy {policy!r}; choose one of {', '.join(MIXTURE_POLICIES)}")
    shapes = {store.image_shape for store in stores}
    if len(shapes) > 1:
        raise KMLError(f"modes of a mixture must share one image shape (conform them first), got {sorted(shapes)}")
    devices = {str(store.device) for store in stores}
    if len(devices) > 1:
        raise KMLError(f"modes of a mixture must be on one device, got {sorted(devices)}")
    names = tuple(store.mode for store in stores)
    if len(set(names)) != len(names):
        raise KMLError(f"a mode appears twice in the mixture: {list(names)}")
    # not (0 <= w < inf) also catches NaN, which every comparison lets through
    if weights is not None and (
        len(weights) != len(stores) or any(not 0 <= w < math.inf for w in weights) or sum(weights) <= 0
    ):
        raise KMLError(f"need one non-negative weight per mode ({len(stores)} finite numbers), got {list(weights)}")
    return names


def _join_images(samplers: Sequence[EpisodeSampler]) -> tuple[torch.Tensor, list[int]]:
    """All modes' images in one tensor and each mode's first row in it; each sampler's store becomes a view into it.

    A mixed meta-batch is then still one gather, and no second copy of the images is kept.
    """
    stores = [sampler.store for sampler in samplers]
    images = torch.cat([store.images for store in stores]) if len(stores) > 1 else stores[0].images
    row_base = [0]
    for sampler in samplers:
        count = len(sampler.store.images)
        sampler.store = replace(sampler.store, images=images[row_base[-1] : row_base[-1] + count])
        row_base.append(row_base[-1] + count)
    return images, row_base


class MixtureSampler:
    """Draws meta-batches whose tasks come from several modes.

    Policies (``policy``):

    - ``mixed`` (published default): the T tasks are spread over the modes
      round robin from a random starting mode (5/5 for 2 modes, 4/3/3 for 3);
      with ``weights``, counts follow the weights (largest remainder).
    - ``random``: each task draws its mode independently (with ``weights``).
    - ``per-batch``: all T tasks of a step share one mode, drawn with ``weights``.
    - ``alternate``: all T tasks of a step share one mode, modes taken in turn.

    Tasks of a meta-batch are ordered by mode; ``Episode.mode`` records each
    task's mode as an index into ``mode_names``. The mode plan uses a CPU
    generator and the image draws use the device generator, both seeded from
    ``seed`` and both saved by :meth:`state_dict`.

    ``replacement_pool`` (the released MMAML and KML codes, ``maml/datasets/multimodal_few_shot.py``): each mode
    draws this many tasks and every slot of the meta-batch picks one of its mode's with replacement, so a
    meta-batch may hold the same task twice (expected distinct tasks of 10 with a pool of 10: 8.19 for 2 modes,
    8.86 for 3, 9.5 for 5). ``None`` (kml): every task is drawn afresh.

    ``shuffle_block_labels`` (the released loaders' layout, ``released_refinement``): the support and query are still
    laid out in class blocks, but the blocks' labels are a random permutation per task, not ``0..N-1`` in order.
    """

    def __init__(
        self,
        stores: Sequence[ImageStore],
        ways: int,
        shots: int,
        queries: int = 15,
        meta_batch: int = 10,
        policy: str = "mixed",
        weights: Sequence[float] | None = None,
        rotate: Sequence[bool] | bool = False,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        replacement_pool: int | None = None,
        shuffle_block_labels: bool = False,
    ) -> None:
        names = _check_mixture(stores, policy, weights)
        # what restarted() builds again: every argument, so a copy never drifts from the original's settings
        self._arguments = dict(
            stores=list(stores),
            ways=ways,
            shots=shots,
            queries=queries,
            meta_batch=meta_batch,
            policy=policy,
            weights=weights,
            rotate=rotate,
            seed=seed,
            dtype=dtype,
            replacement_pool=replacement_pool,
            shuffle_block_labels=shuffle_block_labels,
        )
        if replacement_pool is not None and int(replacement_pool) < 1:
            raise KMLError(f"replacement_pool must be at least 1 task per mode, got {replacement_pool}")
        self.replacement_pool = None if replacement_pool is None else int(replacement_pool)
        self.shuffle_block_labels = bool(shuffle_block_labels)
        rotate = [rotate] * len(stores) if isinstance(rotate, bool) else list(rotate)
        self.mode_names = names
        self.meta_batch = int(meta_batch)
        self.policy = policy
        self.weights = torch.tensor(weights if weights is not None else [1.0] * len(stores), dtype=torch.float64)
        self.weights /= self.weights.sum()
        self.weighted = weights is not None
        self.samplers = [
            EpisodeSampler(store, ways, shots, queries, meta_batch, flip, seed, index, names, dtype)
            for index, (store, flip) in enumerate(zip(stores, rotate))
        ]
        self.images, self.row_base = _join_images(self.samplers)
        self.rotate_any = any(rotate)
        self.shots, self.dtype = int(shots), dtype
        self.generator = _generator(seed, stores[0].device)  # image draws, shared by all modes
        self.plan_generator = _generator(seed + 1, torch.device("cpu"))  # which mode each task comes from
        self.step = 0

    @property
    def num_modes(self) -> int:
        return len(self.samplers)

    def restarted(self) -> MixtureSampler:
        """A sampler with this one's stores and settings, at its first meta-batch (its own generators)."""
        return MixtureSampler(**self._arguments)

    def mode_counts(self) -> list[int]:
        """How many tasks of the next meta-batch each mode gets (advances the plan generator)."""
        modes, tasks, g = self.num_modes, self.meta_batch, self.plan_generator
        if self.policy == "mixed":
            start = int(torch.randint(modes, (1,), generator=g))
            if self.weighted:
                exact = self.weights * tasks
                counts = exact.floor().long()
                remainder = tasks - int(counts.sum())
                order = sorted(range(modes), key=lambda m: (-(exact[m] - counts[m]).item(), (m - start) % modes))
                for m in order[:remainder]:
                    counts[m] += 1
                return counts.tolist()
            counts = [0] * modes
            for offset in range(tasks):
                counts[(start + offset) % modes] += 1
            return counts
        if self.policy == "random":
            picks = torch.multinomial(self.weights, tasks, replacement=True, generator=g)
            return torch.bincount(picks, minlength=modes).tolist()
        if self.policy == "per-batch":
            chosen = int(torch.multinomial(self.weights, 1, generator=g))
        else:  # alternate
            chosen = self.step % modes
        return [tasks if m == chosen else 0 for m in range(modes)]

    def pool_picks(self, count: int) -> torch.Tensor:
        """``[count]``: for each of a mode's slots, the first slot that picked the same one of ``replacement_pool``
        tasks (``randint`` with replacement, as the released codes pick; advances the plan generator)."""
        assert self.replacement_pool is not None
        picks = torch.randint(self.replacement_pool, (count,), generator=self.plan_generator)
        same = picks.unsqueeze(0) == picks.unsqueeze(1)  # [count, count]
        return same.int().argmax(dim=1)  # argmax of a boolean row: its first True

    def sample(self) -> Episode:
        """Draw the next meta-batch of ``meta_batch`` tasks."""
        counts = self.mode_counts()
        self.step += 1
        classes, rows, store_rows, turns, modes = [], [], [], [], []
        sources: list[torch.Tensor] = []  # per mode, which of its drawn tasks each slot holds
        for index, (sampler, count) in enumerate(zip(self.samplers, counts)):
            if not count:
                continue
            mode_classes, mode_rows, mode_turns = sampler.draw_rows(count, self.generator)
            source = torch.arange(count, device=mode_rows.device)
            if self.replacement_pool is not None:  # slots that pick the same pool task share it
                source = self.pool_picks(count).to(mode_rows.device)
                mode_classes, mode_rows = mode_classes[source], mode_rows[source]
                mode_turns = None if mode_turns is None else mode_turns[source]
            sources.append(source)
            classes.append(mode_classes)
            store_rows.append(mode_rows)
            rows.append(mode_rows + self.row_base[index])
            if self.rotate_any:
                turns.append(mode_turns if mode_turns is not None else torch.zeros_like(mode_rows[:, :, :1]))
            modes.append(torch.full((count,), index, dtype=torch.int64, device=mode_rows.device))
        block_labels = None
        if self.shuffle_block_labels:  # drawn after every mode's images: the same images as without
            ways = self.samplers[0].ways
            block_labels = torch.cat([random_block_labels(len(s), ways, self.generator)[s] for s in sources])
        return assemble_episode(
            self.images,
            torch.cat(classes),
            torch.cat(rows),
            torch.cat(turns) if turns else None,
            torch.cat(modes),
            self.shots,
            self.mode_names,
            self.dtype,
            torch.cat(store_rows),
            block_labels,
        )

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "plan_generator": self.plan_generator.get_state(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.plan_generator.set_state(state["plan_generator"])
        self.step = int(state["step"])
