"""Any image folder as a mode: ``folder:PATH`` (``[NAME=]folder[,fractions=...][,seed=...]:PATH``, see
:mod:`kml.data.modes`).

A *class* is a folder that holds images (``.png``, ``.jpg``, ``.jpeg``) directly, at any depth below the root,
named by its path below the root (or below its split folder): ``PATH/cat/*.png`` is the class ``cat``,
Omniglot's own ``PATH/Greek/character01/*.png`` is ``Greek/character01``. Two layouts are understood:

- **split**: the root's folders that hold images (at any depth) are all named ``train``, ``val`` or ``test``:
  ``PATH/<split>/<class>/...`` (a class may be nested too, ``PATH/train/Greek/character01/``; a missing
  split folder has no classes). The folder's own split is used; split options are refused.
- **classes**: none of them is: ``PATH/<class>/...`` or ``PATH/<group>/<class>/...``. The class names (paths)
  are sorted, shuffled with ``numpy.random.RandomState(seed)`` and cut by ``fractions`` (default 70 / 15 / 15 %,
  seed 123, the rule of the CUB and Aircraft splits; :func:`kml.data.store.split_classes`).

A root that mixes split folders with other folders of images, or a class folder that also has folders of
images inside it, is refused with a one-line error (which folder is what would be a guess). Images lying
directly in the root (or in a split folder) belong to no class and are left out, with a warning. Hidden files
and folders (``.name``) are skipped; linked folders are followed (each real folder once).

Images of any size are squashed to ``side`` x ``side`` (default 84, Lanczos). When
every image is grey the store is grey (1 channel), otherwise RGB (grey images
tiled). The folder is converted on first use and cached under
``<root>/cache/folder-<name>-<hash>/`` (the hash of the path, and of the split fractions and seed when they
are not the defaults: another split is another cache); the cache is rebuilt when an image is
added, removed, renamed or rewritten (its name, size and mtime are fingerprinted),
linked class folders included. The conversion writes a staging folder renamed into place when complete
(:mod:`kml.data.sources.cache`), so a failed one leaves the previous cache or none. Its ``dataset.json``
records the options (side, fractions, seed, fingerprint) and each split's ``manifest.json`` the split rule.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kml.data.modes import FolderMode, check_seed
from kml.data.sources.base import ConversionPlan, split_by_fractions
from kml.data.sources.cache import is_complete, read_marker, write_dataset
from kml.data.sources.images import IMAGE_SUFFIXES, ClassPlan, CorruptImage, image_is_grey, load_image
from kml.data.store import DEFAULT_SPLIT_FRACTIONS, DEFAULT_SPLIT_SEED, SPLITS, ImageStore, locked, normalised_fractions
from kml.errors import KMLError

__all__ = [
    "cache_name",
    "DEFAULT_FRACTIONS",
    "DEFAULT_SEED",
    "DEFAULT_SIDE",
    "find_classes",
    "load_folder",
    "MIN_CLASSES",
    "plan_folder",
]

log = logging.getLogger(__name__)

DEFAULT_SIDE = 84
DEFAULT_FRACTIONS = DEFAULT_SPLIT_FRACTIONS  # (0.7, 0.15, 0.15)
DEFAULT_SEED = DEFAULT_SPLIT_SEED  # 123
MIN_CLASSES = 2  # the smallest task is 2-way
LAYOUTS = "PATH/<class>/, PATH/<group>/<class>/ or PATH/train|val|test/<class>/"


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _subfolders(folder: Path) -> list[Path]:
    with os.scandir(folder) as entries:  # is_dir from the listing: no stat per image
        return sorted(folder / e.name for e in entries if not e.name.startswith(".") and e.is_dir())


def _walk(top: Path) -> Iterator[tuple[Path, list[Path]]]:
    """``(folder, its images)`` for ``top`` and every folder below it, in name order, each real folder once
    (linked folders are followed; a link back up the tree is not walked again)."""
    seen: set[str] = set()
    stack = [top]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        yield folder, _images(folder)
        stack.extend(reversed(_subfolders(folder)))


def find_classes(path: Path) -> tuple[dict[str, dict[str, list[Path]]] | None, dict[str, list[Path]], list[Path]]:
    """The classes of a folder: ``(per split, None, loose)`` for the split layout, ``(None, classes, loose)`` for
    the classes layout; a class is ``{name: images}``, its name the path below the root (or split folder), and
    ``loose`` the images outside every class. Raises a one-line :class:`KMLError` for an ambiguous folder."""
    holding = {folder.relative_to(path).as_posix(): images for folder, images in _walk(path) if images}
    loose = holding.pop(".", [])
    tops = {name.split("/")[0] for name in holding}
    named = sorted(tops & set(SPLITS))
    if named:
        others = sorted(tops - set(SPLITS))
        if others:
            raise KMLError(
                f"folder {path} mixes split folders ({', '.join(named)}) with other folders of images "
                f"({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}); lay it out as {LAYOUTS} "
                f"(rename a class folder called {named[0]!r})"
            )
        splits: dict[str, dict[str, list[Path]]] = {split: {} for split in SPLITS}
        for name, images in holding.items():
            split, _, below = name.partition("/")
            if below:
                splits[split][below] = images
            else:
                loose.extend(images)
        for split in SPLITS:
            _check_nesting(path / split, splits[split])
        return splits, {}, loose
    _check_nesting(path, holding)
    return None, holding, loose


def _check_nesting(path: Path, classes: dict[str, list[Path]]) -> None:
    """Refuse a class folder with folders of images inside it: which of them would be the class is a guess."""
    for name in classes:
        parts = name.split("/")
        for depth in range(1, len(parts)):
            outer = "/".join(parts[:depth])
            if outer in classes:
                raise KMLError(
                    f"folder {path / outer} holds images and so does {path / name} inside it; a class is a folder "
                    f"of images with no folders of images inside: move the images of {outer} into a sub-folder "
                    f"of their own (or that folder out)"
                )


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


def cache_name(
    path: str | os.PathLike, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = DEFAULT_SEED
) -> str:
    """``folder-<basename>-<8 hex>``: one cache per folder and class split (the hash is of the absolute path alone
    with the default split, as before split options existed, else of the path, the fractions and the seed)."""
    path = os.path.abspath(path)
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(path.rstrip(os.sep)) or "root")
    key = path
    if tuple(fractions) != tuple(DEFAULT_FRACTIONS) or seed != DEFAULT_SEED:
        key += "\0fractions=" + "/".join(f"{float(f):g}" for f in fractions) + f"\0seed={seed}"
    return f"folder-{base}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def plan_folder(
    path: Path,
    side: int,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = DEFAULT_SEED,
) -> ConversionPlan:
    """The conversion plan of a folder in either layout; grey when every image is grey."""
    by_split, classes, loose = find_classes(path)
    if by_split is not None:
        if tuple(fractions) != tuple(DEFAULT_FRACTIONS) or seed != DEFAULT_SEED:
            raise KMLError(
                f"folder {path} is already split into train/val/test folders; split fractions and seed apply only "
                f"to a folder of class folders: drop them for this folder"
            )
        splits = {
            split: [ClassPlan(name, by_split[split][name]) for name in sorted(by_split[split])] for split in SPLITS
        }
        rule = "the folder's own train/val/test sub-folders"
    else:
        cuts = split_by_fractions(sorted(classes), fractions, seed)
        splits = {split: [ClassPlan(name, classes[name]) for name in names] for split, names in cuts.items()}
        cut = "/".join(f"{f:g}" for f in fractions)
        rule = f"class folders sorted, shuffled with numpy RandomState({seed}), cut {cut}"
    total = sum(len(classes) for classes in splits.values())
    if total == 0:
        raise KMLError(f"folder {path} holds no class folders (folders of .png/.jpg/.jpeg images); expected {LAYOUTS}")
    if loose:
        log.warning(
            "folder %s: %d image(s) lie outside every class folder (e.g. %s) and are left out",
            path,
            len(loose),
            loose[0].relative_to(path),
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
    fractions = normalised_fractions(fractions, "folder fractions")
    seed = check_seed(seed, "the folder split seed")
    mode = FolderMode(str(folder), None, fractions, seed).source  # folder:PATH, with the split when not the default
    if not folder.is_dir():
        raise KMLError(f"folder mode: {folder} is not a folder")
    directory = Path(root) / "cache" / cache_name(folder, fractions, seed)
    options = {"side": side, "fractions": list(fractions), "seed": seed, "fingerprint": _fingerprint(folder)}
    with contextlib.nullcontext() if is_complete(directory, options) else locked(directory):  # read-only roots work
        if not is_complete(directory, options):
            try:
                plan = plan_folder(folder, side, fractions, seed)
                info = {"source": f"image folder {folder}", "side": side}
                write_dataset(directory, mode, plan, info, options, on_corrupt, None, progress)
            except CorruptImage as error:  # kml-train has no --on-corrupt: the fix is the file itself
                raise KMLError(
                    f"cannot decode image {error.described} in {mode}; nothing was cached. "
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
    marker = read_marker(directory) or {}
    counts = {s: marker.get("splits", {}).get(s, {}).get("classes", 0) for s in SPLITS}
    if counts[split] < MIN_CLASSES:
        if str(marker.get("info", {}).get("split_rule", "")).startswith("the folder's own"):
            fix = f"add class folders under {folder / split}"
        else:
            fix = (
                "add class folders, give this split a larger share (folder,fractions=TRAIN/VAL/TEST:PATH), "
                "or lay it out as PATH/train|val|test/<class>/"
            )
        raise KMLError(
            f"{mode} has {counts[split]} class(es) in split {split!r} "
            f"(train/val/test: {counts['train']}/{counts['val']}/{counts['test']}); "
            f"a task needs at least {MIN_CLASSES}: {fix}"
        )
    return ImageStore.load(
        directory / split, rebuild=f"delete the cache (rm -r {directory}) and rerun to convert the folder again"
    )
