"""Checkpoints: written atomically, read with one-line errors that say what is wrong."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from kml.errors import KMLError

CHECKPOINT_FORMAT = "kml-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` via a temporary file and a rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, tmp)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise KMLError(f"could not write checkpoint {path}: {error.strerror or error}") from None
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise KMLError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise KMLError(f"checkpoint {path} is truncated or corrupt ({reason}); use another checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise KMLError(f"{path} is not a kml checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise KMLError(f"checkpoint {path} has version {state.get('version')}, this kml reads {CHECKPOINT_VERSION}")
    return state


def load_model_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` that names the parameters whose presence or shape does not match."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{name} {list(state_dict[name].shape)} vs {list(own[name].shape)}"
        for name in sorted(set(own) & set(state_dict))
        if own[name].shape != state_dict[name].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"shape mismatch (checkpoint vs model): {', '.join(shapes[:3])}{' ...' if len(shapes) > 3 else ''}")
        if missing:
            parts.append(f"missing: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected: {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        raise KMLError(f"checkpoint {source} does not fit this model: {'; '.join(parts)}")
    model.load_state_dict(state_dict)


def load_learner(path: str | os.PathLike, device: str) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """A checkpoint's learner, rebuilt from the checkpoint's own config: ``(learner, run_config, state)``."""
    from kml.algorithms import build_learner
    from kml.training.run_config import RunConfig

    state = load_checkpoint(path, device)
    config = RunConfig.from_dict(state["config"])
    learner = build_learner(config.learner).to(device)
    load_model_state(learner, state["model"], str(path))
    return learner, config, state
