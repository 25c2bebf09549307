"""Mode names and where each mode's cached store comes from.

A mode is a dataset (``omniglot``, ``miniimagenet``, ``fc100``, ``cub``,
``aircraft``), a built-in synthetic mode (``glyphs``, ``textures``,
``shapes``; ``synthetic`` means all three) or an image folder
(``folder:PATH``). Names are case-insensitive and the published aliases work
(``FC100``, ``bird`` = ``cub``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from kml.data.store import SPLITS, ImageStore, cache_dir
from kml.data.synthetic import SYNTHETIC_MODES, load_synthetic
from kml.errors import KMLError

__all__ = [
    "ALIASES",
    "canonical_mode",
    "DATASET_MODES",
    "expand_modes",
    "FOLDER_PREFIX",
    "known_modes",
    "load_store",
    "load_stores",
    "ROTATED_BY_DEFAULT",
]

DATASET_MODES = ("omniglot", "miniimagenet", "fc100", "cub", "aircraft")
ALIASES = {
    "mini-imagenet": "miniimagenet",
    "mini_imagenet": "miniimagenet",
    "imagenet": "miniimagenet",
    "cifar-fs-fc100": "fc100",
    "bird": "cub",
    "birds": "cub",
    "cub200": "cub",
    "cub-200": "cub",
    "cub_200_2011": "cub",
    "fgvc-aircraft": "aircraft",
    "fgvc_aircraft": "aircraft",
    "fgvcaircraft": "aircraft",
}
FOLDER_PREFIX = "folder:"
# Modes rotated by random multiples of 90 degrees by default (as the published code does for Omniglot).
ROTATED_BY_DEFAULT = ("omniglot",)


def known_modes() -> list[str]:
    return [*DATASET_MODES, *SYNTHETIC_MODES, "synthetic", f"{FOLDER_PREFIX}PATH"]


def canonical_mode(name: str) -> str:
    """The canonical name of one mode; raises a one-line :class:`KMLError` for an unknown name."""
    if name.lower().startswith(FOLDER_PREFIX):
        path = name[len(FOLDER_PREFIX) :]
        if not path:
            raise KMLError("folder mode needs a path: folder:PATH")
        return FOLDER_PREFIX + os.path.abspath(os.path.expanduser(path))
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in DATASET_MODES or key in SYNTHETIC_MODES or key == "synthetic":
        return key
    raise KMLError(f"unknown mode {name!r}; known modes: {', '.join(known_modes())}")


def expand_modes(names: Sequence[str]) -> list[str]:
    """Canonical, de-duplicated mode list; ``synthetic`` expands to every synthetic mode."""
    modes: list[str] = []
    for name in names:
        canonical = canonical_mode(name)
        for mode in SYNTHETIC_MODES if canonical == "synthetic" else (canonical,):
            if mode not in modes:
                modes.append(mode)
    if not modes:
        raise KMLError(f"no modes given; known modes: {', '.join(known_modes())}")
    return modes


def load_store(mode: str, split: str, root: str | os.PathLike = "data") -> ImageStore:
    """Load the cached store of ``mode``/``split`` under the data root.

    Synthetic modes are generated (and cached) on first use; folder modes are
    converted on first use; datasets must have been converted by ``download.py``.
    """
    if split not in SPLITS:
        raise KMLError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    mode = canonical_mode(mode)
    if mode in SYNTHETIC_MODES:
        return load_synthetic(mode, split, root)
    if mode.startswith(FOLDER_PREFIX):
        from kml.data.sources.folder import load_folder  # converts on first use

        return load_folder(mode[len(FOLDER_PREFIX) :], split, root)
    if mode == "synthetic":
        raise KMLError("'synthetic' names several modes; expand it with expand_modes first")
    directory = cache_dir(root, mode, split)
    if not (directory / "manifest.json").is_file():
        raise KMLError(
            f"no cache for mode {mode!r} split {split!r} under {directory}; "
            f"run: python download.py --datasets {mode} --root {root}"
        )
    return ImageStore.load(directory, rebuild=f"rebuild it: python download.py --datasets {mode} --root {root} --force")


def load_stores(
    modes: Sequence[str],
    split: str,
    root: str | os.PathLike = "data",
    side: int | None = None,
    channels: int = 3,
    device: str | None = None,
) -> list[ImageStore]:
    """Load several modes' stores brought to one side length and channel count, on ``device``.

    ``side`` defaults to the largest stored side among the modes.
    """
    stores = [load_store(mode, split, root) for mode in expand_modes(modes)]
    side = side or max(store.image_shape[1] for store in stores)
    return [store.to(device or "cpu").conformed(side, channels) for store in stores]
