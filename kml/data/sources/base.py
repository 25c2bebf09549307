"""What every dataset source shares: where raw files live, how they are obtained.

Layout under the data root::

    <root>/raw/<dataset>/<archive>                    downloaded here, or placed here by hand
    <root>/raw/<dataset>/extracted/                   kml's own folder: the archives are extracted here only
    <root>/raw/<dataset>/.kml-extracted-<archive>.json   what kml extracted (written by kml, outside extracted/)
    <root>/cache/<dataset>/<split>/                   the converted stores the samplers read

Archive members land only under ``extracted/``: they cannot replace an archive or any other
file beside it, nor write the records that say what was extracted (``--cleanup`` deletes
``extracted/`` itself and nothing else). Extracted folders placed by hand directly under
``raw/<dataset>/`` are read where they are and never deleted.

An archive is looked for, in order, under ``raw/<dataset>/``, directly under the
root, and in the folders other libraries download to (torchvision,
learn2learn, torchmeta); only when none holds it is the network used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kml.data.sources.extract import safe_extract
from kml.data.sources.fetch import DownloadFailed, Resource, download, verify
from kml.data.sources.images import ClassPlan
from kml.data.store import split_classes
from kml.errors import KMLError

__all__ = [
    "Context",
    "ConversionPlan",
    "EXTRACTED",
    "human_size",
    "MIRROR_ENV",
    "mirrors_from_env",
    "split_by_fractions",
]

MIRROR_ENV = "KML_MIRROR"
EXTRACTED = "extracted"  # the folder under raw/<dataset>/ that archives are extracted into


def mirrors_from_env() -> list[str]:
    """Base URLs from ``KML_MIRROR`` (comma or space separated), tried in order."""
    return [part for part in os.environ.get(MIRROR_ENV, "").replace(",", " ").split() if part]


def human_size(size: float | None) -> str:
    if size is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit in ("B", "KB") else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


@dataclass
class ConversionPlan:
    """What a dataset module hands back: per split, the classes and how to decode their items.

    ``decode(item)`` returns uint8 ``[C, side, side]``; ``describe(item)`` names the
    item in error messages (the path inside the archive). ``info`` goes into every
    split's manifest (source, split rule, ...).
    """

    splits: dict[str, list[ClassPlan]]
    decode: Callable[[Any], np.ndarray]
    describe: Callable[[Any], str]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """Everything a dataset module needs to obtain its raw files and build a plan."""

    name: str
    root: Path
    variant: str
    mirrors: Sequence[str] = ()
    checksums: Mapping[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    retries: int = 3
    backoff: float = 1.0
    timeout: float = 60.0
    force: bool = False
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)  # archive or folder -> checksum, origin
    checksums_used: set[str] = field(default_factory=set)  # the names of ``checksums`` that were consulted

    @property
    def raw_dir(self) -> Path:
        return self.root / "raw" / self.name

    @property
    def extract_dir(self) -> Path:
        return self.raw_dir / EXTRACTED

    def record(self, archive_name: str) -> Path:
        """Where kml notes that it extracted ``archive_name`` (beside ``extracted/``, where no member can write)."""
        return self.raw_dir / f".kml-extracted-{archive_name}.json"

    # -------------------------------------------------------------- locating
    def candidates(self, filename: str, extra_dirs: Iterable[Path] = ()) -> list[Path]:
        return [self.raw_dir / filename, self.root / filename, *(Path(d) / filename for d in extra_dirs)]

    def find_file(self, filename: str, extra_dirs: Iterable[Path] = ()) -> Path | None:
        return next((path for path in self.candidates(filename, extra_dirs) if path.is_file()), None)

    def urls(self, resource: Resource) -> list[str]:
        """The mirrors replace the built-in locations (a local mirror never reaches out)."""
        if self.mirrors:
            return [f"{base.rstrip('/')}/{resource.filename}" for base in self.mirrors]
        return list(resource.urls)

    def expected_checksum(self, resource: Resource) -> str | None:
        if resource.filename in self.checksums:
            self.checksums_used.add(resource.filename)
        return self.checksums.get(resource.filename, resource.checksum)

    def manual_hint(self, resources: Sequence[Resource]) -> str:
        names = ", ".join(r.filename + (f" (~{human_size(r.size)})" if r.size else "") for r in resources)
        return f"download it by hand and place {names} in {self.raw_dir}/ (or point --mirror at a copy), then rerun"

    def archive(self, resource: Resource, extra_dirs: Iterable[Path] = (), hint: str | None = None) -> Path:
        """The verified archive: found on disk (no network) or downloaded into ``raw/<name>/``."""
        expected = self.expected_checksum(resource)
        found = self.find_file(resource.filename, extra_dirs)
        if found is not None:
            got = verify(found, expected)
            origin = f"found at {found}"
        else:
            target = self.raw_dir / resource.filename
            try:
                url, got = download(
                    self.urls(resource), target, expected, self.retries, self.backoff, self.timeout, self.progress
                )
            except DownloadFailed as failure:
                raise KMLError(
                    f"could not download {resource.filename} for {self.name} "
                    f"({'; '.join(failure.reasons) or 'no download location'}); {hint or self.manual_hint([resource])}"
                ) from None
            found, origin = target, url
        self.sources[resource.filename] = {
            "checksum": got,
            "expected": expected,
            "verified": bool(expected),
            "origin": origin,
        }
        return found

    def _read_record(self, archive_name: str) -> dict[str, Any] | None:
        try:
            entry = json.loads(self.record(archive_name).read_text())
        except (OSError, ValueError):
            return None
        return entry if isinstance(entry, dict) else None

    def extracted(self, archive: Path) -> Path:
        """Extract ``archive`` into ``raw/<name>/extracted/`` and record it there; return that folder."""
        dest, record = self.extract_dir, self.record(archive.name)
        record.unlink(missing_ok=True)
        safe_extract(archive, dest, self.progress)
        record.write_text(json.dumps({"archive": archive.name, **self.sources.get(archive.name, {})}))
        return dest

    def obtain(
        self,
        resources: Sequence[Resource],
        expect: Sequence[str],
        reuse: Sequence[tuple[Path, str]] = (),
        archive_dirs: Iterable[Path] = (),
    ) -> Path:
        """A folder holding every path in ``expect`` (relative), obtained without the network if possible.

        Tried in order: ``reuse`` folders left by other libraries (``(path, label)``),
        ``raw/<name>/extracted/`` when kml extracted every archive there before, folders
        extracted by hand directly under ``raw/<name>/`` when no archive lies beside them,
        then each archive found or downloaded, and extracted into ``raw/<name>/extracted/``.
        """
        archive_dirs = list(archive_dirs)
        for folder, label in reuse:
            if all((folder / rel).exists() for rel in expect):
                self.sources.setdefault(
                    "reused", {"origin": f"{label} at {folder}", "checksum": None, "verified": False}
                )
                return folder
        raw, out = self.raw_dir, self.extract_dir
        if not self.force:
            records = [self._read_record(r.filename) for r in resources]
            if all(records) and all((out / rel).exists() for rel in expect):
                self.sources.setdefault(
                    "extracted",
                    {"origin": f"previously extracted archives in {out}", "checksum": None, "verified": False},
                )
                for resource, entry in zip(resources, records):  # recorded when the archive was verified
                    self.sources[resource.filename] = {k: v for k, v in (entry or {}).items() if k != "archive"}
                return out
            by_hand = not any(self.find_file(r.filename, archive_dirs) for r in resources)
            if by_hand and all((raw / rel).exists() for rel in expect):
                self.sources.setdefault(
                    "extracted",
                    {"origin": f"extracted folder placed by hand in {raw}", "checksum": None, "verified": False},
                )
                return raw
        for resource in resources:
            self.extracted(self.archive(resource, archive_dirs))
        missing = [rel for rel in expect if not (out / rel).exists()]
        if missing:
            raise KMLError(
                f"{self.name}: after extracting {', '.join(r.filename for r in resources)} into {out}, "
                f"{missing[0]} is missing; is it the right archive? Delete it and rerun"
            )
        return out


def split_by_fractions(names: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, list[str]]:
    """Shuffle ``names`` with ``numpy.random.RandomState(seed)`` and cut train/val/test.

    Counts are ``int(f / sum(f) * n)`` for train and val and the rest for test,
    exactly as the published MMAML conversion scripts compute them (:func:`kml.data.store.split_classes`).
    """
    return split_classes(names, fractions, seed)  # type: ignore[return-value]
