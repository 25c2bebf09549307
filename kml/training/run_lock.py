"""One writer per run folder: an exclusive lock on ``<train-dir>/.<run>.lock``.

The lock is a POSIX ``flock`` on a file beside the run folder (not inside it, so that
``--overwrite`` can move the old folder aside while holding it). The kernel drops a
``flock`` when its process dies, even by ``kill -9``, so a lock file left by a crash is
stale by construction: the next run takes it and notes whose it was. The file holds the
holder's pid and host, only to name it in the error a second writer gets. The lock is taken on the run
folder's real path, so a symlink to a run (or to its train dir) locks the same file as the run itself.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from kml.errors import KMLError, setting
from kml.files import write_failure

__all__ = ["RunLock"]


class RunLock:
    """An exclusive lock on one run name in a train dir, held by the process that writes the run."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        real = Path(os.path.realpath(self.run_dir))  # a symlinked run folder or train dir: the real run's lock
        self.path = real.parent / f".{real.name}.lock"
        self.stale_holder: str | None = None  # "pid N on host" of a crashed holder whose lock we took over
        self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self) -> RunLock:
        """Take the lock or raise a one-line :class:`KMLError` naming the process that holds it."""
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise KMLError(f"cannot create the train dir {self.path.parent}: {error.strerror or error}") from None
        while True:
            try:
                handle = open(self.path, "a+")
            except OSError as error:
                raise write_failure(self.path, error) from None
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(handle)
                handle.close()
                raise KMLError(
                    f"run {self.run_dir} is in use by another kml process ({holder}); wait for it to finish, "
                    f"stop it (Ctrl-C, or kill {holder.split()[1] if holder.startswith('pid ') else '<pid>'}), "
                    f"or choose another {setting('run_name')}"
                ) from None
            try:  # a holder that released meanwhile unlinked the file we opened: lock the new one instead
                same = os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        previous = _holder(handle)
        if previous != "an unknown process":  # the file outlived its holder (a crash): the lock was stale
            self.stale_holder = previous
        self._handle = handle  # held from here: release() lets go of it
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()} {socket.gethostname()}\n")
            handle.flush()
        except OSError as error:
            self.release()
            raise write_failure(self.path, error) from None
        return self

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no one locks the old file) and let go."""
        if self._handle is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # an unremovable file is only stale; the next run takes it over
        try:
            self._handle.close()
        except OSError:
            pass  # a write a full disk refused is still buffered: nothing in it to keep
        self._handle = None

    def __del__(self) -> None:  # a Trainer dropped without fit(): closing the file releases the flock
        if self._handle is not None:
            self._handle.close()


def _holder(handle) -> str:
    """``pid N on HOST`` from a lock file's contents, for messages."""
    try:
        handle.seek(0)
        pid, host = handle.read().split()[:2]
        return f"pid {int(pid)} on {host}"
    except (ValueError, OSError):
        return "an unknown process"
