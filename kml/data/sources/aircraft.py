"""FGVC-Aircraft 2013b: 10000 photographs of 100 aircraft variants.

Raw layout::

    fgvc-aircraft-2013b.tar.gz -> fgvc-aircraft-2013b/data/images/<7 digits>.jpg
                                  fgvc-aircraft-2013b/data/variants.txt                 one variant per line
                                  fgvc-aircraft-2013b/data/images_variant_trainval.txt  "<image> <variant>"
                                  fgvc-aircraft-2013b/data/images_variant_test.txt      "<image> <variant>"
                                  fgvc-aircraft-2013b/data/images_box.txt               "<image> xmin ymin xmax ymax"

Split (published MMAML/KML): the 100 variants in ``variants.txt`` order,
shuffled with ``numpy.random.RandomState(123)``, then 70 / 15 / 15 % ->
70 / 15 / 15 classes; the images of trainval and test are pooled.

Crop: by default each image is cropped to its bounding box (images_box.txt,
1-based inclusive pixel coordinates, the common few-shot practice; it also
removes the copyright banner). With ``crop=False`` (``--no-crop``) the whole
photo is kept except the 20-pixel copyright banner at the bottom, which the
dataset's README asks users to remove; ``keep_banner`` (``--no-crop
--aircraft-banner``) keeps it too, as the released MMAML/KML converters resize
the whole photo. Then squashed to 84 x 84 RGB.

``misfile=True`` (``kml-download --aircraft-misfile``) files the images as
the released MMAML converter does (``get_dataset_script/proc_aircraft.py``
of MMAML-Classification, which KML's README also uses): it names each
image's folder after its variant with ``/`` made ``-`` (line 52) and then
looks that name up among the split's variant names, which keep their ``/``
(line 53); no split matches, ``argmax`` of all-False is 0, so the image is
moved to ``train/<name>`` (lines 55-57). A variant with a slash in its name
(``F-16A/B``, ``F/A-18``) survives only where its own split is train (its
folder exists there). With the published shuffle F-16A/B is in train and
F/A-18 in test: each F/A-18 image is renamed onto one *file*
``train/F-A-18``, overwriting the one before, which the loader's
``glob(class + '/*')`` reads as a class without images, while the test
folder ``test/F-A-18`` stays empty. So F/A-18 is in no split: 70 / 15 / 14
classes. kml's default files every variant where its split puts it.
No published checksum of the archive is known to kml: the computed md5 is
recorded in the manifest. Reuses learn2learn's ``<root>/fgvc_aircraft/`` and
torchvision's ``<root>/fgvc-aircraft-2013b/`` when present.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kml.data.sources.base import Context, ConversionPlan, split_by_fractions
from kml.data.sources.fetch import Resource
from kml.data.sources.images import ClassPlan, load_image
from kml.errors import KMLError

__all__ = [
    "BANNER",
    "build",
    "DATA",
    "FRACTIONS",
    "LICENCE",
    "NAME",
    "released_filing",
    "RESOURCES",
    "SEED",
    "SIDE",
    "SOURCE",
    "SPLIT_RULES",
    "VARIANTS",
]

NAME = "aircraft"
SIDE = 84
SOURCE = "FGVC-Aircraft 2013b (Maji et al. 2013), fgvc-aircraft-2013b.tar.gz from robots.ox.ac.uk/~vgg"
LICENCE = "non-commercial research only; photographers keep the copyright (dataset README)"
_PATH = "vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz"
RESOURCES = (
    Resource(
        "fgvc-aircraft-2013b.tar.gz",
        (f"https://www.robots.ox.ac.uk/~{_PATH}", f"http://www.robots.ox.ac.uk/~{_PATH}"),
        None,  # the VGG page lists an md5 but kml could not confirm it offline: the computed one is recorded
        2_750_000_000,
    ),
)
DATA = "fgvc-aircraft-2013b/data"
FRACTIONS = (70, 15, 15)
SEED = 123
BANNER = 20
VARIANTS = {"published": (FRACTIONS, SEED)}
SPLIT_RULES = {"published": "100 variants in variants.txt order, shuffled with numpy RandomState(123), then 70/15/15 %"}


def _pairs(path: Path) -> list[tuple[str, str]]:
    """Lines ``<image> <rest>`` -> ``[(image, rest)]`` (variant names contain spaces)."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            image, _, rest = line.strip().partition(" ")
            out.append((image, rest.strip()))
    return out


def build(ctx: Context) -> ConversionPlan:
    crop = bool(ctx.options.get("crop", True))
    banner = 0 if ctx.options.get("keep_banner", False) else BANNER  # the released converters keep it
    data = _obtain(ctx, crop) / DATA
    variants, images = _images_by_variant(data)
    boxes = _boxes(data) if crop else {}
    fractions, seed = VARIANTS[ctx.variant]
    cuts = split_by_fractions(variants, fractions, seed)
    info: dict[str, Any] = {
        "split_rule": SPLIT_RULES[ctx.variant],
        "crop": _crop_note(crop, banner),
        "preprocessing": f"RGB, {'cropped to the bounding box, ' if crop else ''}"
        f"Lanczos resize (squash) to {SIDE}x{SIDE}",
    }
    if ctx.options.get("misfile", False):
        cuts, lost = released_filing(cuts)
        info["misfiled"] = lost  # only on this option's caches: a default cache's record is as before
        info["split_rule"] += f"; as the released converter's filing: {', '.join(lost) or 'no variant'} in no split"
    splits = {split: [ClassPlan(name, sorted(images[name])) for name in names] for split, names in cuts.items()}
    return ConversionPlan(
        splits,
        decode=_decoder(data, crop, banner, boxes),
        describe=lambda image: f"{DATA}/images/{image}.jpg",
        info=info,
    )


def released_filing(cuts: dict[str, list[str]]) -> tuple[dict[str, list[str]], list[str]]:
    """The split as the released converter files it, and the variants it loses: a variant whose name holds a
    ``/`` is moved to train, where it has a folder only if train is its split (see the module's docstring)."""
    lost = [name for split, names in cuts.items() if split != "train" for name in names if "/" in name]
    return {split: [name for name in names if name not in lost] for split, names in cuts.items()}, lost


def _obtain(ctx: Context, crop: bool) -> Path:
    """The folder holding ``DATA`` (extracted, or reused from learn2learn's or torchvision's download)."""
    expect = [
        f"{DATA}/images",
        f"{DATA}/variants.txt",
        f"{DATA}/images_variant_trainval.txt",
        f"{DATA}/images_variant_test.txt",
    ]
    if crop:
        expect.append(f"{DATA}/images_box.txt")
    return ctx.obtain(
        RESOURCES,
        expect,
        reuse=[
            (ctx.root / "fgvc_aircraft", "learn2learn FGVCAircraft download"),
            (ctx.root, "torchvision FGVCAircraft download"),
        ],
        archive_dirs=[ctx.root / "fgvc_aircraft"],
    )


def _images_by_variant(data: Path) -> tuple[list[str], dict[str, list[str]]]:
    """The variants in ``variants.txt`` order and the images of each (trainval and test pooled)."""
    variants = [line.strip() for line in (data / "variants.txt").read_text().splitlines() if line.strip()]
    images: dict[str, list[str]] = {v: [] for v in variants}
    for image, variant in _pairs(data / "images_variant_trainval.txt") + _pairs(data / "images_variant_test.txt"):
        if variant not in images:
            raise KMLError(f"aircraft: image {image} has variant {variant!r}, which is not in {data}/variants.txt")
        images[variant].append(image)
    return variants, images


def _boxes(data: Path) -> dict[str, tuple[float, float, float, float]]:
    """Each image's bounding box as PIL's ``(left, upper, right, lower)``."""
    boxes = {}
    for image, numbers in _pairs(data / "images_box.txt"):
        xmin, ymin, xmax, ymax = (float(v) for v in numbers.split())
        boxes[image] = (xmin - 1, ymin - 1, xmax, ymax)  # 1-based inclusive -> PIL's 0-based, right/lower exclusive
    return boxes


def _decoder(
    data: Path, crop: bool, banner: int, boxes: dict[str, tuple[float, float, float, float]]
) -> Callable[[str], np.ndarray]:
    """``decode(image id)``: the photo cropped to its box, or whole less the bottom ``banner`` pixels."""

    def decode(image: str) -> np.ndarray:
        path = data / "images" / f"{image}.jpg"
        if crop:
            if image not in boxes:
                raise ValueError(f"no bounding box for {image} in images_box.txt")
            return load_image(path, SIDE, 3, box=boxes[image])
        with Image.open(path) as header:  # the size is needed to cut the banner off
            width, height = header.size
        return load_image(path, SIDE, 3, box=(0, 0, width, max(1, height - banner)))

    return decode


def _crop_note(crop: bool, banner: int) -> str:
    """How the photos were cropped, for the manifest."""
    if crop:
        return "bounding box (images_box.txt)"
    return f"none (bottom {banner}-pixel copyright banner removed)" if banner else "none (whole photo, banner kept)"
