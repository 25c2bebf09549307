"""FC100: CIFAR-100 regrouped by its 20 superclasses (Oreshkin et al. 2018).

Raw layout (the Toronto python archive)::

    cifar-100-python.tar.gz -> cifar-100-python/{train,test,meta}   (pickles)
        train/test: b'data' uint8 [N, 3072] (1024 red, 1024 green, 1024 blue, row-major),
                    b'fine_labels' [N] in 0..99, b'coarse_labels' [N] in 0..19
        meta:       b'fine_label_names' [100], b'coarse_label_names' [20]

Split (published MMAML/KML): train and test pooled (600 images per class), the
classes grouped by superclass: train superclasses 1 2 3 4 5 6 9 10 15 17 18 19,
val 8 11 13 16, test 0 7 12 14 -> 60 / 20 / 20 classes. Images are stored at
their native 32 x 32 as the uint8 bytes of the archive: no scaling at all
(the released converter scales twice and corrupts colours; this one cannot).
Reuses torchvision's ``<root>/cifar-100-python/`` when present.
"""

from __future__ import annotations

import numpy as np

from kml.data.sources.base import Context, ConversionPlan
from kml.data.sources.fetch import Resource
from kml.data.sources.images import ClassPlan, key, load_pickle
from kml.errors import KMLError

__all__ = [
    "build",
    "FOLDER",
    "LICENCE",
    "NAME",
    "RESOURCES",
    "SIDE",
    "SOURCE",
    "SPLIT_RULES",
    "SUPERCLASSES",
    "VARIANTS",
]

NAME = "fc100"
SIDE = 32
SOURCE = "CIFAR-100 python version (Krizhevsky 2009) regrouped as FC100 (Oreshkin et al. 2018)"
LICENCE = "no licence stated; free for research, cite Krizhevsky 2009 (cs.toronto.edu/~kriz/cifar.html)"
RESOURCES = (
    Resource(
        "cifar-100-python.tar.gz",
        (
            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            "http://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        ),
        "md5:eb9058c3a382ffc7106e4002c42a8d85",  # torchvision's
        169_000_000,
    ),
)
SUPERCLASSES = {
    "train": (1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19),
    "val": (8, 11, 13, 16),
    "test": (0, 7, 12, 14),
}
VARIANTS = {"published": SUPERCLASSES}
SPLIT_RULES = {
    "published": "CIFAR-100 train+test pooled; classes by superclass: train "
    + " ".join(map(str, SUPERCLASSES["train"]))
    + ", val "
    + " ".join(map(str, SUPERCLASSES["val"]))
    + ", test "
    + " ".join(map(str, SUPERCLASSES["test"]))
}
FOLDER = "cifar-100-python"


def _read(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    batch = load_pickle(path)
    data = np.asarray(key(batch, "data"))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * SIDE * SIDE:
        raise KMLError(f"{path}: expected uint8 data [N, {3 * SIDE * SIDE}], got {data.dtype} {list(data.shape)}")
    fine = np.asarray(key(batch, "fine_labels"), dtype=np.int64)
    coarse = np.asarray(key(batch, "coarse_labels"), dtype=np.int64)
    if not len(fine) == len(coarse) == len(data):
        raise KMLError(f"{path}: {len(data)} images but {len(fine)} fine and {len(coarse)} coarse labels")
    return data, fine, coarse


def build(ctx: Context) -> ConversionPlan:
    expect = [f"{FOLDER}/train", f"{FOLDER}/test", f"{FOLDER}/meta"]
    folder = ctx.obtain(RESOURCES, expect, reuse=[(ctx.root, "torchvision CIFAR100 download")]) / FOLDER
    parts = [_read(folder / name) for name in ("train", "test")]  # pooled, as published
    data = np.concatenate([p[0] for p in parts])
    fine = np.concatenate([p[1] for p in parts])
    coarse = np.concatenate([p[2] for p in parts])
    meta = load_pickle(folder / "meta")
    fine_names = [n.decode() if isinstance(n, bytes) else str(n) for n in key(meta, "fine_label_names")]
    coarse_names = [n.decode() if isinstance(n, bytes) else str(n) for n in key(meta, "coarse_label_names")]
    if len(fine_names) != 100 or len(coarse_names) != 20 or fine.min() < 0 or fine.max() > 99 or coarse.max() > 19:
        raise KMLError(f"{folder}: expected 100 fine and 20 coarse labels; is this the CIFAR-100 archive?")
    superclass_of = {}
    for f, c in zip(fine.tolist(), coarse.tolist()):
        if superclass_of.setdefault(f, c) != c:
            raise KMLError(f"{folder}: fine class {fine_names[f]!r} appears under two superclasses")
    images = data.reshape(-1, 3, SIDE, SIDE)  # the archive's own channel-major layout: no transpose, no scaling
    splits = {}
    for split, superclasses in VARIANTS[ctx.variant].items():
        classes = sorted(f for f, c in superclass_of.items() if c in superclasses)
        splits[split] = [
            ClassPlan(f"{coarse_names[superclass_of[f]]}/{fine_names[f]}", np.flatnonzero(fine == f).tolist())
            for f in classes
        ]
    n_train = len(parts[0][0])

    def describe(index: int) -> str:  # the pickle and row of a pooled image
        return f"{FOLDER}/train[{index}]" if index < n_train else f"{FOLDER}/test[{index - n_train}]"

    return ConversionPlan(
        splits,
        decode=lambda index: images[index],
        describe=describe,
        info={
            "split_rule": SPLIT_RULES[ctx.variant],
            "preprocessing": "none: the archive's uint8 32x32 RGB bytes as they are",
        },
    )
