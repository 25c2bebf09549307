"""The package version, in one place: ``pyproject.toml`` reads it as dynamic metadata."""

__all__ = ["__version__"]

__version__ = "0.3.0.dev0"
