"""learn2learn data as kml data, and kml stores as learn2learn data.

:func:`store_from_dataset` and :func:`stores_from_tasksets` read learn2learn datasets and benchmark
task sets into kml :class:`~kml.data.store.ImageStore` s, :func:`export_folder` writes stores as a
``folder:PATH`` mode, and :func:`dataset_from_store` / :func:`taskset_from_store` go the other way.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kml.data.store import SPLITS, ImageStore
from kml.errors import KMLError
from kml.integrations.learn2learn.library import require_learn2learn

__all__ = [
    "dataset_from_store",
    "export_folder",
    "SPLIT_NAMES",
    "store_from_dataset",
    "stores_from_tasksets",
    "taskset_from_store",
]

# learn2learn benchmark split names -> kml split names.
SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}


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


# --------------------------------------------------------------------------- learn2learn data -> kml stores
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
    where = f"store {mode}/{split}"
    dataset = _base_dataset(data)
    groups = _labels_to_indices(dataset)
    if not groups:
        raise KMLError(f"{where}: the dataset holds no images")
    labels = _ordered_labels(groups)
    class_images = [
        _read_class(dataset, groups[label][:max_per_class] if max_per_class else groups[label], label, side, where)
        for label in labels
    ]
    if channels is None:
        channels = 3 if any(image.shape[0] == 3 for images in class_images for image in images) else 1
    tensors = _stack_classes(class_images, side, channels, where)
    info = {"source": f"learn2learn dataset {type(dataset).__name__}", "labels": [str(label) for label in labels]}
    return ImageStore.from_class_arrays(tensors, [str(label) for label in labels], mode, split, info)


def _ordered_labels(groups: Mapping[Any, list[int]]) -> list[Any]:
    """The labels sorted, or in dataset order when they do not sort (mixed types)."""
    try:
        return sorted(groups)
    except TypeError:
        return list(groups)


def _read_class(dataset: Any, indices: list[int], label: Any, side: int | None, where: str) -> list[torch.Tensor]:
    """The images of one class as uint8 ``[C, H, W]``; without ``side`` they must share one size."""
    images = [_image_to_uint8(dataset[index][0]) for index in indices]
    shapes = {tuple(image.shape[1:]) for image in images}
    if side is None and len(shapes) > 1:
        raise KMLError(
            f"{where}: class {label!r} has images of several sizes {sorted(shapes)}; pass side= to resize them to one"
        )
    return images


def _stack_classes(
    class_images: list[list[torch.Tensor]], side: int | None, channels: int, where: str
) -> list[torch.Tensor]:
    """Per class one uint8 ``[n, channels, H, W]`` tensor; every class must end up the same size."""
    tensors = [torch.cat([_conform(image[None], side, channels) for image in images]) for images in class_images]
    sides = {tuple(t.shape[-2:]) for t in tensors}
    if len(sides) > 1:
        raise KMLError(f"{where}: classes have images of different sizes {sorted(sides)}; pass side=")
    return tensors


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


# --------------------------------------------------------------------------- kml stores -> learn2learn data
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
