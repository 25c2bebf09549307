"""User-facing errors.

Everything a user can cause (a bad mode name, a missing cache, a corrupt
checkpoint) raises :class:`KMLError` with a one-line message that says what is
wrong and how to fix it. Command-line entry points print that line and exit
with status 2 instead of showing a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import TypeVar

__all__ = ["exit_on_kml_error", "F", "KMLError"]

F = TypeVar("F", bound=Callable[..., int | None])


class KMLError(Exception):
    """An error caused by the user's input or environment, with a one-line fix."""


def exit_on_kml_error(main: F) -> F:
    """Decorate a command-line ``main`` so a :class:`KMLError` prints one line and exits 2."""

    @wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except KMLError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]
