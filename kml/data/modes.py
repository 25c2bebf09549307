"""Mode names and where each mode's cached store comes from.

A mode is a dataset (``omniglot``, ``miniimagenet``, ``fc100``, ``cub``,
``aircraft``), a built-in synthetic mode (``glyphs``, ``textures``,
``shapes``; ``synthetic`` means all three) or an image folder. Names are
case-insensitive and the published aliases work (``FC100``, ``bird`` = ``cub``).

An image folder is ``[NAME=]folder[,OPTION=VALUE...]:PATH``:

- ``folder:~/sketches``: the folder, converted on first use (:mod:`kml.data.sources.folder`);
- ``sketches=folder:~/sketches``: the same, shown as ``sketches`` in tables (:func:`mode_label`);
- ``folder,fractions=0.8/0.1/0.1,seed=7:~/sketches``: its classes split 80 / 10 / 10 % with seed 7
  instead of 70 / 15 / 15 % with seed 123 (``fractions`` may be percentages: ``80/10/10``).

Everything before the first ``:`` is the name and the options, everything after it the path, so a path may
hold any character. The canonical name (:func:`canonical_mode`) has an absolute path and only the options
that differ from the defaults; it is what a run records, so its evaluation uses the same split.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kml.data.store import (
    DEFAULT_SPLIT_FRACTIONS,
    DEFAULT_SPLIT_SEED,
    SPLITS,
    ImageStore,
    cache_dir,
    normalised_fractions,
)
from kml.data.synthetic import SYNTHETIC_MODES, load_synthetic
from kml.errors import KMLError

__all__ = [
    "ALIASES",
    "canonical_mode",
    "check_seed",
    "DATASET_MODES",
    "expand_modes",
    "FOLDER_PREFIX",
    "FolderMode",
    "has_split",
    "known_modes",
    "load_store",
    "load_stores",
    "mode_label",
    "parse_folder_mode",
    "ROTATED_BY_DEFAULT",
    "with_folder_split",
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
    return [*DATASET_MODES, *SYNTHETIC_MODES, "synthetic", f"[NAME=]{FOLDER_PREFIX}PATH"]


_FOLDER_HEADS = ("folder:", "folder,")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*\Z")
_SYNTAX = "[NAME=]folder[,fractions=TRAIN/VAL/TEST][,seed=N]:PATH"


@dataclass(frozen=True)
class FolderMode:
    """An image folder mode: its absolute path, its short name (or ``None``) and its class split.

    ``given`` names the options its text set (``fractions``, ``seed``): :func:`with_folder_split` leaves them.
    """

    path: str
    name: str | None = None
    fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS
    seed: int = DEFAULT_SPLIT_SEED
    given: frozenset[str] = frozenset()

    @property
    def source(self) -> str:
        """The canonical name without the short name: one cache per folder and split rule."""
        options = []
        if self.fractions != DEFAULT_SPLIT_FRACTIONS:
            options.append("fractions=" + "/".join(f"{f:g}" for f in self.fractions))
        if self.seed != DEFAULT_SPLIT_SEED:
            options.append(f"seed={self.seed}")
        return ",".join(["folder", *options]) + ":" + self.path

    @property
    def mode(self) -> str:
        """The canonical mode name: ``[NAME=]folder[,fractions=...][,seed=...]:/absolute/path``."""
        return f"{self.name}={self.source}" if self.name else self.source

    def replace(self, **changes: Any) -> FolderMode:
        return dataclasses.replace(self, **changes)


def check_seed(value: object, what: str) -> int:
    """``value`` as a class split seed (an integer that ``numpy.random.RandomState`` takes); else a one-line error."""
    try:
        seed = int(str(value))  # not int(2.5) == 2: a seed is written as an integer
    except ValueError:
        seed = -1
    if not 0 <= seed < 2**32:
        raise KMLError(f"{what} must be an integer from 0 to 4294967295, got {value!r}")
    return seed


def parse_folder_mode(text: str) -> FolderMode | None:
    """The folder mode written as ``[NAME=]folder[,OPTION=VALUE...]:PATH``, or ``None`` when ``text`` is none.

    Raises a one-line :class:`KMLError` for a malformed one (an unknown option, a bad name or value, no path).
    """
    name: str | None = None
    rest = text
    if not text.lower().startswith(_FOLDER_HEADS):
        candidate, sep, after = text.partition("=")
        if not sep or not after.lower().startswith(_FOLDER_HEADS):
            return None
        name, rest = candidate, after
        reserved = {*DATASET_MODES, *ALIASES, *SYNTHETIC_MODES, "synthetic"}
        if not _NAME.match(name) or name.lower() in reserved or name.lower().startswith("folder"):
            raise KMLError(
                f"mode name {name!r} in {text!r}: a name is letters, digits and _ . + - (starting with a letter or "
                f"digit), not a built-in mode's name nor starting with 'folder'; write {_SYNTAX}"
            )
    head, _, path = rest.partition(":")
    fractions, seed, given = DEFAULT_SPLIT_FRACTIONS, DEFAULT_SPLIT_SEED, set()
    for option in head.split(",")[1:]:
        key, sep, value = (part.strip() for part in option.partition("="))
        key = key.lower()
        if key not in ("fractions", "seed") or not sep or not value:
            raise KMLError(f"folder mode option {option!r} in {text!r}: expected fractions=TRAIN/VAL/TEST or seed=N")
        if key in given:
            raise KMLError(f"folder mode option {key} given twice in {text!r}")
        given.add(key)
        if key == "fractions":
            fractions = normalised_fractions(value.split("/"), f"fractions in {text!r} (TRAIN/VAL/TEST)")
        else:
            seed = check_seed(value, f"seed in {text!r}")
    if not path:
        raise KMLError(f"folder mode needs a path: {_SYNTAX}, got {text!r}")
    return FolderMode(os.path.abspath(os.path.expanduser(path)), name, fractions, seed, frozenset(given))


def mode_label(mode: str) -> str:
    """How tables and logs show a mode: a folder mode's short name when it has one, else the mode itself."""
    try:
        spec = parse_folder_mode(mode)
    except KMLError:  # not a mode kml reads: shown as it is
        return mode
    return spec.name if spec is not None and spec.name else mode


def canonical_mode(name: str) -> str:
    """The canonical name of one mode; raises a one-line :class:`KMLError` for an unknown name."""
    spec = parse_folder_mode(name)
    if spec is not None:
        return spec.mode
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in DATASET_MODES or key in SYNTHETIC_MODES or key == "synthetic":
        return key
    raise KMLError(f"unknown mode {name!r}; known modes: {', '.join(known_modes())}")


def with_folder_split(
    modes: Sequence[str], fractions: Sequence[float] | None = None, seed: int | None = None
) -> list[str]:
    """``modes`` with the class split of every folder mode set to ``fractions`` and ``seed`` (when not ``None``),
    except where a mode's own text sets that option; the folder modes come back canonical, the others as given.

    What ``kml-train --split-fractions TRAIN VAL TEST --split-seed N`` does to ``--modes``: the split becomes part
    of each folder mode's name, which the run records, so ``kml-eval`` and resumed runs use the same split.
    """
    if fractions is None and seed is None:
        return list(modes)
    fractions = normalised_fractions(fractions) if fractions is not None else None
    seed = check_seed(seed, "the split seed") if seed is not None else None
    out, folders = [], 0
    for mode in modes:
        spec = parse_folder_mode(mode)
        if spec is None:
            out.append(mode)
            continue
        folders += 1
        if fractions is not None and "fractions" not in spec.given:
            spec = spec.replace(fractions=fractions)
        if seed is not None and "seed" not in spec.given:
            spec = spec.replace(seed=seed)
        out.append(spec.mode)
    if not folders:
        raise KMLError(
            "split fractions and a split seed apply to folder modes (folder:PATH) only, and no mode given is one"
        )
    return out


def expand_modes(names: Sequence[str]) -> list[str]:
    """Canonical, de-duplicated mode list; ``synthetic`` expands to every synthetic mode.

    Two different modes may not share a short name (``NAME=folder:PATH``).
    """
    modes: list[str] = []
    for name in names:
        canonical = canonical_mode(name)
        for mode in SYNTHETIC_MODES if canonical == "synthetic" else (canonical,):
            if mode not in modes:
                modes.append(mode)
    if not modes:
        raise KMLError(f"no modes given; known modes: {', '.join(known_modes())}")
    labels: dict[str, str] = {}
    for mode in modes:
        label = mode_label(mode)
        if label in labels:
            raise KMLError(f"two modes are named {label!r}: {labels[label]} and {mode}; give each its own name")
        labels[label] = mode
    return modes


def load_store(mode: str, split: str, root: str | os.PathLike = "data", progress: bool = True) -> ImageStore:
    """Load the cached store of ``mode``/``split`` under the data root.

    Synthetic modes are generated (and cached) on first use; folder modes are converted on first use (with a
    progress bar unless ``progress`` is false); datasets must have been converted by ``kml-download``.
    The store's ``mode`` is the canonical mode name.
    """
    if split not in SPLITS:
        raise KMLError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    spec = parse_folder_mode(mode)
    if spec is not None:
        from kml.data.sources.folder import load_folder  # converts on first use

        store = load_folder(spec.path, split, root, fractions=spec.fractions, seed=spec.seed, progress=progress)
        return store if store.mode == spec.mode else dataclasses.replace(store, mode=spec.mode)
    mode = canonical_mode(mode)
    if mode in SYNTHETIC_MODES:
        return load_synthetic(mode, split, root)
    if mode == "synthetic":
        raise KMLError("'synthetic' names several modes; expand it with expand_modes first")
    directory = cache_dir(root, mode, split)
    if not has_split(mode, split, root):
        raise KMLError(
            f"the {mode} cache under {root} has no {split} classes (its split has none, e.g. --split "
            f"omniglot=released); use another split, or convert it again: kml-download --datasets {mode} --root "
            f"{root} --split ..."
        )
    if not (directory / "manifest.json").is_file():
        raise KMLError(
            f"no cache for mode {mode!r} split {split!r} under {directory}; "
            f"run: kml-download --datasets {mode} --root {root}"
        )
    return ImageStore.load(directory, rebuild=f"rebuild it: kml-download --datasets {mode} --root {root} --force")


def has_split(mode: str, split: str, root: str | os.PathLike = "data") -> bool:
    """False only where a dataset's complete cache was converted without ``split`` (``kml-download --split
    omniglot=released`` has no meta-val classes); otherwise :func:`load_store` finds the split or says how to
    make it."""
    try:
        mode = canonical_mode(mode)
    except KMLError:
        return True
    if mode not in DATASET_MODES or (cache_dir(root, mode, split) / "manifest.json").is_file():
        return True
    from kml.data.sources.cache import read_marker  # here: kml.data.sources imports this module

    splits = (read_marker(cache_dir(root, mode, split).parent) or {}).get("splits")
    return not isinstance(splits, dict) or split in splits


def load_stores(
    modes: Sequence[str],
    split: str,
    root: str | os.PathLike = "data",
    side: int | None = None,
    channels: int = 3,
    device: str | None = None,
    *,
    progress: bool = True,
) -> list[ImageStore]:
    """Load several modes' stores brought to one side length and channel count, on ``device``.

    ``side`` defaults to the largest stored side among the modes. ``progress=False`` silences the progress
    bars of a folder mode's first conversion (``--no-progress``).
    """
    stores = [load_store(mode, split, root, progress=progress) for mode in expand_modes(modes)]
    side = side or max(store.image_shape[1] for store in stores)
    return [store.to(device or "cpu").conformed(side, channels) for store in stores]
