"""Decoding raw images (and pickled arrays) into uint8 ``[C, side, side]`` arrays.

Decoding runs on a thread pool: Pillow releases the GIL while it decodes and
resizes, so threads use every core without the cost of moving images between
processes. A file that cannot be decoded is reported by name and either stops
the conversion (default) or is skipped with a warning and counted.
"""

from __future__ import annotations

import math
import os
import pickle
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from kml.errors import KMLError

__all__ = [
    "ClassPlan",
    "CorruptImage",
    "decode_classes",
    "DecodeResult",
    "GREY_MODES",
    "image_is_grey",
    "IMAGE_SUFFIXES",
    "key",
    "load_image",
    "load_pickle",
    "ON_CORRUPT",
    "resize_array",
]

ON_CORRUPT = ("stop", "skip")
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_image(
    path: str | os.PathLike,
    side: int,
    channels: int,
    box: tuple[float, float, float, float] | None = None,
    invert: bool = False,
) -> np.ndarray:
    """Decode one image file to uint8 ``[channels, side, side]``.

    ``box`` (left, upper, right, lower) in original pixel coordinates crops before
    resizing. The image is squashed to a square (no aspect-preserving crop), as
    the published conversion scripts do. Resampling is Lanczos; ``invert`` gives
    ``255 - x`` after resizing (Omniglot: bright strokes on black).
    """
    with Image.open(path) as image:
        width, height = image.size
        # JPEG only: decode at a reduced scale that still covers the output (much faster on large photos).
        crop_w, crop_h = (box[2] - box[0], box[3] - box[1]) if box else (width, height)
        image.draft(
            "L" if channels == 1 else "RGB",
            (math.ceil(width * side / max(crop_w, 1)), math.ceil(height * side / max(crop_h, 1))),
        )
        image = image.convert("L" if channels == 1 else "RGB")
        if box:
            sx, sy = image.size[0] / width, image.size[1] / height
            image = image.crop((box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy))
        image = image.resize((side, side), Image.LANCZOS)
        array = np.asarray(image, dtype=np.uint8)
    array = array[None] if channels == 1 else array.transpose(2, 0, 1)
    if invert:
        array = 255 - array
    return np.ascontiguousarray(array)


def image_is_grey(path: str | os.PathLike) -> bool:
    """True when the file's colour mode is grey (reads the header only)."""
    with Image.open(path) as image:
        return image.mode in GREY_MODES


def resize_array(array: np.ndarray, side: int) -> np.ndarray:
    """uint8 ``[H, W, 3]`` or ``[H, W]`` -> ``[C, side, side]`` (Lanczos when a resize is needed)."""
    if array.shape[0] != side or array.shape[1] != side:
        array = np.asarray(Image.fromarray(array).resize((side, side), Image.LANCZOS), dtype=np.uint8)
    return np.ascontiguousarray(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))


@dataclass
class ClassPlan:
    """The images of one class before decoding: ``items`` are whatever ``decode`` takes."""

    name: str
    items: list[Any]


@dataclass
class DecodeResult:
    class_images: list[np.ndarray]
    class_names: list[str]
    skipped: list[str] = field(default_factory=list)
    dropped_classes: list[str] = field(default_factory=list)


class CorruptImage(KMLError):
    """An image that cannot be decoded; ``described`` names it (its callers word the advice for their tool)."""

    def __init__(self, message: str, described: str) -> None:
        super().__init__(message)
        self.described = described


def decode_classes(
    classes: Sequence[ClassPlan],
    decode: Callable[[Any], np.ndarray],
    describe: Callable[[Any], str],
    on_corrupt: str = "stop",
    workers: int | None = None,
    progress: bool = True,
    desc: str = "decode",
) -> DecodeResult:
    """Decode every item of every class; corrupt files stop or are skipped (``on_corrupt``)."""
    if on_corrupt not in ON_CORRUPT:
        raise KMLError(f"on_corrupt must be one of {', '.join(ON_CORRUPT)}, got {on_corrupt!r}")
    flat = [(index, item) for index, plan in enumerate(classes) for item in plan.items]

    def work(position: int) -> np.ndarray | str:
        item = flat[position][1]
        try:
            return decode(item)
        except (KMLError, MemoryError, KeyboardInterrupt):
            raise
        except Exception as error:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, ... for broken files
            return f"{describe(item)} ({type(error).__name__}: {error})"

    per_class: list[list[np.ndarray]] = [[] for _ in classes]
    skipped: list[str] = []
    pool = ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1))
    try:
        results = pool.map(work, range(len(flat)))
        for (index, _), result in zip(
            flat, tqdm(results, total=len(flat), desc=desc, unit="img", disable=not progress, leave=False)
        ):
            if isinstance(result, str):
                if on_corrupt == "stop":
                    raise CorruptImage(
                        f"cannot decode image {result}; nothing was cached. Replace the file, or rerun with "
                        f"--on-corrupt skip (on_corrupt='skip') to leave such images out",
                        result,
                    )
                warnings.warn(f"skipping unreadable image {result}", stacklevel=2)
                skipped.append(result)
                continue
            per_class[index].append(result)
    finally:  # on an error or Ctrl-C, drop the queued work instead of decoding the rest
        pool.shutdown(wait=True, cancel_futures=True)
    out = DecodeResult([], [], skipped)
    for plan, images in zip(classes, per_class):
        if not images:
            out.dropped_classes.append(plan.name)
            warnings.warn(f"class {plan.name!r} has no readable images and is left out", stacklevel=2)
            continue
        out.class_images.append(np.stack(images))
        out.class_names.append(plan.name)
    return out


# ----------------------------------------------------------------- pickles
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
}
_BUILTINS = {"list", "dict", "set", "frozenset", "tuple", "bytearray", "bytes", "int", "float", "str", "object"}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only: a data file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core"):  # pickles written by numpy 1.x
            module = "numpy._core" + module[len("numpy.core") :]
        if (
            (module, name) in _NUMPY_GLOBALS
            or (module in ("builtins", "__builtin__") and name in _BUILTINS)
            or (module, name) in {("collections", "OrderedDict"), ("collections", "defaultdict"), ("_codecs", "encode")}
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays and plain containers)")


def load_pickle(path: str | os.PathLike) -> Any:
    """Load a data pickle (Python 2 or 3) with :class:`_RestrictedUnpickler`; bytes keys stay bytes."""
    try:
        with open(path, "rb") as handle:
            return _RestrictedUnpickler(handle, encoding="latin1").load()
    except pickle.UnpicklingError as error:
        from kml.data.sources.fetch import looks_like_html

        if looks_like_html(path):
            raise KMLError(
                f"{path} is a web page, not a pickle (a download link that answered with a page); "
                f"delete it and place the real file"
            ) from None
        raise KMLError(f"cannot read {path}: {error}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise KMLError(
            f"{path} is truncated or corrupt ({type(error).__name__}: {error}); delete it and rerun"
        ) from None


def key(mapping: dict, name: str) -> Any:
    """``mapping[name]`` for pickles whose keys are ``str`` or ``bytes`` (Python 2 pickles)."""
    if name in mapping:
        return mapping[name]
    if name.encode() in mapping:
        return mapping[name.encode()]
    raise KMLError(f"expected a {name!r} entry, found {sorted(str(k) for k in mapping)[:8]}")
