"""``prepare``: obtain, verify, extract and convert datasets into the cache (what ``kml-download`` runs)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from kml.data.modes import DATASET_MODES, canonical_mode
from kml.data.sources import aircraft, cub, fc100, miniimagenet, omniglot
from kml.data.sources.base import Context, human_size, mirrors_from_env
from kml.data.sources.cache import folder_size, is_complete, read_marker, write_dataset
from kml.data.sources.fetch import parse_checksum
from kml.data.sources.images import ON_CORRUPT
from kml.data.store import SPLITS, locked
from kml.errors import KMLError

__all__ = ["format_summary", "prepare", "resolve_datasets", "resolve_variants", "SOURCES", "SummaryRow"]

log = logging.getLogger("kml.data.sources")

SOURCES: dict[str, ModuleType] = {
    "omniglot": omniglot,
    "miniimagenet": miniimagenet,
    "fc100": fc100,
    "cub": cub,
    "aircraft": aircraft,
}
assert tuple(SOURCES) == DATASET_MODES


@dataclass
class SummaryRow:
    """One line of the summary table."""

    dataset: str
    classes: dict[str, int] = field(default_factory=dict)
    images: int = 0
    cache_bytes: int = 0
    seconds: float = 0.0
    status: str = ""
    variant: str = ""
    error: str = ""

    def cells(self) -> list[str]:
        if self.error:
            return [self.dataset, "-", "-", "-", f"{self.seconds:.1f} s", "failed (see below)"]
        return [
            self.dataset,
            "/".join(str(self.classes.get(split, 0)) for split in SPLITS),
            str(self.images),
            human_size(self.cache_bytes),
            f"{self.seconds:.1f} s",
            f"{self.status} ({self.variant})" if self.variant else self.status,
        ]


def format_summary(rows: Sequence[SummaryRow]) -> str:
    """The rows as an aligned text table."""
    header = ["dataset", "classes train/val/test", "images", "cache size", "time", "status (split)"]
    table = [header, *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def resolve_datasets(names: Sequence[str]) -> list[str]:
    """Canonical dataset names (aliases such as ``FC100``, ``bird`` work), without repeats."""
    valid = ", ".join(DATASET_MODES)
    out: list[str] = []
    for name in names:
        try:
            canonical = canonical_mode(name)
        except KMLError:
            canonical = ""
        if canonical and canonical not in DATASET_MODES:  # a synthetic or folder mode
            raise KMLError(
                f"{name!r} needs no download: synthetic and folder modes are generated or converted on first use "
                f"(kml-train --modes {name}); kml-download prepares the datasets {valid}"
            )
        if canonical not in DATASET_MODES:
            raise KMLError(
                f"unknown dataset {name!r}; choose from {valid} (aliases: FC100, bird, mini-imagenet, fgvc-aircraft)"
            )
        if canonical not in out:
            out.append(canonical)
    if not out:
        raise KMLError(f"no dataset given; choose from {valid}")
    return out


def resolve_variants(datasets: Sequence[str], split_variant: str | None) -> dict[str, str]:
    """Split variant per dataset from ``"vinyals"`` or ``"omniglot=vinyals,cub=published"``."""
    chosen = {name: next(iter(SOURCES[name].VARIANTS)) for name in datasets}
    if not split_variant:
        return chosen
    offered = "; ".join(f"{n}: {', '.join(SOURCES[n].VARIANTS)}" for n in datasets)
    for part in split_variant.replace(" ", "").split(","):
        if "=" in part:
            name, variant = part.split("=", 1)
            name = resolve_datasets([name])[0]
            if name not in chosen or variant not in SOURCES[name].VARIANTS:
                raise KMLError(f"unknown split {part!r}; splits offered: {offered}")
            chosen[name] = variant
        else:
            takers = [n for n in datasets if part in SOURCES[n].VARIANTS]
            if not takers:
                raise KMLError(f"no dataset offers split {part!r}; splits offered: {offered}")
            chosen.update({n: part for n in takers})
    return chosen


@dataclass(frozen=True)
class _Conversion:
    """How :func:`prepare` converts every dataset; checked when made, before any dataset name."""

    on_corrupt: str
    crop: bool
    omniglot_side: int
    aircraft_banner: bool
    cleanup: bool
    workers: int | None
    force: bool
    keep_going: bool
    fc100_colours: str = "clean"
    aircraft_misfile: bool = False

    def __post_init__(self) -> None:
        if self.on_corrupt not in ON_CORRUPT:
            raise KMLError(f"on_corrupt must be one of {', '.join(ON_CORRUPT)}, got {self.on_corrupt!r}")
        if self.fc100_colours not in fc100.COLOURS:
            raise KMLError(f"--fc100-colours must be one of {', '.join(fc100.COLOURS)}, got {self.fc100_colours!r}")
        side = self.omniglot_side
        if isinstance(side, bool) or not isinstance(side, int) or side < 16:
            raise KMLError(f"--omniglot-side must be an integer of at least 16, got {side!r}")

    def cache_options(self, name: str, variant: str) -> dict[str, Any]:
        """The options recorded with a dataset's cache: a cache made with other ones is converted again."""
        return {
            "variant": variant,
            **({"crop": bool(self.crop)} if name == "aircraft" else {}),
            **({"keep_banner": True} if name == "aircraft" and self.aircraft_banner and not self.crop else {}),
            **({"omniglot_side": int(self.omniglot_side)} if name == "omniglot" and self.omniglot_side != 28 else {}),
            # the released codes' data quirks, recorded only when asked: a default cache's options are as before
            **({"colours": self.fc100_colours} if name == "fc100" and self.fc100_colours != "clean" else {}),
            **({"misfile": True} if name == "aircraft" and self.aircraft_misfile else {}),
        }

    def source_options(self) -> dict[str, Any]:
        """The options the dataset modules read from :attr:`Context.options` (a new dict each call)."""
        return {
            "crop": bool(self.crop),
            "omniglot_side": int(self.omniglot_side),
            "keep_banner": bool(self.aircraft_banner) and not self.crop,
            "fc100_colours": self.fc100_colours,
            "misfile": bool(self.aircraft_misfile),
        }


@dataclass(frozen=True)
class _Fetching:
    """How :func:`prepare` obtains every dataset's raw files; the checksums are checked when made."""

    root: Path
    mirrors: list[str]
    checksums: dict[str, str]
    progress: bool
    retries: int
    backoff: float
    timeout: float
    force: bool

    def __post_init__(self) -> None:
        for value in self.checksums.values():
            parse_checksum(value)  # a malformed one is refused before anything runs, not when (if ever) it is used

    def context(self, name: str, variant: str, options: dict[str, Any]) -> Context:
        """A fresh :class:`Context` for one dataset (its own checksums dict and records)."""
        return Context(
            name,
            self.root,
            variant,
            self.mirrors,
            dict(self.checksums),
            options,
            self.progress,
            self.retries,
            self.backoff,
            self.timeout,
            self.force,
        )


def _row(name: str, directory: Path, status: str, seconds: float) -> SummaryRow:
    marker = read_marker(directory) or {}
    splits = marker.get("splits", {})
    return SummaryRow(
        name,
        {s: v["classes"] for s, v in splits.items()},
        sum(v["images"] for v in splits.values()),
        folder_size(directory),
        seconds,
        status,
        marker.get("options", {}).get("variant", ""),
    )


def _cleanup(ctx: Context) -> None:
    """Delete ``raw/<name>/extracted/``, kml's own extraction folder, and its records; nothing else."""
    folder = ctx.extract_dir
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir() or folder.resolve().parent != ctx.raw_dir.resolve():
        log.warning("%s: --cleanup left %s alone: it is not a folder kml made inside %s", ctx.name, folder, ctx.raw_dir)
        return
    shutil.rmtree(folder)
    for record in ctx.raw_dir.glob(".kml-extracted-*.json"):
        record.unlink()


def _writable(folder: Path) -> None:
    """A one-line error naming kml-download's own flag when the cache cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise KMLError(
            f"cannot write the cache folder {folder}: {error.strerror or error}; pass --root a writable data root"
        ) from None


def _prepare_one(ctx: Context, options: dict, conversion: _Conversion) -> SummaryRow:
    """Convert one dataset unless a complete cache with the same options exists (under the cache lock)."""
    started = time.time()
    directory = ctx.root / "cache" / ctx.name
    if not conversion.force and is_complete(directory, options):  # a complete cache needs no lock: read-only roots work
        log.info("%s: cache complete at %s", ctx.name, directory)
        return _row(ctx.name, directory, "cached", time.time() - started)
    _writable(directory.parent)
    with locked(directory):
        if not conversion.force and is_complete(directory, options):
            log.info("%s: cache complete at %s", ctx.name, directory)
            return _row(ctx.name, directory, "cached", time.time() - started)
        module = SOURCES[ctx.name]
        log.info("%s: preparing (split %s)", ctx.name, ctx.variant)
        plan = module.build(ctx)
        info = {
            "dataset": ctx.name,
            "source": module.SOURCE,
            "sources": ctx.sources,
            "split": ctx.variant,
            "side": module.SIDE,
            "licence": module.LICENCE,
        }
        write_dataset(directory, ctx.name, plan, info, options, conversion.on_corrupt, conversion.workers, ctx.progress)
    if conversion.cleanup:
        _cleanup(ctx)
    return _row(ctx.name, directory, "converted", time.time() - started)


def prepare(
    datasets: Sequence[str],
    root: str | os.PathLike = "data",
    force: bool = False,
    split_variant: str | None = None,
    mirrors: Sequence[str] | None = None,
    checksums: Mapping[str, str] | None = None,
    on_corrupt: str = "stop",
    crop: bool = True,
    omniglot_side: int = 28,
    aircraft_banner: bool = False,
    cleanup: bool = False,
    progress: bool = True,
    workers: int | None = None,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 60.0,
    keep_going: bool = False,
    fc100_colours: str = "clean",
    aircraft_misfile: bool = False,
) -> list[SummaryRow]:
    """Download (or find), verify, extract and convert ``datasets`` into ``<root>/cache/``.

    Args:
        datasets: names or aliases (``omniglot``, ``miniimagenet``, ``FC100``, ``bird``, ``aircraft``).
        root: the data root (raw files under ``raw/``, stores under ``cache/``).
        force: convert again even when a complete cache with the same options exists
            (archives are re-verified and re-extracted; downloads are kept).
        split_variant: ``"vinyals"`` (applies to every listed dataset that offers it) or
            ``"omniglot=vinyals,..."`` (Omniglot also ``lake`` and ``released``, the released code's 1100 / 0 / 523);
            default: each dataset's published split.
        mirrors: base URLs that replace the built-in download locations, tried in order
            (``<base>/<archive name>``); default from ``KML_MIRROR``.
        checksums: ``{archive name: "md5:..."}`` overriding the built-in checksums
            (for archives repackaged by a local mirror).
        on_corrupt: ``"stop"`` (default) or ``"skip"`` for an image that cannot be decoded.
        crop: crop aircraft photos to their bounding box.
        omniglot_side: stored Omniglot side (28; 84 as the published mixtures: Lanczos from 105).
        aircraft_banner: with ``crop=False``, keep the photos' copyright banner (the released converters do).
        fc100_colours: ``"clean"`` (the archive's bytes) or ``"released"`` (as the released loader's ``ToPILImage``
            wraps them, then Lanczos to 84; :mod:`kml.data.sources.fc100`).
        aircraft_misfile: file the aircraft images as the released converter does (F/A-18 in no split;
            :mod:`kml.data.sources.aircraft`).
        cleanup: delete ``raw/<name>/extracted/`` (what kml extracted) after converting; archives
            and folders placed by hand are kept.
        progress: tqdm bars.
        workers: decoding threads (default: cores, at most 8).
        retries, backoff, timeout: per URL: retries of transient failures, first wait in
            seconds (doubling), and the seconds within which the server must answer and a
            download must receive at least 32 KiB (else the next URL is tried, without retries).
        keep_going: on a dataset's :class:`KMLError`, record it in its row (status
            ``failed``, message in ``error``) and go on with the next dataset.

    Returns:
        One :class:`SummaryRow` per dataset (status ``converted`` or ``cached``).
    """
    conversion = _Conversion(
        on_corrupt,
        crop,
        omniglot_side,
        aircraft_banner,
        cleanup,
        workers,
        force,
        keep_going,
        fc100_colours,
        aircraft_misfile,
    )
    names = resolve_datasets(datasets)
    variants = resolve_variants(names, split_variant)
    mirrors = list(mirrors) if mirrors is not None else mirrors_from_env()
    fetching = _Fetching(Path(root), mirrors, dict(checksums or {}), progress, retries, backoff, timeout, force)
    rows, used = _prepare_all(names, variants, fetching, conversion)
    _warn_unused_checksums(sorted(set(checksums or {}) - used), rows)
    return rows


def _prepare_all(
    names: Sequence[str], variants: Mapping[str, str], fetching: _Fetching, conversion: _Conversion
) -> tuple[list[SummaryRow], set[str]]:
    """Prepare the datasets in turn; also return the names of the checksums that were consulted."""
    rows: list[SummaryRow] = []
    used: set[str] = set()
    for name in names:
        started = time.time()
        options = conversion.cache_options(name, variants[name])
        ctx = fetching.context(name, variants[name], conversion.source_options())
        try:
            rows.append(_prepare_one(ctx, options, conversion))
        except KMLError as error:
            if not conversion.keep_going:
                raise
            rows.append(
                SummaryRow(
                    name, seconds=time.time() - started, status="failed", variant=variants[name], error=str(error)
                )
            )
        finally:
            used |= ctx.checksums_used
    return rows, used


def _warn_unused_checksums(unused: Sequence[str], rows: Sequence[SummaryRow]) -> None:
    """A checksum that verified nothing must not look as if it had (one line each)."""
    cached = [row.dataset for row in rows if row.status == "cached"]
    for name in unused:
        why = (
            f"the cache of {', '.join(cached)} is already complete, nothing was verified "
            f"(add --force to verify the archives and convert again)"
            if cached
            else f"no archive of {', '.join(row.dataset for row in rows)} named {name} was verified"
        )
        log.warning("warning: --checksum %s was not used: %s", name, why)
