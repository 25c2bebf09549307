"""User-facing errors.

Everything a user can cause (a bad mode name, a missing cache, a corrupt
checkpoint) raises :class:`KMLError` with a one-line message that says what is
wrong and how to fix it. Command-line entry points print that line and exit
with status 2 instead of showing a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import wraps
from typing import Any, TypeVar

__all__ = ["exit_on_kml_error", "F", "KMLError", "named_as_flags", "setting"]

F = TypeVar("F", bound=Callable[..., int | None])


class KMLError(Exception):
    """An error caused by the user's input or environment, with a one-line fix."""


# True inside a command line: messages name settings as its flags; in Python, as the fields and keywords given.
_FLAG_NAMES: ContextVar[bool] = ContextVar("kml_flag_names", default=False)


@contextmanager
def named_as_flags() -> Iterator[None]:
    """Within this block, error messages name settings as command-line flags (``--inner-lr``)."""
    token = _FLAG_NAMES.set(True)
    try:
        yield
    finally:
        _FLAG_NAMES.reset(token)


def setting(name: str, value: Any = ...) -> str:
    """How a message names setting ``name`` (with ``value`` if given): ``--inner-lr 0.1`` on a command line,
    ``inner_lr=0.1`` in Python, where the caller wrote a field or keyword."""
    if _FLAG_NAMES.get():
        text = f"--{name.replace('_', '-')}"
        return text if value is ... else f"{text} {value}"
    return name if value is ... else f"{name}={value!r}"


def exit_on_kml_error(main: F) -> F:
    """Decorate a command-line ``main`` so a :class:`KMLError` prints one line and exits 2 (and messages name
    settings as flags)."""

    @wraps(main)
    def wrapper(*args, **kwargs):
        try:
            with named_as_flags():
                return main(*args, **kwargs)
        except KMLError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]
