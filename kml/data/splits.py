"""Class splits: whole classes to train / val / test by a seeded shuffle, for folders, CUB, Aircraft and arrays."""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from kml.errors import KMLError

__all__ = [
    "DEFAULT_SPLIT_FRACTIONS",
    "DEFAULT_SPLIT_SEED",
    "SPLITS",
    "check_fractions",
    "normalised_fractions",
    "sorted_values",
    "split_by_class",
    "split_classes",
]

SPLITS = ("train", "val", "test")
# The class split of CUB, Aircraft, folder modes and split_by_class: 70 / 15 / 15 % after a seeded shuffle.
DEFAULT_SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
DEFAULT_SPLIT_SEED = 123


def check_fractions(fractions: Sequence[float | str], what: str = "split fractions") -> tuple[float, float, float]:
    """Three non-negative finite numbers (train, val, test) with a positive sum, as floats; else a one-line error."""
    try:
        values: tuple[float, ...] = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(f) and f >= 0 for f in values) or sum(values) <= 0:
        shown = list(fractions) if isinstance(fractions, (list, tuple)) else fractions
        raise KMLError(f"{what} must be three non-negative numbers (train, val, test) with a positive sum; got {shown}")
    return values[0], values[1], values[2]


def normalised_fractions(fractions: Sequence[float | str], what: str = "split fractions") -> tuple[float, float, float]:
    """:func:`check_fractions`, scaled to sum to 1 and rounded to 6 decimals: ``80/10/10`` and ``0.8/0.1/0.1``
    are one split (and one cache)."""
    values = check_fractions(fractions, what)
    total = sum(values)
    train, val, test = (round(f / total, 6) for f in values)
    return train, val, test


def split_classes(
    names: Sequence[Hashable],
    fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = DEFAULT_SPLIT_SEED,
) -> dict[str, list[Hashable]]:
    """Cut classes into train / val / test: ``names`` in the order given, shuffled with
    ``numpy.random.RandomState(seed)``, then ``int(f / sum(fractions) * n)`` classes for train and for val and the
    rest for test (the published MMAML conversion scripts' rule; fractions need not sum to 1)."""
    fractions = check_fractions(fractions)
    order = list(names)
    np.random.RandomState(seed).shuffle(order)  # type: ignore[arg-type]
    total = sum(fractions)
    n_train, n_val = (int(f / total * len(order)) for f in fractions[:2])
    return {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}


def split_by_class(
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor | Sequence[Hashable],
    fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = DEFAULT_SPLIT_SEED,
) -> dict[str, tuple[Any, Any]]:
    """Split a labelled dataset by class into ``{"train": (images, labels), "val": ..., "test": ...}``.

    Few-shot models are tested on classes never seen in training, so whole classes, not images, go to each
    split: the distinct labels (integers or any hashable values, as :meth:`ImageStore.from_arrays` takes them)
    are sorted, shuffled with ``numpy.random.RandomState(seed)`` and cut by ``fractions`` with
    :func:`split_classes`, the rule (and with the defaults, 70 / 15 / 15 % and seed 123, the split) of a
    ``folder:PATH`` mode of class folders with the same names. Each part keeps the input's type (numpy array,
    tensor, list) and the images' order; a split that gets no class is empty. Then, per split::

        stores = {split: ImageStore.from_arrays(x, y, mode="mine", split=split)
                  for split, (x, y) in split_by_class(images, labels).items()}
    """
    count = len(images)
    if isinstance(labels, (np.ndarray, torch.Tensor)):
        items = labels.tolist() if labels.ndim == 1 else None
    else:
        items = list(labels)
    if items is None or len(items) != count:
        shape = list(labels.shape) if isinstance(labels, (np.ndarray, torch.Tensor)) else [len(items or [])]
        raise KMLError(f"split_by_class: need one label per image ({count}), got labels of shape {shape}")
    try:
        values = sorted_values(set(items))
    except TypeError as error:
        raise KMLError(f"split_by_class: labels must be hashable (a string, a number, a tuple), got {error}") from None
    part = {value: split for split, chosen in split_classes(values, fractions, seed).items() for value in chosen}
    out: dict[str, tuple[Any, Any]] = {}
    for split in SPLITS:
        index = np.array([i for i, item in enumerate(items) if part[item] == split], dtype=np.int64)
        out[split] = (_take(images, index), _take(labels, index))
    return out


def _take(values: Any, index: np.ndarray) -> Any:
    """``values`` at the positions ``index``, of the same kind (numpy array, tensor, list)."""
    if isinstance(values, torch.Tensor):
        return values[torch.from_numpy(index).to(values.device)]
    if isinstance(values, np.ndarray):
        return values[index]
    return [values[i] for i in index]


def sorted_values(values: Iterable[Hashable]) -> list[Hashable]:
    """Distinct label values in order: sorted when they compare, else by type name, then text."""
    values = list(values)
    try:
        return sorted(values)  # type: ignore[type-var]
    except TypeError:
        return sorted(values, key=lambda value: (type(value).__name__, repr(value)))
