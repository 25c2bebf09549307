"""Writing a whole dataset's cache atomically.

All splits are converted into a staging folder beside the cache,
``<root>/cache/.<name>.staging-<pid>/{train,val,test}/`` plus a
``dataset.json`` marker written last, and the staging folder is then renamed
to ``<root>/cache/<name>/`` (the previous cache, if any, is moved aside first
and deleted after). An interrupted conversion therefore leaves either the old
complete cache or none, never a mix of splits from two conversions; leftover
staging folders are removed by the next run.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from kml._version import __version__
from kml.data.sources.base import ConversionPlan
from kml.data.sources.fetch import disk_full
from kml.data.sources.images import ClassPlan, decode_classes
from kml.data.store import MANIFEST_FILE, SPLITS, ImageStore

__all__ = ["CONVERTER_VERSION", "folder_size", "is_complete", "MARKER", "read_marker", "write_dataset"]

MARKER = "dataset.json"
CONVERTER_VERSION = 1


def read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(directory) / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_complete(directory: Path, options: dict[str, Any]) -> bool:
    """True when ``directory`` holds a finished conversion made with the same options."""
    marker = read_marker(directory)
    if not marker or marker.get("converter_version") != CONVERTER_VERSION or marker.get("options") != options:
        return False
    return all((Path(directory) / split / MANIFEST_FILE).is_file() for split in marker.get("splits", {}))


def folder_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def write_dataset(
    directory: Path,
    mode: str,
    plan: ConversionPlan,
    info: dict[str, Any],
    options: dict[str, Any],
    on_corrupt: str = "stop",
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Decode every split of ``plan`` and write the cache at ``directory`` atomically; return the marker.

    Call it under :func:`locked` (the stale staging folders it removes are then nobody's).
    """
    directory = Path(directory)
    staging = _fresh_staging(directory)
    started = time.time()
    splits: dict[str, dict[str, Any]] = {}
    try:
        for split in SPLITS:
            classes = plan.splits.get(split) or []
            if classes:
                summary = _write_split(staging / split, mode, split, classes, plan, info, on_corrupt, workers, progress)
                if summary is not None:
                    splits[split] = summary
        marker = {
            "dataset": mode,
            "converter_version": CONVERTER_VERSION,
            "kml_version": __version__,
            "options": options,
            "splits": splits,
            "info": {**info, **plan.info},
            "seconds": round(time.time() - started, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        _write_marker(staging, marker, mode)  # last: its presence means complete
        _swap_in(staging, directory)
        return marker
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fresh_staging(directory: Path) -> Path:
    """This process's staging folder beside ``directory``, after removing stale ones of earlier runs."""
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{directory.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return parent / f".{directory.name}.staging-{os.getpid()}"


def _write_split(
    folder: Path,
    mode: str,
    split: str,
    classes: list[ClassPlan],
    plan: ConversionPlan,
    info: dict[str, Any],
    on_corrupt: str,
    workers: int | None,
    progress: bool,
) -> dict[str, Any] | None:
    """Decode one split's classes and save its store in ``folder``; its marker entry, or None if no class is left."""
    result = decode_classes(classes, plan.decode, plan.describe, on_corrupt, workers, progress, desc=f"{mode} {split}")
    if not result.class_names:
        return None
    split_info = {
        **info,
        **plan.info,
        "skipped_images": len(result.skipped),
        "skipped": result.skipped[:100],
        "dropped_classes": result.dropped_classes,
    }
    store = ImageStore.from_class_arrays(result.class_images, result.class_names, mode, split, split_info)
    store.save(folder)
    return {
        "classes": store.num_classes,
        "images": len(store.images),
        "image_shape": list(store.image_shape),
        "skipped_images": len(result.skipped),
    }  # the store and the decoded images are freed on return: one split in memory at a time


def _write_marker(staging: Path, marker: dict[str, Any], mode: str) -> None:
    """Write ``dataset.json``; a full disk is the one-line disk-full error."""
    try:
        (staging / MARKER).write_text(json.dumps(marker, indent=1))
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise disk_full(error, f"writing the cache of {mode}") from None
        raise


def _swap_in(staging: Path, directory: Path) -> None:
    """Rename the staging folder to ``directory``, moving the previous cache aside first and deleting it after."""
    old = directory.parent / f".{directory.name}.old-{os.getpid()}"
    if directory.exists():
        os.replace(directory, old)
    os.replace(staging, directory)
    shutil.rmtree(old, ignore_errors=True)
