"""A published recipe checks its data: the caches a new run opens against the data the recipe was published on.

The published recipes (those with :attr:`~kml.config.recipes.Recipe.published`) were trained on the data of
MMAML's released conversion scripts and loaders, which KML's released code reuses: Omniglot's 105-pixel
originals Lanczos-resized to 84 (``--common-img-side-len 84``), the first 1100 character folders for meta-train
and the last 523 for meta-test; Aircraft's whole photos, copyright banner included, squashed to 84. A cache made
otherwise (kml's defaults: Omniglot stored at 28 px and brought to 84 bilinearly at load, Aircraft cropped to its
bounding box) is refused in one line naming the ``download.py`` command that builds the published one, unless
``allow_data_departure`` (``kml-train --allow-data-departure``) lets the run go on; the run's ``config.json`` then
lists each departure in ``data_departures``.

Not refused: kml's documented fixes of the released data (sorted splits, FC100's clean colours, F/A-18 filed in
its own split) and the released quirks themselves (``--split omniglot=released``, ``--fc100-colours released``,
``--aircraft-misfile``), which the caches record; differences no cache can remove (CUB's class order, skimage's
resize) are on the Fidelity table. An as-released recipe (one that turns on a ``released_*`` quirk, such as
``mmaml-as-released``) stands for what the authors ran, so it also asks for those three quirks. Synthetic modes,
image folders and kml's own recipes have no published data and are never refused.

Caches written before these checks open as before: the stored side is read from the manifest's image shape, the
split from its ``split`` and the Aircraft crop from its ``crop`` note, which every kml version wrote. Where one is
missing the default of the kml that wrote it is assumed (the published split; photos cropped), so such a cache is
refused with the command that rebuilds it, never accepted on a guess.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kml.config.recipes import recipe
from kml.data.modes import expand_modes
from kml.data.store import MANIFEST_FILE, cache_dir
from kml.errors import KMLError, setting

__all__ = ["check_recipe_data", "data_departures", "DataDeparture", "download_command", "PUBLISHED_OMNIGLOT_SIDE"]

PUBLISHED_OMNIGLOT_SIDE = 84  # MMAML's main.py: every mode of a mixture at --common-img-side-len 84
# the released split and kml's sorted version of it (same 523 test classes); vinyals and lake test other classes
PUBLISHED_OMNIGLOT_SPLITS = ("published", "released")


@dataclass(frozen=True)
class DataDeparture:
    """One mode's cache made otherwise than the published data: what differs, and the download flags that fix it
    (with the flags that keep the cache's other released options)."""

    mode: str
    what: str
    flags: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.mode} {self.what}"


def _manifest(root: str | os.PathLike, mode: str) -> dict[str, Any] | None:
    """The train split's manifest of ``mode``'s cache, or ``None`` (no cache yet: loading it says how to make it)."""
    try:
        manifest = json.loads((cache_dir(root, mode, "train") / MANIFEST_FILE).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _info(manifest: dict[str, Any]) -> dict[str, Any]:
    info = manifest.get("info")
    return info if isinstance(info, dict) else {}


def _omniglot(manifest: dict[str, Any], released: bool) -> DataDeparture | None:
    shape = manifest.get("image_shape")
    side = shape[-1] if isinstance(shape, list) and shape else None
    split = _info(manifest).get("split", "published")  # every kml wrote it; "published" was the default of all
    problems = []
    if side != PUBLISHED_OMNIGLOT_SIDE:
        problems.append(f"stored at {side} px (published: {PUBLISHED_OMNIGLOT_SIDE}, Lanczos from 105)")
    if released and split != "released":
        problems.append(f"split {split} (as released: 1100 / 0 / 523, --split omniglot=released)")
    elif split not in PUBLISHED_OMNIGLOT_SPLITS:
        problems.append(f"split {split} (published: the first 1100 characters for meta-train, the last 523 for test)")
    if not problems:
        return None
    # the command rebuilds the cache with the published side and keeps (or sets) a split the recipe takes
    keep = "released" if released or split == "released" else "published"
    flags = (f"--omniglot-side {PUBLISHED_OMNIGLOT_SIDE}", f"--split omniglot={keep}")
    return DataDeparture("omniglot", ", ".join(problems), flags)


def _fc100(manifest: dict[str, Any], released: bool) -> DataDeparture | None:
    colours = _info(manifest).get("colours", "clean")  # caches before the option are the clean bytes
    if not released or colours == "released":
        return None  # kml's clean bytes are a documented fix of the published recipes' data
    what = "in clean colours at 32 px (as released: ToPILImage's x*255 mod 256, Lanczos to 84)"
    return DataDeparture("fc100", what, ("--fc100-colours released",))


def _aircraft(manifest: dict[str, Any], released: bool) -> DataDeparture | None:
    info = _info(manifest)
    crop = str(info.get("crop", "bounding box"))  # every kml wrote it; cropping was the default of all of them
    misfiled = "misfiled" in info  # only caches made with --aircraft-misfile record it
    problems = []
    if "banner kept" not in crop:
        what = "cropped to the bounding box" if crop.startswith("bounding box") else "without its copyright banner"
        problems.append(f"{what} (published: the whole photo, banner included)")
    if released and not misfiled:
        problems.append("filed by variant (as released: F/A-18 misfiled into no split, --aircraft-misfile)")
    if not problems:
        return None
    flags = ("--no-crop", "--aircraft-banner", *(("--aircraft-misfile",) if released or misfiled else ()))
    return DataDeparture("aircraft", ", ".join(problems), flags)


_CHECKS = {"omniglot": _omniglot, "fc100": _fc100, "aircraft": _aircraft}


def data_departures(modes: Sequence[str], root: str | os.PathLike, released: bool = False) -> list[DataDeparture]:
    """How the caches of ``modes`` under ``root`` depart from the published data, or with ``released`` from the
    data as the released code made it (none for modes without a cache yet, synthetic modes and image folders)."""
    found = []
    for mode in expand_modes(modes):
        manifest = _manifest(root, mode) if mode in _CHECKS else None
        departure = _CHECKS[mode](manifest, released) if manifest is not None else None
        if departure is not None:
            found.append(departure)
    return found


def download_command(departures: Sequence[DataDeparture], root: str | os.PathLike) -> str:
    """The one ``python download.py`` command that builds the published data of every departing mode."""
    flags = [flag for departure in departures for flag in departure.flags]
    datasets = " ".join(departure.mode for departure in departures)
    return f"python download.py --datasets {datasets} {' '.join(flags)} --root {shlex.quote(os.fspath(root))}"


def check_recipe_data(config: Any) -> list[str] | None:
    """Refuse, in one line, a published recipe's run on caches made otherwise than its published data; with
    ``config.allow_data_departure`` return the departures (``config.json``'s ``data_departures``), else ``None``."""
    if not config.recipe:
        return None
    chosen = recipe(config.recipe)
    if chosen.published is None:  # kml's own recipes: no published data
        return None
    # an as-released recipe (one that turns on a released_* quirk) takes the released data's quirks too
    released = any(key.startswith("released_") and value is True for key, value in chosen.settings.items())
    found = data_departures(config.modes, config.data_root, released)
    if not found:
        return None
    if getattr(config, "allow_data_departure", False):
        return [str(departure) for departure in found]
    allow = setting("allow_data_departure")
    allow = allow if allow.startswith("--") else f"{allow}=True"
    raise KMLError(
        f"recipe {chosen.tag} was {'run' if released else 'published'} on other data: {'; '.join(map(str, found))}; "
        f"build it with: {download_command(found, config.data_root)} (or pass {allow} to train on this data, recorded "
        f"in config.json)"
    )
