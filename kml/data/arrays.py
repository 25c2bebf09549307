"""Images and labels given as arrays (``ImageStore.from_arrays``): image layout and label values to class indices."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kml.data.splits import sorted_values
from kml.errors import KMLError

__all__ = ["images_first", "label_indices", "label_text", "names_of_labels"]


def images_first(images: np.ndarray | torch.Tensor, channels_last: bool | None, where: str) -> torch.Tensor:
    """uint8 images in any of :meth:`ImageStore.from_arrays`' layouts -> ``[n, C, H, W]`` on the CPU (C = 1 or 3)."""
    array = (
        images.detach().cpu() if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    )
    if array.dtype != torch.uint8:
        raise KMLError(
            f"{where}: images are {array.dtype}, expected uint8 0..255 (e.g. (x * 255).round().astype(np.uint8))"
        )
    if array.dim() == 3:
        array = array.unsqueeze(1)
    if array.dim() != 4:
        raise KMLError(
            f"{where}: images must be [num_images, H, W, C], [num_images, C, H, W] or [num_images, H, W], got {list(array.shape)}"
        )
    if channels_last is None:
        first, last = array.shape[1] in (1, 3), array.shape[3] in (1, 3)
        if first == last:
            raise KMLError(
                f"{where}: cannot tell the channel axis of images {list(array.shape)}; pass channels_last=True or False"
            )
        channels_last = last
    if channels_last:
        array = array.permute(0, 3, 1, 2)
    if array.shape[1] not in (1, 3):
        raise KMLError(f"{where}: images have {array.shape[1]} channels, expected 1 or 3 (shape {list(array.shape)})")
    return array


def label_indices(
    labels: np.ndarray | torch.Tensor | Sequence[Hashable], count: int, where: str
) -> tuple[torch.Tensor, list[Hashable] | None]:
    """``count`` labels as int64 ``[count]`` on the CPU, and the distinct values they index.

    Integer labels come back as they are, with ``None`` for the values (their sorted distinct values are the
    classes); any other hashable labels come back as indices into their sorted distinct values.
    """
    if isinstance(labels, torch.Tensor):
        items: Any = labels
    elif isinstance(labels, np.ndarray):
        items = labels if labels.dtype.kind in "iubfc" else labels.tolist()  # strings, objects: Python values
    else:
        items = list(labels)  # not np.asarray: it would turn a list of tuples into a 2-D array
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in items) and items:
            items = np.asarray(items, dtype=np.int64)
        elif any(isinstance(v, (float, np.floating, bool, np.bool_)) for v in items):
            items = np.asarray(items)  # refused below, with its dtype
    if isinstance(items, (np.ndarray, torch.Tensor)):
        tensor = torch.as_tensor(items)
        if tensor.dim() != 1 or len(tensor) != count:
            raise KMLError(f"{where}: need one label per image ({count}), got labels of shape {list(tensor.shape)}")
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise KMLError(f"{where}: labels must be integers or other hashable values, got {tensor.dtype}")
        return tensor.cpu().long(), None
    if len(items) != count:
        raise KMLError(f"{where}: need one label per image ({count}), got {len(items)} labels")
    try:
        values = sorted_values(set(items))
    except TypeError as error:  # e.g. a list as a label
        raise KMLError(f"{where}: labels must be hashable (a string, a number, a tuple), got {error}") from None
    index = {value: position for position, value in enumerate(values)}
    return torch.tensor([index[item] for item in items], dtype=torch.int64), values


def label_text(value: Hashable) -> str:
    """A class name from a label value: its text, a tuple's parts joined by ``/``."""
    if isinstance(value, tuple):
        return "/".join(label_text(part) for part in value)
    return str(value.item() if isinstance(value, np.generic) else value)


def names_of_labels(
    class_names: Mapping[Hashable, str] | Sequence[str] | None, values: Sequence[Hashable], where: str
) -> list[str]:
    """One class name per distinct label value (in class order): given in label order, by label, or the values as text."""
    if class_names is None:
        return [label_text(v) for v in values]
    if isinstance(class_names, Mapping):
        missing = [v for v in values if v not in class_names]
        if missing:
            raise KMLError(f"{where}: class_names has no name for label(s) {missing[:5]}")
        return [str(class_names[v]) for v in values]
    names = [str(name) for name in class_names]
    if len(names) != len(values):
        raise KMLError(f"{where}: {len(names)} class names for {len(values)} distinct labels")
    return names
