"""Any image folder as a mode: ``folder:PATH``.

Two layouts are understood:

- ``PATH/<split>/<class>/*.{png,jpg,jpeg}`` with splits ``train``, ``val``, ``test``
  (a missing split folder simply has no classes);
- ``PATH/<class>/*.{png,jpg,jpeg}``: the class names are sorted, shuffled with
  ``numpy.random.RandomState(seed)`` and cut by ``fractions`` (default 70 / 15 / 15 %,
  seed 123, the rule of the CUB and Aircraft splits).

Images of any size are squashed to ``side`` x ``side`` (default 84, Lanczos). When
every image is grey the store is grey (1 channel), otherwise RGB (grey images
tiled). The folder is converted on first use and cached under
``<root>/cache/folder-<name>-<hash of the path>/``; the cache is rebuilt when an image is
added, removed, renamed or rewritten (its name, size and mtime are fingerprinted),
linked class folders included.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kml.data.sources.base import ConversionPlan, split_by_fractions
from kml.data.sources.cache import is_complete, read_marker, write_dataset
from kml.data.sources.images import IMAGE_SUFFIXES, ClassPlan, CorruptImage, image_is_grey, load_image
from kml.data.store import SPLITS, ImageStore, locked
from kml.errors import KMLError

__all__ = [
    "cache_name",
    "DEFAULT_FRACTIONS",
    "DEFAULT_SEED",
    "DEFAULT_SIDE",
    "load_folder",
    "MIN_CLASSES",
    "plan_folder",
]

DEFAULT_SIDE = 84
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
DEFAULT_SEED = 123
MIN_CLASSES = 2  # the smallest task is 2-way


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and _images(p))


def _layout(path: Path) -> str:
    return "splits" if any((path / split).is_dir() and _class_dirs(path / split) for split in SPLITS) else "classes"


def _fingerprint(path: Path) -> str:
    """Changes when an image is added, removed, renamed or rewritten, inside linked folders too (one stat per image)."""
    digest = hashlib.sha1()
    seen = set()
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):  # the plan reads linked class folders
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree would loop
            dirnames.clear()
            continue
        seen.add(real)
        dirnames.sort()
        digest.update(dirpath.encode() + b"\0")
        for name in sorted(f for f in filenames if f.lower().endswith(IMAGE_SUFFIXES)):
            try:
                st = os.stat(os.path.join(dirpath, name))
                stamp = f"{st.st_size} {st.st_mtime_ns}"  # not ctime: chmod or a restore changes no image
            except OSError:  # unreadable or a dangling link: the conversion reports it
                stamp = "?"
            digest.update(f"{name}\0{stamp}\0".encode())
    return digest.hexdigest()


def cache_name(path: str | os.PathLike) -> str:
    """``folder-<basename>-<8 hex of the absolute path>``: one cache per folder."""
    path = os.path.abspath(path)
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(path.rstrip(os.sep)) or "root")
    return f"folder-{base}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def plan_folder(path: Path, side: int, fractions: Sequence[float], seed: int) -> ConversionPlan:
    """The conversion plan of a folder in either layout; grey when every image is grey."""
    if _layout(path) == "splits":
        splits = {
            split: [ClassPlan(d.name, _images(d)) for d in _class_dirs(path / split)] if (path / split).is_dir() else []
            for split in SPLITS
        }
        rule = "the folder's own train/val/test sub-folders"
    else:
        classes = {d.name: _images(d) for d in _class_dirs(path)}
        cuts = split_by_fractions(sorted(classes), fractions, seed)
        splits = {split: [ClassPlan(name, classes[name]) for name in names] for split, names in cuts.items()}
        cut = "/".join(f"{f:g}" for f in fractions)
        rule = f"class folders sorted, shuffled with numpy RandomState({seed}), cut {cut}"
    total = sum(len(classes) for classes in splits.values())
    if total == 0:
        raise KMLError(
            f"folder {path} holds no class folders with .png/.jpg/.jpeg images "
            f"(expected PATH/<class>/ or PATH/<split>/<class>/)"
        )
    items = [item for classes in splits.values() for plan in classes for item in plan.items]
    channels = 1 if all(_grey_all(items)) else 3
    plan = ConversionPlan(
        splits,
        decode=lambda item: load_image(item, side, channels),
        describe=lambda item: str(Path(item).relative_to(path)),
        info={"split_rule": rule, "channels": channels},
    )
    return plan


def _grey(item: Path) -> bool:
    try:
        return image_is_grey(item)
    except Exception:  # noqa: BLE001 - unreadable: decoding reports it (or skips it) later
        return True


def _grey_all(items: list[Path]) -> list[bool]:
    """Colour mode of every image from its header only (threads: header reads are I/O bound)."""
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(_grey, items))


def load_folder(
    path: str | os.PathLike,
    split: str,
    root: str | os.PathLike = "data",
    side: int = DEFAULT_SIDE,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = DEFAULT_SEED,
    on_corrupt: str = "stop",
    progress: bool = True,
) -> ImageStore:
    """The store of ``split`` of the image folder ``path``, converted and cached on first use."""
    if split not in SPLITS:
        raise KMLError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    folder = Path(os.path.abspath(os.path.expanduser(path)))
    mode = f"folder:{folder}"
    if not folder.is_dir():
        raise KMLError(f"folder mode: {folder} is not a folder")
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise KMLError(f"folder fractions must be three non-negative numbers (train, val, test), got {list(fractions)}")
    directory = Path(root) / "cache" / cache_name(folder)
    options = {"side": side, "fractions": list(fractions), "seed": seed, "fingerprint": _fingerprint(folder)}
    with contextlib.nullcontext() if is_complete(directory, options) else locked(directory):  # read-only roots work
        if not is_complete(directory, options):
            try:
                plan = plan_folder(folder, side, fractions, seed)
                info = {"source": f"image folder {folder}", "side": side}
                write_dataset(directory, mode, plan, info, options, on_corrupt, None, progress)
            except CorruptImage as error:  # kml-train has no --on-corrupt: the fix is the file itself
                raise KMLError(
                    f"cannot decode image {error.described} in folder:{folder}; nothing was cached. "
                    f"Replace it or move it out of the folder, then rerun"
                ) from None
            except OSError as error:  # e.g. a class folder without read permission
                where = error.filename or folder
                if not str(where).startswith(str(folder)):
                    raise KMLError(
                        f"cannot write {where} ({error.strerror or error}); pass --data-root a writable folder"
                    ) from None
                raise KMLError(
                    f"cannot read {where} ({error.strerror or error}); make it readable (chmod -R u+rX {folder}) "
                    f"or move it out of the folder, then rerun"
                ) from None
    counts = {s: (read_marker(directory) or {}).get("splits", {}).get(s, {}).get("classes", 0) for s in SPLITS}
    if counts[split] < MIN_CLASSES:
        raise KMLError(
            f"folder:{folder} has {counts[split]} class(es) in split {split!r} "
            f"(train/val/test: {counts['train']}/{counts['val']}/{counts['test']}); "
            f"a task needs at least {MIN_CLASSES}: "
            f"add class folders, or lay it out as PATH/train|val|test/<class>/"
        )
    return ImageStore.load(
        directory / split, rebuild=f"delete the cache (rm -r {directory}) and rerun to convert the folder again"
    )
