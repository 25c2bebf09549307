"""Shared command-line plumbing: one-line argument errors, config files, advice worded as a kml-train command."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from kml.errors import KMLError
from kml.training.advice import ContinueRun

__all__ = [
    "ArgumentParser",
    "as_command",
    "continue_command",
    "continue_run_as_command",
    "json_object",
    "read_config_file",
]


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def json_object(text: str) -> dict[str, Any]:
    """An argparse type: a JSON object (``'{"num_classes": 5}'``), or a one-line error."""
    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object {{...}} of keyword arguments, got {text!r}")
    return value


def read_config_file(path: str) -> dict[str, Any]:
    """Flag values from a JSON or YAML file (keys are flag names, with - or _), numbers checked (kml.config.checks)."""
    from kml.config.checks import check_values

    file = Path(path)
    if not file.is_file():
        raise KMLError(f"config file {path} not found")
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise KMLError(f"config file {path} is not a text file; give a JSON or YAML file of flag values") from None
    except OSError as error:
        raise KMLError(f"cannot read config file {path}: {error.strerror or error}") from None
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml  # optional: only for YAML configs

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except ImportError:
        raise KMLError("YAML config files need pyyaml: pip install pyyaml (or use JSON)") from None
    except Exception as error:  # noqa: BLE001 - any parse error is the user's file
        raise KMLError(f"cannot parse config file {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict) or not all(isinstance(key, str) for key in values):
        raise KMLError(f"config file {path} must hold a mapping of flag names to values")
    values = {key.replace("-", "_"): value for key, value in values.items()}
    return check_values(values, where=f"config file {path}")


def continue_command(advice: ContinueRun) -> str:
    """The kml-train command that follows ``advice``: resume its run (from its checkpoint) with its changes,
    quoted so that it can be pasted into a shell."""
    words = ["kml-train", "--resume", "--train-dir", str(advice.run_dir.parent), "--run-name", advice.run_dir.name]
    if advice.checkpoint is not None:
        words += ["--resume-from", str(advice.checkpoint)]
    for name, value in advice.changes.items():
        words += [f"--{name.replace('_', '-')}", str(value)]
    return shlex.join(words)


def as_command(error: KMLError) -> KMLError:
    """``error``, its advice to continue a run (a :class:`ContinueRun`) said as a kml-train command."""
    return error.worded(continue_command(error)) if isinstance(error, ContinueRun) else error


@contextmanager
def continue_run_as_command() -> Iterator[None]:
    """Within this block, an error advising to continue a run says so as a kml-train command."""
    try:
        yield
    except ContinueRun as advice:
        raise as_command(advice) from None
