"""Shared command-line plumbing: one-line argument errors, config files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from kml.errors import KMLError

__all__ = ["ArgumentParser", "read_config_file"]


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


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
