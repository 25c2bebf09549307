"""kml inside the learn2learn ecosystem, and learn2learn's data inside kml.

learn2learn is optional: it is imported inside the functions that need it, and
a missing or broken install raises a one-line :class:`~kml.errors.KMLError`
with the install command (``python -m kml.integrations.install_learn2learn``,
which rebuilds learn2learn 0.2.0 for current Python).

learn2learn data as kml data
    :func:`store_from_dataset` turns a learn2learn dataset (a ``MetaDataset``,
    the ``.dataset`` of a ``Taskset``, or any dataset of ``(image, label)``
    pairs) into a kml :class:`~kml.data.store.ImageStore`, one mode and split;
    :func:`stores_from_tasksets` does the three splits of a learn2learn
    benchmark (``learn2learn.vision.benchmarks.get_tasksets(...)``), and
    :func:`export_folder` writes stores as an image folder, so that the data
    is a named kml mode (``folder:PATH``) for ``kml-train``, the trainer and
    evaluation. kml's samplers then draw the tasks.
    :class:`TasksetSampler` instead lets learn2learn draw the tasks (with all
    its task transforms) and hands them to kml learners as
    :class:`~kml.data.episode.Episode` meta-batches.
    :func:`dataset_from_store` goes the other way: a kml store as a learn2learn
    ``MetaDataset``.

kml models inside learn2learn
    :class:`ModulatedBackbone` is a kml backbone with one task's modulation
    fixed: an ``nn.Module`` mapping images to logits whose only parameters are
    the backbone's, so ``learn2learn.algorithms.MAML`` can ``clone()`` and
    ``adapt()`` it. :func:`task_module` builds it from a learner and a support
    set; :func:`maml_forward` runs a whole kml meta-batch through
    learn2learn's MAML (its per-task clone/adapt loop) and returns the same
    :class:`~kml.algorithms.LearnerOutput` as the learner's own batched forward.

kml episodes in learn2learn's form
    :func:`episode_to_tasks` gives per task ``((support_x, support_y),
    (query_x, query_y))``, what ``learn2learn.data.partition_task`` returns;
    :func:`episode_to_batches` gives per task the concatenated ``(data,
    labels)`` a learn2learn ``Taskset`` yields, with a support mask, in the
    layout ``partition_task`` splits or the interleaved one of learn2learn's
    example scripts (support at even positions); :func:`episode_from_tasks`
    reads such tasks back.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kml.data.episode import Episode
from kml.data.store import SPLITS, ImageStore
from kml.errors import KMLError
from kml.models.backbone import Backbone, Modulation

__all__ = [
    "dataset_from_store",
    "episode_from_tasks",
    "episode_to_batches",
    "episode_to_tasks",
    "export_folder",
    "INSTALL_COMMAND",
    "maml_forward",
    "ModulatedBackbone",
    "require_learn2learn",
    "SPLIT_NAMES",
    "store_from_dataset",
    "stores_from_tasksets",
    "task_module",
    "taskset_from_store",
    "TasksetSampler",
]

INSTALL_COMMAND = "python -m kml.integrations.install_learn2learn"
# learn2learn benchmark split names -> kml split names.
SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}


def require_learn2learn() -> Any:
    """Import and return the ``learn2learn`` module, or raise a :class:`KMLError` saying how to install it.

    ``import learn2learn`` imports gym, which prints a deprecation notice to stderr; the notice is
    swallowed (it concerns gym's reinforcement-learning users, not kml).
    """
    module = sys.modules.get("learn2learn")
    if module is not None:
        return module
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            import learn2learn
    except ImportError as error:
        raise KMLError(f"learn2learn is not importable ({error}); install it with: {INSTALL_COMMAND}") from None
    return learn2learn


# --------------------------------------------------------------------------- images
def _image_to_uint8(image: Any) -> torch.Tensor:
    """One image (PIL image, array or tensor) -> uint8 ``[C, H, W]`` with C = 1 or 3.

    Tensors are read as ``[C, H, W]`` (``[H, W, C]`` when only the last axis is 1, 3 or 4), arrays
    as ``[H, W, C]`` (PIL's layout; ``[C, H, W]`` when only the first axis is). Float images are
    taken in [0, 1] (``ToTensor``) or, when any value exceeds 1, in 0..255.
    """
    is_tensor = isinstance(image, torch.Tensor)
    if not is_tensor and not isinstance(image, np.ndarray):
        if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image
            image = image.convert("L" if image.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB")
        image = np.asarray(image)
    x = torch.as_tensor(np.array(image, copy=True) if not is_tensor else image.detach().cpu())
    if x.dim() == 2:
        x = x.unsqueeze(0)
    elif x.dim() == 3:
        first, last = x.shape[0] in (1, 3, 4), x.shape[-1] in (1, 3, 4)
        channels_last = (last and not first) if is_tensor else (last or not first)
        if channels_last:
            x = x.permute(2, 0, 1)
    else:
        raise KMLError(f"cannot read an image of shape {list(x.shape)}; expected [C, H, W], [H, W, C] or [H, W]")
    if x.shape[0] == 4:
        x = x[:3]  # drop alpha
    if x.shape[0] not in (1, 3):
        raise KMLError(f"images must have 1 or 3 channels (4 with alpha), got shape {list(x.shape)}")
    if x.dtype == torch.uint8:
        return x.contiguous()
    if x.dtype == torch.bool:
        return x.to(torch.uint8) * 255
    x = x.float()
    if x.numel() and float(x.min()) < -1e-6:
        raise KMLError(
            "the dataset yields images with negative values (normalised); build it without "
            "transforms.Normalize to store its images (kml stores uint8 pixels)"
        )
    if x.numel() and float(x.max()) <= 1.0 + 1e-6:
        x = x * 255
    return x.round().clamp_(0, 255).to(torch.uint8)


def _conform(images: torch.Tensor, side: int | None, channels: int) -> torch.Tensor:
    """uint8 ``[n, C, H, W]`` -> ``[n, channels, side, side]`` (antialiased bilinear, grey <-> RGB)."""
    out = images
    if side is not None and tuple(out.shape[-2:]) != (side, side):
        resized = F.interpolate(out.float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        out = resized.round().clamp_(0, 255).to(torch.uint8)
    if out.shape[1] == 1 and channels == 3:
        out = out.expand(-1, 3, -1, -1).contiguous()
    elif out.shape[1] == 3 and channels == 1:
        out = out.float().mean(dim=1, keepdim=True).round().to(torch.uint8)
    return out


def _label_value(label: Any) -> Any:
    return label.item() if hasattr(label, "item") else label


def _base_dataset(data: Any) -> Any:
    """The dataset behind a learn2learn ``Taskset``/``TaskDataset``, or ``data`` itself."""
    if hasattr(data, "task_transforms") and hasattr(data, "dataset"):
        return data.dataset
    return data


def _labels_to_indices(dataset: Any) -> dict[Any, list[int]]:
    """``label -> indices`` from a learn2learn ``MetaDataset``'s bookkeeping, or by reading every item."""
    if hasattr(dataset, "labels_to_indices"):
        return {label: list(indices) for label, indices in dict(dataset.labels_to_indices).items()}
    groups: dict[Any, list[int]] = {}
    for index in range(len(dataset)):
        groups.setdefault(_label_value(dataset[index][1]), []).append(index)
    return groups


# --------------------------------------------------------------------------- (a) learn2learn data -> kml
def store_from_dataset(
    data: Any,
    mode: str = "learn2learn",
    split: str = "train",
    side: int | None = None,
    channels: int | None = None,
    max_per_class: int | None = None,
) -> ImageStore:
    """A learn2learn dataset (or ``Taskset``) as a kml store: one mode and split, images grouped by class.

    Args:
        data: a learn2learn ``MetaDataset`` (its label bookkeeping is used), a ``Taskset`` /
            ``TaskDataset`` (its ``.dataset``: the images after the dataset's own transform,
            without the task transforms), or any indexable dataset of ``(image, label)`` pairs.
            Images may be PIL images, arrays or tensors; float images in [0, 1] or 0..255.
        mode, split: recorded in the store (``split`` is a kml split: train, val or test).
        side: resize every image to ``side`` x ``side`` (needed when the images differ in size).
        channels: 1 or 3; by default 3 when any image is in colour, else 1.
        max_per_class: keep at most this many images of each class (the first ones).

    Classes are ordered by label (sorted when the labels sort), class names are the labels as text.
    Needs no learn2learn import: it reads the dataset through ``len``, ``[]`` and
    ``labels_to_indices`` only.
    """
    if split not in SPLITS:
        raise KMLError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if channels not in (None, 1, 3):
        raise KMLError(f"channels must be 1 or 3, got {channels}")
    dataset = _base_dataset(data)
    groups = _labels_to_indices(dataset)
    if not groups:
        raise KMLError(f"store {mode}/{split}: the dataset holds no images")
    try:
        labels = sorted(groups)
    except TypeError:
        labels = list(groups)
    class_images = []
    for label in labels:
        indices = groups[label][:max_per_class] if max_per_class else groups[label]
        images = [_image_to_uint8(dataset[index][0]) for index in indices]
        shapes = {tuple(image.shape[1:]) for image in images}
        if side is None and len(shapes) > 1:
            raise KMLError(
                f"store {mode}/{split}: class {label!r} has images of several sizes {sorted(shapes)}; "
                "pass side= to resize them to one"
            )
        class_images.append(images)
    if channels is None:
        channels = 3 if any(image.shape[0] == 3 for images in class_images for image in images) else 1
    tensors = []
    for images in class_images:
        tensors.append(torch.cat([_conform(image[None], side, channels) for image in images]))
    sides = {tuple(t.shape[-2:]) for t in tensors}
    if len(sides) > 1:
        raise KMLError(f"store {mode}/{split}: classes have images of different sizes {sorted(sides)}; pass side=")
    info = {"source": f"learn2learn dataset {type(dataset).__name__}", "labels": [str(label) for label in labels]}
    return ImageStore.from_class_arrays(tensors, [str(label) for label in labels], mode, split, info)


def stores_from_tasksets(tasksets: Any, mode: str = "learn2learn", **options: Any) -> dict[str, ImageStore]:
    """The splits of a learn2learn benchmark as kml stores ``{"train", "val", "test"}``.

    ``tasksets`` is what ``learn2learn.vision.benchmarks.get_tasksets(name, ...)`` returns (a
    ``BenchmarkTasksets`` with ``train``, ``validation``, ``test``) or a mapping from split names
    (``train``, ``validation``/``val``, ``test``) to tasksets or datasets. ``options`` go to
    :func:`store_from_dataset` (``side``, ``channels``, ``max_per_class``).
    """
    if isinstance(tasksets, Mapping):
        items = list(tasksets.items())
    elif hasattr(tasksets, "_fields"):  # a namedtuple, e.g. BenchmarkTasksets
        items = list(tasksets._asdict().items())
    else:
        items = [(name, getattr(tasksets, name)) for name in ("train", "validation", "test") if hasattr(tasksets, name)]
    stores: dict[str, ImageStore] = {}
    for name, taskset in items:
        split = SPLIT_NAMES.get(str(name).lower())
        if split is None:
            raise KMLError(f"unknown split name {name!r}; use train, validation (or val) and test")
        if taskset is not None:
            stores[split] = store_from_dataset(taskset, mode, split, **options)
    if not stores:
        raise KMLError(
            "no splits found: pass get_tasksets(...)'s result or a mapping {'train': ..., 'validation': ..., 'test': ...}"
        )
    return stores


def _folder_name(index: int, name: str) -> str:
    return f"{index:05d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)[:60]}"


def export_folder(stores: Mapping[str, ImageStore], path: str | os.PathLike, overwrite: bool = False) -> str:
    """Write stores as an image folder ``PATH/<split>/<class>/<n>.png`` and return its mode name ``folder:PATH``.

    ``kml-train --modes folder:PATH``, the trainer and evaluation then use it like any mode (the
    folder is converted to a kml cache on first use, at 84 x 84 by default, and brought to the
    run's image size). ``stores`` maps kml split names to stores (:func:`stores_from_tasksets`).
    """
    from PIL import Image

    root = Path(path).expanduser().absolute()
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise KMLError(f"{root} exists and is not empty; pass overwrite=True or choose another folder")
        shutil.rmtree(root)
    for split, store in stores.items():
        split = SPLIT_NAMES.get(split, split)
        if split not in SPLITS:
            raise KMLError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        for index, name in enumerate(store.class_names):
            folder = root / split / _folder_name(index, name)
            folder.mkdir(parents=True, exist_ok=True)
            images = store.class_images(index).cpu()
            for number, image in enumerate(images):
                array = image.permute(1, 2, 0).numpy()
                picture = Image.fromarray(array[:, :, 0], "L") if array.shape[2] == 1 else Image.fromarray(array, "RGB")
                picture.save(folder / f"{number:05d}.png")
    return f"folder:{root}"


class _StoreDataset(torch.utils.data.Dataset):
    """A kml store as a torch dataset of ``(float image [C, H, W] in [0, 1], label)``."""

    def __init__(self, store: ImageStore, dtype: torch.dtype) -> None:
        self.store = store
        self.dtype = dtype
        self.labels = store.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.store.images[index].to(self.dtype) / 255, self.labels[index]


def dataset_from_store(store: ImageStore, dtype: torch.dtype = torch.float32) -> Any:
    """A kml store as a ``learn2learn.data.MetaDataset`` (items: float ``[C, H, W]`` in [0, 1], class index).

    Build learn2learn tasks over kml data with it, e.g.
    ``Taskset(ds, [NWays(ds, 5), KShots(ds, 1 + 15), LoadData(ds), RemapLabels(ds), ConsecutiveLabels(ds)])``.
    """
    l2l = require_learn2learn()
    offsets = store.class_offsets.tolist()
    labels_to_indices = {c: list(range(offsets[c], offsets[c + 1])) for c in range(store.num_classes)}
    return l2l.data.MetaDataset(_StoreDataset(store, dtype), labels_to_indices=labels_to_indices)


def taskset_from_store(
    store: ImageStore, ways: int, samples: int, classes: int | None = None, num_tasks: int = -1
) -> Any:
    """A learn2learn ``Taskset`` of ``ways``-way tasks with ``samples`` images per class over a kml store (its
    first ``classes`` classes, default all), built with learn2learn's own transforms (NWays, KShots, LoadData,
    RemapLabels, ConsecutiveLabels)."""
    l2l = require_learn2learn()
    dataset = dataset_from_store(store)
    if classes is not None:
        dataset = l2l.data.FilteredMetaDataset(dataset, list(range(classes)))
    transforms = [
        l2l.data.transforms.NWays(dataset, ways),
        l2l.data.transforms.KShots(dataset, samples),
        l2l.data.transforms.LoadData(dataset),
        l2l.data.transforms.RemapLabels(dataset),
        l2l.data.transforms.ConsecutiveLabels(dataset),
    ]
    return l2l.data.Taskset(dataset, transforms, num_tasks=num_tasks)


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
    support_x, support_y, query_x, query_y, classes = [], [], [], [], []
    layout = None
    for number, task in enumerate(tasks):
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
        shape = (len(values), per_class, *data.shape[1:])
        if layout is not None and shape != layout:
            raise KMLError(f"task {number} has shape {shape} (ways, samples per class, C, H, W), task 0 has {layout}")
        layout = shape
        if generator is not None:
            values = values[torch.randperm(len(values), generator=generator)]
        grouped = torch.stack([data[labels == value] for value in values.to(labels.device)])  # [N, K+Q, C, H, W]
        ways = len(values)
        support_x.append(grouped[:, :shots].flatten(0, 1))
        query_x.append(grouped[:, shots:].flatten(0, 1))
        support_y.append(torch.arange(ways).repeat_interleave(shots))
        query_y.append(torch.arange(ways).repeat_interleave(per_class - shots))
        classes.append(values.cpu().long())

    def images(parts: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(parts)
        if dtype == torch.uint8 or x.dtype != torch.uint8:
            return x.to(dtype)
        return x.to(dtype) / 255

    device = support_x[0].device
    return Episode(
        support_x=images(support_x),
        support_y=torch.stack(support_y).to(device),
        query_x=images(query_x),
        query_y=torch.stack(query_y).to(device),
        mode=torch.zeros(len(tasks), dtype=torch.int64, device=device),
        classes=torch.stack(classes).to(device),
        mode_names=(mode_name,),
    )


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


# --------------------------------------------------------------------------- (b) kml models in learn2learn
class ModulatedBackbone(nn.Module):
    """A kml :class:`~kml.models.Backbone` with one task's modulation fixed: ``x [B, C, H, W] -> logits``.

    Its parameters are the backbone's (shared, not copied), so ``learn2learn.algorithms.MAML``
    adapts exactly the parameters kml's inner loop adapts. The modulation tensors are buffers
    (``modulation_<key>``, not saved in the state dict) and move with ``.to()``. With
    ``detach=True`` (default) the modulation is a constant; with ``detach=False`` it keeps its
    autograd graph, so the outer loss also reaches the task encoder and modulation generator that
    produced it (learn2learn's ``clone()`` keeps buffers that require grad in the graph).
    """

    def __init__(self, backbone: Backbone, modulation: Modulation | None = None, detach: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.modulation_keys: tuple[str, ...] = tuple(sorted(modulation or {}))
        for key in self.modulation_keys:
            value = modulation[key]  # type: ignore[index]
            self.register_buffer(f"modulation_{key}", value.detach() if detach else value, persistent=False)

    @property
    def modulation(self) -> Modulation | None:
        if not self.modulation_keys:
            return None
        return {key: getattr(self, f"modulation_{key}") for key in self.modulation_keys}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x, self.modulation)


def _check_maml(config: Any) -> None:
    if config.algorithm != "maml":
        raise KMLError(f"learn2learn's MAML needs a MAML learner, this one is {config.method}")
    if config.meta_sgd:
        raise KMLError(
            "learn2learn.algorithms.MAML has one inner rate; use learn2learn.algorithms.MetaSGD for meta_sgd learners"
        )
    if config.inner_grad_clip is not None:
        raise KMLError(
            "learn2learn.algorithms.MAML does not clip inner gradients; build the learner with inner_grad_clip=None"
        )
    if config.inner_grad_clamp is not None:
        raise KMLError(
            "learn2learn.algorithms.MAML does not clamp inner gradients; build the learner with inner_grad_clamp=None"
        )
    if config.mode_inner_lr is not None or config.mode_inner_steps is not None:
        raise KMLError(
            "learn2learn.algorithms.MAML has one inner rate and step count; build the learner without mode_inner_lr/steps"
        )


def task_module(
    learner: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor, mode: int = 0, detach: bool = True
) -> ModulatedBackbone:
    """The backbone of ``learner`` (of mode ``mode`` for Multi-MAML) with the modulation of one support set.

    ``support_x [N*K, C, H, W]``, ``support_y [N*K]``. Wrap it as
    ``learn2learn.algorithms.MAML(module, lr=learner.config.inner_lr, first_order=learner.config.first_order)``.
    """
    model = learner.models[mode if learner.config.multi_maml else 0]
    modulation = model.modulation(support_x, support_y)
    return ModulatedBackbone(model.backbone, modulation, detach=detach)


def maml_forward(learner: nn.Module, episode: Episode, inner_steps: int | None = None, detach_modulation: bool = False):
    """The learner's MAML meta-batch loss computed by ``learn2learn.algorithms.MAML``, task by task.

    For every task: the modulation from the support set, :class:`ModulatedBackbone`,
    ``MAML(module, lr=inner_lr, first_order=first_order)``, ``clone()``, ``inner_steps`` times
    ``adapt(cross_entropy(clone(support_x), support_y))``, then the query loss. With the default
    ``detach_modulation=False`` the loss depends on every learner parameter as in kml's own forward,
    which it equals (tests/test_learn2learn.py). Returns a :class:`~kml.algorithms.LearnerOutput`.
    """
    from kml.algorithms.learner import LearnerOutput
    from kml.algorithms.losses import accuracy

    l2l = require_learn2learn()
    config = learner.config
    _check_maml(config)
    if inner_steps is None:
        inner_steps = config.inner_steps if learner.training else config.eval_inner_steps
    modes = episode.mode.tolist()
    losses, accuracies = [], []
    for t in range(episode.num_tasks):
        support_x, support_y = episode.support_x[t], episode.support_y[t]
        query_x, query_y = episode.query_x[t], episode.query_y[t]
        module = task_module(learner, support_x, support_y, modes[t], detach=detach_modulation)
        maml = l2l.algorithms.MAML(module, lr=config.inner_lr, first_order=config.first_order)
        with torch.enable_grad():  # the inner loop differentiates even under torch.no_grad
            clone = maml.clone()
            for _ in range(inner_steps):
                clone.adapt(F.cross_entropy(clone(support_x), support_y))
        logits = clone(query_x)
        losses.append(F.cross_entropy(logits, query_y))
        accuracies.append(accuracy(logits, query_y))
    task_loss = torch.stack(losses)
    return LearnerOutput(task_loss.mean(), task_loss, torch.stack(accuracies).detach())


# --------------------------------------------------------------------------- (c) kml episodes -> learn2learn
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
