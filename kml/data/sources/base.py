"""What every dataset source shares: where raw files live, how they are obtained.

Layout under the data root::

    <root>/raw/<dataset>/<archive>        downloaded here, or placed here by hand
    <root>/raw/<dataset>/<extracted>/     extracted archives (+ a .extracted-<archive>.json marker)
    <root>/cache/<dataset>/<split>/       the converted stores the samplers read

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
from kml.errors import KMLError

__all__ = ["Context", "ConversionPlan", "human_size", "MIRROR_ENV", "mirrors_from_env", "split_by_fractions"]

MIRROR_ENV = "KML_MIRROR"


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

    @property
    def raw_dir(self) -> Path:
        return self.root / "raw" / self.name

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

    def extracted(self, archive: Path, dest: Path | None = None) -> Path:
        """Extract ``archive`` into ``dest`` (default ``raw/<name>/``) unless a marker says it is done."""
        dest = dest or self.raw_dir
        marker = dest / f".extracted-{archive.name}.json"
        checksum = self.sources.get(archive.name, {}).get("checksum")
        if not self.force and marker.is_file():
            try:
                if json.loads(marker.read_text()).get("checksum") == checksum:
                    return dest
            except (OSError, json.JSONDecodeError):
                pass
        marker.unlink(missing_ok=True)
        written = safe_extract(archive, dest, self.progress)
        source = self.sources.get(archive.name, {})
        marker.write_text(json.dumps({"archive": archive.name, **source, "entries": [p.name for p in written]}))
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
        a folder already extracted under ``raw/<name>/`` (by this code, or by hand when
        no archive lies beside it), then each archive found or downloaded, and extracted.
        """
        archive_dirs = list(archive_dirs)
        for folder, label in reuse:
            if all((folder / rel).exists() for rel in expect):
                self.sources.setdefault(
                    "reused", {"origin": f"{label} at {folder}", "checksum": None, "verified": False}
                )
                return folder
        raw = self.raw_dir
        if not self.force and all((raw / rel).exists() for rel in expect):
            markers = [raw / f".extracted-{r.filename}.json" for r in resources]
            by_hand = not any(self.find_file(r.filename, archive_dirs) for r in resources)
            if all(m.is_file() for m in markers) or by_hand:
                origin = "extracted folder placed by hand" if by_hand else "previously extracted archives"
                self.sources.setdefault(
                    "extracted", {"origin": f"{origin} in {raw}", "checksum": None, "verified": False}
                )
                for marker in markers:
                    if marker.is_file():  # what was recorded when the archive was verified and extracted
                        entry = json.loads(marker.read_text())
                        entry.pop("entries", None)
                        self.sources[entry.pop("archive")] = entry
                return raw
        for resource in resources:
            self.extracted(self.archive(resource, archive_dirs))
        missing = [rel for rel in expect if not (raw / rel).exists()]
        if missing:
            raise KMLError(
                f"{self.name}: after extracting {', '.join(r.filename for r in resources)} into {raw}, "
                f"{missing[0]} is missing; is it the right archive? Delete it and rerun"
            )
        return raw


def split_by_fractions(names: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, list[str]]:
    """Shuffle ``names`` with ``numpy.random.RandomState(seed)`` and cut train/val/test.

    Counts are ``int(f / sum(f) * n)`` for train and val and the rest for test,
    exactly as the published MMAML conversion scripts compute them.
    """
    order = list(names)
    np.random.RandomState(seed).shuffle(order)
    total = float(sum(fractions))
    n_train, n_val = (int(float(f) / total * len(order)) for f in fractions[:2])
    return {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }
