"""FC100: CIFAR-100 regrouped by its 20 superclasses (Oreshkin et al. 2018).

Raw layout (the Toronto python archive)::

    cifar-100-python.tar.gz -> cifar-100-python/{train,test,meta}   (pickles)
        train/test: b'data' uint8 [N, 3072] (1024 red, 1024 green, 1024 blue, row-major),
                    b'fine_labels' [N] in 0..99, b'coarse_labels' [N] in 0..19
        meta:       b'fine_label_names' [100], b'coarse_label_names' [20]

Split (published MMAML/KML): train and test pooled (600 images per class), the
classes grouped by superclass: train superclasses 1 2 3 4 5 6 9 10 15 17 18 19,
val 8 11 13 16, test 0 7 12 14 -> 60 / 20 / 20 classes. Images are stored at
their native 32 x 32 as the uint8 bytes of the archive: no scaling at all.

``colours="released"`` (``kml-download --fc100-colours released``) stores
FC100 as the released MMAML/KML loader feeds it to the network instead: that
loader turns the 0..255 bytes into a float tensor (``torch.FloatTensor``,
``maml/datasets/cifar100.py`` line 28 of MMAML-Classification, the same line
of KML-Classification's ``scripts/datasets/cifar100.py``) and passes it to
torchvision's ``ToPILImage`` (line 71), which takes a float image to be in
0..1 and converts it with ``mul(255).byte()`` (``(x * 255).astype(uint8)``
in torchvision 0.29): every byte ``x`` becomes ``x * 255 mod 256`` (that is
``256 - x``, and 0 stays 0: a negative, black kept black), as torch and numpy
cast on x86 (C leaves an out-of-range cast undefined; kml computes the wrap
exactly, :func:`released_colours`). Then ``Resize(84, LANCZOS)`` (line 72):
stored at 84 x 84, Lanczos from 32. The published FC100 numbers were measured
on these colours; kml's default keeps the clean bytes.
Reuses torchvision's ``<root>/cifar-100-python/`` when present.
"""

from __future__ import annotations

import numpy as np

from kml.data.sources.base import Context, ConversionPlan
from kml.data.sources.fetch import Resource
from kml.data.sources.images import ClassPlan, key, load_pickle, resize_array
from kml.errors import KMLError

__all__ = [
    "build",
    "COLOURS",
    "FOLDER",
    "LICENCE",
    "NAME",
    "RELEASED_SIDE",
    "released_colours",
    "RESOURCES",
    "SIDE",
    "SOURCE",
    "SPLIT_RULES",
    "SUPERCLASSES",
    "VARIANTS",
]

NAME = "fc100"
SIDE = 32
RELEASED_SIDE = 84  # the released loader's Resize(84, LANCZOS) after ToPILImage
COLOURS = ("clean", "released")  # the archive's bytes, or as the released loader's ToPILImage wraps them
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


def released_colours(pixels: np.ndarray) -> np.ndarray:
    """uint8 bytes as the released FC100 loader's ``ToPILImage`` leaves them: ``x * 255 mod 256``.

    That loader hands ``ToPILImage`` a float tensor of 0..255 values, which it takes to be 0..1 and multiplies by
    255 before the cast to uint8; x86 casts (torch's ``byte()``, numpy's ``astype``) wrap modulo 256.
    """
    return ((pixels.astype(np.int64) * 255) % 256).astype(np.uint8)


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
    superclass_of: dict[int, int] = {}
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

    colours = ctx.options.get("fc100_colours", "clean")
    if colours not in COLOURS:
        raise KMLError(f"fc100 colours must be one of {', '.join(COLOURS)}, got {colours!r}")
    if colours == "clean":
        return ConversionPlan(
            splits,
            decode=lambda index: images[index],
            describe=describe,
            info={
                "split_rule": SPLIT_RULES[ctx.variant],
                "preprocessing": "none: the archive's uint8 32x32 RGB bytes as they are",
            },
        )
    return ConversionPlan(
        splits,
        decode=lambda index: resize_array(released_colours(images[index]).transpose(1, 2, 0), RELEASED_SIDE),
        describe=describe,
        info={
            "split_rule": SPLIT_RULES[ctx.variant],
            "preprocessing": "as the released MMAML/KML loader: each byte x as x*255 mod 256 (ToPILImage of a "
            f"0..255 float tensor), then Lanczos resize 32 -> {RELEASED_SIDE}",
            "colours": "released",  # only on this option's caches: a clean cache's record is as before
            "side": RELEASED_SIDE,
        },
    )
