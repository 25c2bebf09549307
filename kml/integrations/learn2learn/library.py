"""Importing learn2learn: the one place that does, with a one-line error naming the install command."""

from __future__ import annotations

import contextlib
import io
import sys
from typing import Any

from kml.errors import KMLError

__all__ = ["INSTALL_COMMAND", "require_learn2learn"]

INSTALL_COMMAND = "python -m kml.integrations.install_learn2learn"


def require_learn2learn() -> Any:
    """Import and return the ``learn2learn`` module, or raise a :class:`KMLError` saying how to install it.

    ``import learn2learn`` imports gym, which prints a deprecation notice to stderr; the notice is
    swallowed (it concerns gym's reinforcement-learning users, not kml).
    """
    module = sys.modules.get("learn2learn")
    if module is not None:
        return module
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            import learn2learn  # absolute import: the third-party package, not this kml package
    except ImportError as error:
        raise KMLError(f"learn2learn is not importable ({error}); install it with: {INSTALL_COMMAND}") from None
    return learn2learn
