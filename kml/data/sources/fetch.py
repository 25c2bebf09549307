"""Resumable, verified downloads with urllib.

A download streams into ``<file>.part`` beside the target, with a tqdm bar.
When a ``.part`` file is already there (an interrupted run), the next run asks
the server for the rest with an HTTP ``Range`` header and appends; a server
that ignores ranges sends the whole file again and the part is rewritten.
Transient failures (HTTP 5xx/408/429, connection reset, a body cut short) are
retried with exponential backoff; anything else moves on to the next URL
(mirror). A download must make progress: at least ``MIN_PROGRESS`` bytes in
every ``timeout`` seconds (also the socket timeout), or the URL is abandoned at
once, without retries (a silent or trickling mirror would otherwise hold the
run for ever). Only when the checksum matches is the file renamed into
place, so a file under its final name is always complete. A mismatch moves
the download aside to ``<file>.bad`` and stops with the expected and the
computed checksum.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from kml.errors import KMLError

__all__ = [
    "CHUNK",
    "disk_full",
    "download",
    "DownloadFailed",
    "file_checksum",
    "looks_like_html",
    "MIN_PROGRESS",
    "parse_checksum",
    "Resource",
    "TRANSIENT_HTTP",
    "USER_AGENT",
    "verify",
]

CHUNK = 1 << 20
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
USER_AGENT = "kml-download/0.1 (Python urllib)"
MIN_PROGRESS = 32 * 1024  # bytes a download must receive in every `timeout` seconds (0.5 KiB/s at the default 60 s)


@dataclass(frozen=True)
class Resource:
    """One archive (or data file) of a dataset.

    Attributes:
        filename: name on disk, also the name looked for when placed by hand.
        urls: download locations, tried in order (mirrors after the original).
        checksum: ``"md5:<hex>"`` or ``"sha256:<hex>"`` (a bare 32/64-digit hex is
            read as md5/sha256); None when no published checksum is known, in
            which case the computed one is recorded in the cache manifest.
        size: approximate size in bytes (for messages only).
    """

    filename: str
    urls: tuple[str, ...]
    checksum: str | None = None
    size: int | None = None


class DownloadFailed(Exception):
    """Every URL failed; ``reasons`` says why, one entry per URL."""

    def __init__(self, reasons: list[str]):
        super().__init__("; ".join(reasons))
        self.reasons = reasons


class _Transient(Exception):
    """A failure worth retrying on the same URL."""


class _Stalled(Exception):
    """Too little progress within ``timeout`` seconds: the next URL is tried, this one is not retried."""


def parse_checksum(checksum: str) -> tuple[str, str]:
    """``"md5:abc..."`` / bare hex -> ``(algorithm, lowercase hex)``."""
    algorithm, _, digest = checksum.strip().rpartition(":")
    digest = digest.lower()
    if not algorithm:
        algorithm = {32: "md5", 64: "sha256"}.get(len(digest), "")
    if algorithm not in ("md5", "sha256") or not digest or any(c not in "0123456789abcdef" for c in digest):
        raise KMLError(f"bad checksum {checksum!r}: expected md5:<32 hex digits> or sha256:<64 hex digits>")
    return algorithm, digest


def file_checksum(path: str | os.PathLike, algorithm: str = "md5") -> str:
    """``"<algorithm>:<hex>"`` of a file, read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return f"{algorithm}:{digest.hexdigest()}"


def verify(path: Path, expected: str | None, name: str | None = None) -> str:
    """Checksum ``path``; on a mismatch move it aside to ``<name>.bad`` and raise.

    ``name`` is the file's final name (default: its own). Returns the computed
    ``"<algorithm>:<hex>"`` (md5 when nothing is expected).
    """
    path = Path(path)
    algorithm, digest = parse_checksum(expected) if expected else ("md5", "")
    got = file_checksum(path, algorithm)
    if expected and got != f"{algorithm}:{digest}":
        bad = path.with_name((name or path.name) + ".bad")
        os.replace(path, bad)
        raise KMLError(
            f"checksum mismatch for {name or path.name}: expected {algorithm}:{digest}, got {got}; "
            f"the file was moved aside to {bad} and not used (delete it and rerun to download again)"
        )
    return got


def looks_like_html(path: str | os.PathLike) -> bool:
    """True for a web page saved under an archive's name (e.g. a file-sharing site's confirmation page)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(512).lstrip().lower()
    except OSError:
        return False
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml"))


def disk_full(error: OSError, what: str) -> KMLError:
    return KMLError(
        f"disk full while {what}: {error.strerror or error}; free some space and rerun "
        f"(a partial download resumes where it stopped)"
    )


def _write(handle, chunk: bytes) -> None:
    handle.write(chunk)


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, urllib.error.HTTPError):
        return error.code in TRANSIENT_HTTP
    if isinstance(error, urllib.error.URLError):
        if not isinstance(error.reason, BaseException):
            return False  # e.g. an unknown URL scheme
        error = error.reason
    if isinstance(error, (ConnectionRefusedError, socket.gaierror)):
        return False  # nothing listens there / no such host: try the next mirror at once
    return isinstance(error, (_Transient, http.client.IncompleteRead, http.client.RemoteDisconnected, ConnectionError))


def _is_stall(error: BaseException) -> bool:
    """No progress within the timeout: retrying the same silent or trickling mirror would only wait again."""
    if isinstance(error, urllib.error.URLError) and isinstance(error.reason, BaseException):
        error = error.reason
    return isinstance(error, (_Stalled, TimeoutError, socket.timeout))


def _describe(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _download_once(url: str, part: Path, timeout: float, progress: bool, label: str) -> None:
    """One attempt: continue ``part`` from its current size (Range) or rewrite it."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # the part is stale or already whole: start over
            part.unlink()
            raise _Transient("range not satisfiable, restarting from zero") from None
        raise
    with response:
        resumed = offset > 0 and response.status == 206
        if resumed:
            start = response.headers.get("Content-Range", "").replace("bytes ", "").split("-")[0]
            if start.strip() != str(offset):
                part.unlink()
                raise _Transient(f"server resumed at byte {start!r}, not {offset}; restarting")
        else:
            offset = 0  # no range support: the whole body comes again
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        received = 0
        try:
            with (
                open(part, "ab" if resumed else "wb") as handle,
                tqdm(
                    total=total,
                    initial=offset,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=label,
                    disable=not progress,
                    leave=False,
                ) as bar,
            ):
                window_start, window_bytes = time.monotonic(), 0
                while True:
                    chunk = response.read1(CHUNK)  # what has arrived: read(CHUNK) would wait for a whole MiB
                    if not chunk:
                        break
                    _write(handle, chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                    window_bytes += len(chunk)
                    elapsed = time.monotonic() - window_start
                    if elapsed >= timeout:
                        if window_bytes < MIN_PROGRESS:
                            raise _Stalled(f"only {window_bytes} bytes in {elapsed:.0f} s")
                        window_start, window_bytes = time.monotonic(), 0
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise disk_full(error, f"downloading {part.name[:-5]} to {part.parent}") from None
            raise
        if total is not None and offset + received < total:
            raise _Transient(f"connection closed after {offset + received} of {total} bytes")


def download(
    urls: Sequence[str],
    target: Path,
    checksum: str | None = None,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> tuple[str, str]:
    """Download ``target`` from the first URL that works; verify; rename into place.

    ``timeout``: seconds within which the socket must answer and the download must receive at least
    ``MIN_PROGRESS`` bytes; a URL that does not is abandoned (not retried) for the next.
    Returns ``(url used, computed checksum)``. Raises :class:`DownloadFailed` when
    every URL fails, :class:`KMLError` on a checksum mismatch or a full disk.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    reasons = []
    for url in urls:
        for attempt in range(retries + 1):
            try:
                _download_once(url, part, timeout, progress, target.name)
            except KMLError:
                raise
            except OSError as error:
                if error.errno == errno.ENOSPC:
                    raise disk_full(error, f"downloading {target.name}") from None
                failure: BaseException = error
            except (_Transient, _Stalled, http.client.HTTPException) as error:
                failure = error
            else:
                got = verify(part, checksum, target.name)
                os.replace(part, target)  # atomic: the final name only ever holds a verified file
                return url, got
            if _is_stall(failure):
                detail = str(failure) if isinstance(failure, _Stalled) else f"silent for {timeout:g} s"
                reasons.append(
                    f"{url}: no progress ({detail}; a download must receive {MIN_PROGRESS // 1024} KiB "
                    f"every {timeout:g} s, raise --timeout for a slow connection)"
                )
                break
            if _is_transient(failure) and attempt < retries:
                time.sleep(backoff * 2**attempt)
                continue
            reasons.append(f"{url}: {_describe(failure)}")
            break
    raise DownloadFailed(reasons)
