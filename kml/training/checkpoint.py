"""Checkpoints: written atomically, read with one-line errors that say what is wrong."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch.torch_version import TorchVersion

from kml.errors import KMLError
from kml.files import resume_words

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "checkpoint_step",
    "convert_checkpoint",
    "load_checkpoint",
    "load_learner",
    "load_model_state",
    "remove_stale_temp_files",
    "save_checkpoint",
    "TEMP_PATTERN",
    "tensor_checksum",
]

CHECKPOINT_FORMAT = "kml-checkpoint"
CHECKPOINT_VERSION = 1


TEMP_PATTERN = ".*.tmp-*"  # save_checkpoint's temporary files: .<name>.tmp-<pid>


def tensor_checksum(state: Any) -> str:
    """A digest of every tensor's dtype, shape and bytes and every plain value in ``state``, in order.

    Zip CRCs are not checked by ``torch.load``, so flipped bytes inside tensor data would load as
    wrong numbers; this digest, stored in the checkpoint, makes them a load error instead.
    """
    digest = hashlib.blake2b(digest_size=16)

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"T{tensor.dtype}{list(tensor.shape)}".encode())
            if tensor.numel():
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(value, dict):
            digest.update(b"{")
            for key, item in value.items():
                digest.update(repr(key).encode())
                visit(item)
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                visit(item)
            digest.update(b"]")
        else:
            digest.update(repr(value).encode())

    visit(state)
    return f"blake2b:{digest.hexdigest()}"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` via a temporary file and a rename, so a crash never leaves half a file.

    Any failure (a full disk is an OSError or, from torch's zip writer, a RuntimeError) removes the
    temporary file, keeps the previous ``path`` and is one :class:`KMLError` line.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state, "checksum": tensor_checksum(state)},
            tmp,
        )
        with open(tmp, "rb") as handle:  # on disk before the rename makes it the checkpoint
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        written = tmp.stat().st_size if tmp.is_file() else 0
        tmp.unlink(missing_ok=True)
        reason = (error.strerror if isinstance(error, OSError) else None) or str(error).splitlines()[0]
        if isinstance(error, RuntimeError) and _disk_nearly_full(path.parent, max(written, _size(path))):
            reason = f"no space left on device; torch: {reason}"  # torch's zip writer reports a full disk cryptically
        kept = f"the previous {path.name} is unchanged" if path.is_file() else "no checkpoint was written"
        raise KMLError(
            f"could not write checkpoint {path} ({reason}); {kept}; free space on {path.parent} (df -h {path.parent}) "
            f"and continue with {resume_words()}"
        ) from None
    return path


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _disk_nearly_full(folder: Path, needed: int) -> bool:
    try:
        return shutil.disk_usage(folder).free < max(needed, 1 << 20)
    except OSError:
        return False


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary checkpoint files left by a killed writer; call only while holding the run's lock."""
    removed = []
    for stale in Path(directory).glob(TEMP_PATTERN):
        try:
            stale.unlink()
            removed.append(stale)
        except OSError:
            pass  # tried again at the next start
    return removed


# What a damaged file raises from torch.load (zip, pickle and tensor-storage errors).
_READ_ERRORS = (
    RuntimeError,
    OSError,
    EOFError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    ValueError,
    AttributeError,
    KeyError,
    IndexError,
    TypeError,
    UnicodeDecodeError,
)


def _read(path: Path, map_location: str | torch.device, *, trusted: bool) -> Any:
    """``torch.load`` with one-line errors; only a ``trusted`` read may unpickle more than tensors and plain values."""
    try:
        # kml before 0.3 recorded torch.__version__ as a TorchVersion, a str subclass whose unpickling runs no code
        with torch.serialization.safe_globals([TorchVersion]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected pickle protocol")  # a stranger's file: the error says it all
            return torch.load(path, map_location=map_location, weights_only=not trusted)
    except _READ_ERRORS as error:
        text = str(error)
        if "Weights only load failed" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            if found:  # the pickle names a function or class: unpickling it would run that code
                raise KMLError(
                    f"checkpoint {path} needs code to load (it names {found[1]}), so kml refuses it: a kml checkpoint "
                    f"holds only tensors and plain values; if you trust its source, convert it once with "
                    f"kml-convert-checkpoint {path} NEW.pt --trust (convert_checkpoint(..., trust=True) in Python)"
                ) from None
            reason = text.split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
            raise KMLError(
                f"checkpoint {path} cannot be read as tensors and plain values ({reason}): it is corrupt, or needs "
                f"code to load; if you trust its source, convert it once with kml-convert-checkpoint {path} NEW.pt "
                f"--trust"
            ) from None
        reason = text.splitlines()[0] if text.strip() else type(error).__name__
        raise KMLError(f"checkpoint {path} is truncated or corrupt ({reason}); use another checkpoint") from None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, its tensors verified against its checksum.

    The file is read with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists, tuples and dicts
    only, so a checkpoint from anyone can be loaded without running its code. A file that needs more is refused
    in one line (:func:`convert_checkpoint` turns a trusted one into a loadable checkpoint).
    """
    path = Path(path)
    if not path.is_file():
        raise KMLError(f"checkpoint {path} not found")
    state = _read(path, map_location, trusted=False)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise KMLError(f"{path} is not a kml checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise KMLError(f"checkpoint {path} has version {state.get('version')}, this kml reads {CHECKPOINT_VERSION}")
    expected = state.pop("checksum", None)  # checkpoints written before checksums have none
    if expected is not None:
        content = {k: v for k, v in state.items() if k not in ("format", "version")}
        if tensor_checksum(content) != expected:
            raise KMLError(
                f"checkpoint {path} is corrupt (its contents do not match the checksum written with them); "
                f"{_another(path)}"
            )
    model = state.get("model")
    if isinstance(model, dict):
        broken = [
            name
            for name, value in model.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all()
        ]
        if broken:
            raise KMLError(
                f"checkpoint {path} holds non-finite parameters ({len(broken)} tensors, e.g. {broken[0]}); "
                f"{_another(path)}"
            )
    return state


def convert_checkpoint(source: str | os.PathLike, target: str | os.PathLike, *, trust: bool = False) -> Path:
    """Rewrite a trusted checkpoint that needs code to load as one :func:`load_checkpoint` reads.

    Only here does kml unpickle a file in full (``weights_only=False``), which runs any code the file holds:
    ``trust=True`` says its source is trusted. NumPy arrays and scalars become tensors and numbers, tuples and
    named tuples become tuples; anything else is refused in one line. The new file gets a fresh checksum.
    """
    source, target = Path(source), Path(target)
    if not trust:
        raise KMLError(
            f"converting {source} unpickles it in full, which runs any code it holds; convert only a checkpoint "
            f"whose source you trust, and say so with --trust (trust=True in Python)"
        )
    if not source.is_file():
        raise KMLError(f"checkpoint {source} not found")
    state = _read(source, "cpu", trusted=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise KMLError(f"{source} is not a kml checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise KMLError(f"checkpoint {source} has version {state.get('version')}, this kml reads {CHECKPOINT_VERSION}")
    content = {k: v for k, v in state.items() if k not in ("format", "version", "checksum")}
    if "checksum" in state and tensor_checksum(content) != state["checksum"]:
        raise KMLError(f"checkpoint {source} is corrupt (its contents do not match the checksum written with them)")
    save_checkpoint(target, _plain(content, "checkpoint"))
    load_checkpoint(target)  # the converted file reads back with weights_only=True
    return target


def _plain(value: Any, where: str) -> Any:
    """``value`` with only the types ``torch.load(weights_only=True)`` reads (``where`` names it in errors)."""
    import numpy as np

    if value is None or isinstance(value, (bool, torch.Tensor, torch.dtype)):
        return value
    # subclasses (TorchVersion, IntEnum) become the plain type
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bytes):
        return bytes(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {_plain(key, where): _plain(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(item, f"{where}[{index}]") for index, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise KMLError(
        f"cannot convert {where}: a {type(value).__module__}.{type(value).__qualname__} is not a tensor or plain value"
    )


def _another(path: Path) -> str:
    """Advice naming the newest other checkpoint beside ``path``."""
    others = sorted(p for p in path.parent.glob("step_*.pt") if p.name != path.name)
    return f"use another checkpoint, e.g. {others[-1]}" if others else "use another checkpoint"


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
            parts.append(
                f"shape mismatch (checkpoint vs model): {', '.join(shapes[:3])}{' ...' if len(shapes) > 3 else ''}"
            )
        if missing:
            parts.append(f"missing: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected: {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        raise KMLError(f"checkpoint {source} does not fit this model: {'; '.join(parts)}")
    model.load_state_dict(state_dict)


def checkpoint_step(state: dict[str, Any], path: str | os.PathLike) -> int:
    """The training step a checkpoint records, or a one-line :class:`KMLError`."""
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise KMLError(f"checkpoint {path} records no training step (got {step!r}); it is not one kml-train wrote")
    return step


def load_learner(path: str | os.PathLike, device: str) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """A checkpoint's learner, rebuilt from the checkpoint's own config: ``(learner, run_config, state)``.

    A checkpoint of a custom learner (a :class:`~kml.training.trainer.Trainer` run on a learner no config
    describes) cannot be rebuilt: a one-line :class:`KMLError` says how to load it in Python instead.
    """
    from kml.algorithms import build_learner
    from kml.config.run import RunConfig

    state = load_checkpoint(path, device)
    custom = state["config"].get("custom_learner") if isinstance(state.get("config"), dict) else None
    if custom:
        raise KMLError(
            f"checkpoint {path} holds a custom learner ({custom}), which kml's commands cannot rebuild from a config; "
            f"load it in Python: build the learner as for training, then "
            f"learner.load_state_dict(kml.training.checkpoint.load_checkpoint('{path}')['model']) and evaluate it with "
            f"kml.evaluation.evaluate(learner, stores, ways, shots, queries, episodes)"
        )
    config = RunConfig.from_dict(state["config"])
    learner = build_learner(config.learner).to(device)
    load_model_state(learner, state["model"], str(path))
    return learner, config, state
