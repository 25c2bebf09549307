"""Writing run files: atomic JSON and the one-line error for a file that could not be written."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from kml.errors import KMLError, setting

__all__ = ["continue_advice", "resume_words", "write_failure", "write_json"]


def resume_words() -> str:
    """How messages say "resume the run": kml-train's flag on a command line, the Trainer's keyword in Python."""
    return "--resume" if setting("resume").startswith("--") else "resume=True"


def continue_advice() -> str:
    """How a write-failure message ends mid-run."""
    return f"then continue the run with {resume_words()}"


def write_failure(path: str | os.PathLike, error: OSError, then: str = "then run the command again") -> KMLError:
    """The one line for a run file that could not be written: a full disk, a read-only folder, a name too long."""
    path = Path(path)
    if error.errno == errno.ENAMETOOLONG:
        return KMLError(
            f"{setting('run_name')} is too long for the file system (the {len(path.name.encode())}-byte file name "
            f"{path.name[:24]}...); choose a shorter one"
        )
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return KMLError(f"could not write {path} ({reason}); free space on {path.parent} (df -h {path.parent}), {then}")
    return KMLError(f"could not write {path} ({reason}); make {path.parent} writable, {then}")


def write_json(path: str | os.PathLike, values: dict[str, Any]) -> None:
    """Write ``values`` as JSON atomically; a failure (a full disk) is one :class:`KMLError` line."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w") as handle:
            handle.write(json.dumps(values, indent=2))
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename makes it the file
        os.replace(tmp, path)  # a kill mid-write leaves the old file or the new one, never half of one
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise write_failure(path, error) from None
