"""Safe extraction of zip and tar archives.

Every member is checked before anything is written: absolute names, ``..``
components, names that resolve outside the target folder, and links (symbolic
or hard), devices and fifos are refused, naming the member. Members are
written by this code (never by ``extractall``) into a temporary folder beside
the target and moved into place when the whole archive has been read, so an
interrupted or corrupt extraction leaves nothing that looks extracted.
"""

from __future__ import annotations

import errno
import gzip
import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from kml.data.sources.fetch import disk_full, looks_like_html
from kml.errors import KMLError

__all__ = ["CHUNK", "is_archive", "safe_extract"]

CHUNK = 1 << 20


def _safe_name(archive: Path, name: str, dest: Path) -> Path:
    """The path a member may be written to, or a KMLError if it escapes ``dest``."""
    pure = PurePosixPath(name.replace("\\", "/"))
    if (
        pure.is_absolute()
        or name.startswith(("/", "\\"))
        or (pure.parts and ":" in pure.parts[0])
        or ".." in pure.parts
    ):
        raise KMLError(f"refusing to extract {archive.name}: member {name!r} points outside the target folder")
    target = (dest / pure).resolve()
    if target != dest.resolve() and dest.resolve() not in target.parents:
        raise KMLError(f"refusing to extract {archive.name}: member {name!r} resolves outside the target folder")
    return dest / pure


def _copy(source, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as handle:
        shutil.copyfileobj(source, handle, CHUNK)


def _extract_zip(archive: Path, tmp: Path, progress: bool) -> None:
    with zipfile.ZipFile(archive) as bundle:
        members = bundle.infolist()
        for member in members:  # check everything first: refuse the archive before writing anything
            _safe_name(archive, member.filename, tmp)
            if stat.S_ISLNK(member.external_attr >> 16):
                raise KMLError(f"refusing to extract {archive.name}: member {member.filename!r} is a symbolic link")
        for member in tqdm(members, desc=f"extract {archive.name}", unit="file", disable=not progress, leave=False):
            target = _safe_name(archive, member.filename, tmp)
            if member.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            with bundle.open(member) as source:
                _copy(source, target)


def _extract_tar(archive: Path, tmp: Path, progress: bool) -> None:
    # Stream the members in order (a .tar.gz cannot seek cheaply); each is checked before it is written.
    with (
        tarfile.open(archive, "r:*") as bundle,
        tqdm(desc=f"extract {archive.name}", unit="file", disable=not progress, leave=False) as bar,
    ):
        for member in bundle:
            target = _safe_name(archive, member.name, tmp)
            if member.issym() or member.islnk():
                raise KMLError(
                    f"refusing to extract {archive.name}: member {member.name!r} is a link to {member.linkname!r}"
                )
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                source = bundle.extractfile(member)
                assert source is not None
                with source:
                    _copy(source, target)
            else:
                raise KMLError(
                    f"refusing to extract {archive.name}: member {member.name!r} is not a regular file or folder"
                )
            bar.update(1)


def is_archive(path: Path) -> bool:
    return zipfile.is_zipfile(path) or tarfile.is_tarfile(path)


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike, progress: bool = True) -> list[Path]:
    """Extract a zip or tar(.gz/.bz2/.xz) archive into ``dest``; return the top-level paths written.

    Existing top-level entries of the same names in ``dest`` are replaced.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".extract-{archive.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    corrupt = f"archive {archive} is truncated or corrupt"
    if looks_like_html(archive):
        corrupt = (
            f"{archive} is a web page, not an archive (a download link that answered with a page, "
            f"e.g. a file-sharing site's confirmation page)"
        )
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, tmp, progress)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, tmp, progress)
        else:
            raise KMLError(f"{corrupt} (neither a zip nor a tar archive); delete it and rerun to download it again")
        written = []
        for entry in sorted(tmp.iterdir()):
            final = dest / entry.name
            if final.resolve() == archive.resolve():  # for callers that extract beside the archive (kml does not)
                raise KMLError(f"refusing to extract {archive.name}: member {entry.name!r} would replace the archive")
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            elif final.exists() or final.is_symlink():
                final.unlink()
            os.replace(entry, final)
            written.append(final)
        return written
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, gzip.BadGzipFile, lzma.LZMAError) as error:
        raise KMLError(
            f"{corrupt} ({type(error).__name__}: {error}); delete it and rerun to download it again"
        ) from None
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise disk_full(error, f"extracting {archive.name} into {dest}") from None
        raise KMLError(f"could not extract {archive}: {error}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
