"""Finding a run's transference table and checkpoints from any working directory (notebooks, scripts, the CLI).

A run is named by an argument or an environment variable (``KML_RUN_DIR``); a relative name is looked up from
the working directory, then from the repository root (the nearest folder above it holding ``pyproject.toml``,
then the checkout kml is installed from, for an editable install), so
``jupyter execute notebooks/transference.ipynb`` from the root and a notebook started inside ``notebooks/`` find
the same ``train_dir/<run>``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from kml.errors import KMLError

__all__ = ["RUN_VARIABLE", "find_run", "repository_root", "run_checkpoints"]

RUN_VARIABLE = "KML_RUN_DIR"
_STEP_FILE = re.compile(r"step_(\d+)\.pt")


def repository_root(start: str | os.PathLike | None = None) -> Path | None:
    """The nearest folder at or above ``start`` (default: the working directory) holding ``pyproject.toml``."""
    here = Path(start or Path.cwd()).resolve()
    return next((p for p in (here, *here.parents) if (p / "pyproject.toml").is_file()), None)


def _newest_run(folder: Path, table: str) -> Path | None:
    """The run inside ``folder`` (a train_dir) whose ``table`` changed last."""
    tables = list(folder.glob(f"*/{table}"))
    return max(tables, key=lambda p: p.stat().st_mtime).parent if tables else None


def find_run(
    run: str | os.PathLike | None = None,
    variable: str = RUN_VARIABLE,
    default: str = "train_dir",
    table: str = "transference.csv",
) -> Path:
    """The run folder (or table file) named by ``run``, else by ``$variable``, else ``default``.

    A relative path is tried from the working directory, then from the repository root (above the working
    directory, then kml's own checkout). A folder holding
    ``table`` (or a file) is the answer; a folder of runs (a ``train_dir``) gives its run whose ``table`` is newest.
    """
    name = str(run) if run else os.environ.get(variable) or default
    path = Path(name).expanduser()
    # the root above the working directory, then the one kml is installed from (an editable install's checkout)
    roots = [r for r in (repository_root(), repository_root(Path(__file__).parent)) if r is not None]
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, *(root / path for root in roots)]
    for candidate in dict.fromkeys(candidates):
        if candidate.is_file() or (candidate / table).is_file():
            return candidate
        if candidate.is_dir() and (newest := _newest_run(candidate, table)) is not None:
            return newest
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise KMLError(
        f"no run with {table} at {name} (tried {tried}); set {variable} to a run folder, absolute or relative to "
        f"the repository root, e.g. {variable}=train_dir/<run>"
    )


def run_checkpoints(run_dir: str | os.PathLike, steps: list[int] | None = None) -> list[tuple[int, Path]]:
    """``(step, path)`` of a run's step checkpoints (``checkpoints/step_NNNNNN.pt``, and ``last.pt`` when its step
    has none), in step order; ``steps`` picks some of them (a step without a checkpoint is a one-line error)."""
    from kml.training.checkpoint import checkpoint_step, load_checkpoint  # torch loads only here

    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        raise KMLError(f"{run_dir} holds no checkpoints folder; give a run folder written by kml-train")
    found = {int(m.group(1)): p for p in folder.iterdir() if (m := _STEP_FILE.fullmatch(p.name))}
    last = folder / "last.pt"
    if last.is_file() and (steps is None or set(steps) - set(found)):
        found.setdefault(checkpoint_step(load_checkpoint(last), last), last)
    if steps is not None:
        missing = sorted(set(steps) - set(found))
        if missing:
            raise KMLError(
                f"{run_dir} has no checkpoint of step {', '.join(map(str, missing))}; "
                f"it has steps {', '.join(map(str, sorted(found))) or 'none'}"
            )
        found = {s: found[s] for s in steps}
    if not found:
        raise KMLError(f"{folder} holds no checkpoints (step_NNNNNN.pt or last.pt)")
    return sorted(found.items())
