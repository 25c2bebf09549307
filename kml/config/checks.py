"""Every setting a user types, checked in one place: flags, config files and saved configs alike.

Numbers are checked for type (an integer is not 2.5, a number is not the text "0.01"), finiteness
and range; a few string settings for their form (``--device``, ``--run-name``, output paths); and
combinations that mean nothing (``--first-order`` for ProtoNet) are refused. Every failure is a
:class:`KMLError` with one line that names the setting, as the user wrote it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from kml.errors import KMLError, setting

__all__ = [
    "check_bools",
    "check_device",
    "check_fields",
    "check_learner_combinations",
    "check_network",
    "check_number",
    "check_output_path",
    "check_run_combinations",
    "check_run_name",
    "check_values",
    "EVAL_NUMBERS",
    "flag",
    "inert_settings",
    "INNER_STEPS",
    "INT_1",
    "MAX_INNER_STEPS",
    "Number",
    "OPT_INT_1",
    "SEED",
    "TRAIN_NUMBERS",
    "TRANSFERENCE_NUMBERS",
]


@dataclass(frozen=True)
class Number:
    """The type and range of one numeric setting (``None`` allowed when ``optional``)."""

    kind: type  # int or float
    low: float | None = None
    above: bool = False  # True: value > low; False: value >= low
    optional: bool = False
    many: bool = False  # a list of such numbers (e.g. --weights)
    high: float | None = None  # value <= high

    def describe(self, plural: bool = False) -> str:
        if self.kind is int:
            what = "integers" if plural else "an integer"
        else:
            what = "finite numbers" if plural else "a finite number"
        if self.low is not None and self.high is not None:
            return f"{what} from {_show(self.low)} to {_show(self.high)}"
        if self.low is not None:
            what += f" {'>' if self.above else '>='} {_show(self.low)}"
        return what


def _show(value: float) -> str:
    """2**32 - 1 as 4294967295, 0.001 as 0.001, -5.0 as -5."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e16 else f"{value:g}"


INT_1 = Number(int, 1)
OPT_INT_1 = Number(int, 1, optional=True)
SEED = Number(int, 0, high=2**32 - 1)  # numpy's RandomState takes seeds below 2**32
# Inner steps run one after another, each holding its graph: 1e9 of them grew to 24 GB before anything was said.
MAX_INNER_STEPS = 1000
INNER_STEPS = Number(int, 0, high=MAX_INNER_STEPS)

# Settings of kml-train (RunConfig and LearnerConfig fields) and of the config files that hold them.
TRAIN_NUMBERS: dict[str, Number] = {
    "ways": Number(int, 2),
    "shots": INT_1,
    "queries": INT_1,
    "meta_batch": OPT_INT_1,
    "steps": OPT_INT_1,
    "lr": Number(float, 0, above=True),
    "lr_halve_every": INT_1,
    "seed": SEED,
    "image_size": Number(int, 16, optional=True),
    "val_every": OPT_INT_1,
    "val_episodes": OPT_INT_1,
    "checkpoint_every": OPT_INT_1,
    "keep_checkpoints": Number(int, 0, optional=True),
    "log_every": INT_1,
    "grad_clip": Number(float, 0, above=True, optional=True),
    "transference_every": Number(int, 0),
    "transference_batches": INT_1,
    "task_chunk": OPT_INT_1,
    "weights": Number(float, 0, optional=True, many=True),
    # learner
    "num_modes": INT_1,
    "in_channels": INT_1,
    "base_channels": INT_1,
    "encoder_channels": INT_1,
    "inner_steps": INNER_STEPS,
    "eval_inner_steps": INNER_STEPS,
    "inner_lr": Number(float, 0),
    "inner_grad_clip": Number(float, 0, above=True, optional=True),
    "inner_grad_clamp": Number(float, 0, above=True, optional=True),
    "encoder_hidden": OPT_INT_1,
    "mode_inner_lr": Number(float, 0, optional=True, many=True),
    "mode_inner_steps": Number(int, 0, optional=True, many=True, high=MAX_INNER_STEPS),
}
EVAL_NUMBERS: dict[str, Number] = {
    "episodes": INT_1,
    "seed": SEED,
    "inner_steps": Number(int, 0, optional=True, high=MAX_INNER_STEPS),
    "shots": OPT_INT_1,
    "queries": OPT_INT_1,
    "tasks_per_batch": INT_1,
    "ways": Number(int, 2, optional=True),
}
TRANSFERENCE_NUMBERS: dict[str, Number] = {
    "batches": INT_1,
    "meta_batch": Number(int, 2, optional=True),
    "rate": Number(float, 0, above=True, optional=True),
    "sources": INT_1,
    "targets": INT_1,
    "seed": SEED,
}


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def check_number(label: str, value: Any, spec: Number) -> Any:
    """``value`` converted to ``spec.kind`` (ints stay ints), or a one-line :class:`KMLError` naming ``label``."""
    if value is None:
        if spec.optional:
            return None
        raise KMLError(f"{label} must be {spec.describe()}, got nothing (null)")
    if spec.many:
        if not isinstance(value, (list, tuple)) or not value:
            raise KMLError(f"{label} must be a list of {spec.describe(plural=True)}, got {value!r}")
        single = Number(spec.kind, spec.low, spec.above, high=spec.high)
        return [check_number(label, item, single) for item in value]
    if isinstance(value, str):
        raise KMLError(
            f"{label} must be {spec.describe()}, got the text {value!r}; write it without quotes "
            f"(YAML reads 1e-3 as text: write 1.0e-3)"
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise KMLError(f"{label} must be {spec.describe()}, got {value!r}")
    if not math.isfinite(value):
        raise KMLError(f"{label} must be {spec.describe()}, got {value}")
    if spec.kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise KMLError(f"{label} must be {spec.describe()}, got {value}")
        value = int(value)
    else:
        value = float(value)
    if (spec.low is not None and (value <= spec.low if spec.above else value < spec.low)) or (
        spec.high is not None and value > spec.high
    ):
        raise KMLError(f"{label} must be {spec.describe()}, got {_show(value)}")
    return value


def check_values(
    values: Mapping[str, Any], specs: Mapping[str, Number] = TRAIN_NUMBERS, where: str | None = None
) -> dict[str, Any]:
    """``values`` with every known numeric setting checked and converted; unknown names pass through.

    ``where`` (e.g. ``"config file run.yaml"``) prefixes the message; without it settings are named as the caller
    wrote them (:func:`kml.errors.setting`: flags on a command line, keywords in Python).
    """
    checked = dict(values)
    for name, value in values.items():
        if name in specs:
            label = setting(name) if where is None else f"{where}: {name}"
            checked[name] = check_number(label, value, specs[name])
    return checked


def check_fields(obj: Any, specs: Mapping[str, Number] = TRAIN_NUMBERS, where: str | None = None) -> None:
    """Check a dataclass's numeric fields in place (RunConfig, LearnerConfig); ``where=None`` names them as the
    caller wrote them (flags on a command line, fields in Python)."""
    for name, spec in specs.items():
        if hasattr(obj, name):
            label = setting(name) if where is None else f"{where} {name}"
            setattr(obj, name, check_number(label, getattr(obj, name), spec))


def check_bools(obj: Any, names: tuple[str, ...], where: str | None = None) -> None:
    for name in names:
        if hasattr(obj, name) and not isinstance(getattr(obj, name), bool):
            label = setting(name) if where is None else f"{where} {name}"
            raise KMLError(f"{label} must be true or false, got {getattr(obj, name)!r}")


_DEVICE = re.compile(r"(auto|cpu|cuda(:\d+)?)")


def check_device(device: Any) -> str:
    """The form of ``--device``: auto, cpu, cuda or cuda:N (availability is checked where torch is loaded)."""
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise KMLError(f"unsupported {setting('device')} {device!r}; kml runs on auto, cpu, cuda or cuda:N")
    return device


def check_run_name(name: Any) -> str:
    """A run name must be one plain folder inside the train dir (``..``, ``.``, ``a/b`` or ``/x`` are refused)."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or name.startswith(".")
        or "/" in name
        or os.sep in name
        or (os.altsep and os.altsep in name)
        or "\0" in name
    ):
        raise KMLError(
            f"{setting('run_name')} {name!r} is not a plain folder name; use a name such as my-run "
            f"(no slashes, not starting with a dot): the run folder is <train-dir>/<run-name>"
        )
    return name


def check_output_path(path: str | os.PathLike, option: str = "--output") -> Path:
    """An output file's folder must exist and be writable, checked before the work that fills it."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise KMLError(f"{option} {path} is a folder; give a file name, e.g. {path / 'results.json'}")
    if not folder.is_dir():
        raise KMLError(f"{option} {path}: folder {folder} does not exist; create it first (mkdir -p {folder})")
    if not os.access(folder, os.W_OK):
        raise KMLError(f"{option} {path}: folder {folder} is not writable; choose another path")
    return path


def check_learner_combinations(learner: Any) -> None:
    """Refuse settings that do nothing for the chosen method (they would be recorded as if they did)."""
    if learner.algorithm == "protonet":
        # the MAML-only settings whose default is "off": a value given for ProtoNet would be recorded and ignored
        maml_only = [
            setting(name)
            for name, on in (
                ("first_order", learner.first_order),
                ("meta_sgd", learner.meta_sgd),
                ("inner_grad_clip", learner.inner_grad_clip is not None),
                ("inner_grad_clamp", learner.inner_grad_clamp is not None),
                ("mode_inner_lr", learner.mode_inner_lr is not None),
                ("mode_inner_steps", learner.mode_inner_steps is not None),
            )
            if on
        ]
        if maml_only:
            raise KMLError(
                f"{', '.join(maml_only)} only apply to MAML's inner loop, which {setting('algorithm', 'protonet')} "
                f"does not have; drop {'it' if len(maml_only) == 1 else 'them'}"
            )
    if getattr(learner, "released_query_modulation", False) and learner.encoder_uses_labels:
        raise KMLError(
            f"{setting('released_query_modulation')} encodes the query images, whose labels a task encoder may not "
            f"read: drop {setting('encoder_uses_labels')} (the released KML encoder reads no labels)"
        )
    if learner.modulation == "none" and learner.encoder_uses_labels:
        raise KMLError(
            f"{setting('encoder_uses_labels')} needs a task encoder; {setting('modulation', 'none')} has none: drop it "
            f"or pick {setting('modulation', 'kml')} or {setting('modulation', 'film')}"
        )


# Learner settings that act only for some methods, with what they need; "off" is the field's default.
_NEEDS = {
    "inner_steps": "MAML's inner loop",
    "eval_inner_steps": "MAML's inner loop",
    "inner_lr": "MAML's inner loop",
    "proto_refine": "ProtoNet's prototypes",
    "kml_form": "KML modulation",
    "factor_split": "KML modulation",
    "kml_bias": "KML modulation",
    "encoder_hidden": "a task encoder",
    "backbone": "kml's own networks, not a named network",
    "base_channels": "kml's own networks, not a named network",
    "head": "kml's own networks, not a named network",
    "batchnorm_affine": "kml's own networks, not a named network",
    "released_query_modulation": "ProtoNet with a task encoder",
    "released_refinement": "ProtoNet's refinement (proto_refine)",
}


def inert_settings(learner: Any) -> list[str]:
    """The learner settings that differ from their default yet do nothing for the learner's method."""
    defaults = {f.name: f.default for f in fields(learner)}
    acts = {
        "MAML's inner loop": learner.algorithm == "maml",
        "ProtoNet's prototypes": learner.algorithm == "protonet",
        "KML modulation": learner.modulation != "none",  # not refused with FiLM: 0.1 config files set both
        "a task encoder": learner.modulation != "none",
        "kml's own networks, not a named network": getattr(learner, "network", None) is None,
        "ProtoNet with a task encoder": learner.algorithm == "protonet" and learner.modulation != "none",
        "ProtoNet's refinement (proto_refine)": learner.algorithm == "protonet" and learner.proto_refine,
    }
    return [name for name, need in _NEEDS.items() if not acts[need] and getattr(learner, name) != defaults[name]]


def check_run_combinations(config: Any, new_run: bool = True) -> None:
    """Combinations of run and learner settings that mean nothing (``new_run=False``: a recorded run resuming, whose
    settings without effect were accepted by an earlier kml and must not stop it)."""
    check_learner_combinations(config.learner)
    if new_run and config.recipe_overrides and not config.recipe:
        raise KMLError(
            f"{setting('recipe_overrides')} lists what a run changed of its {setting('recipe')}, and there is no "
            f"recipe: drop it (kml-train records it)"
        )
    # checked per run, not per LearnerConfig: one dict of settings may build every method, and saved runs must load
    inert = inert_settings(config.learner) if new_run else []
    # a recipe's own values stay (maml@1 keeps MMAML's encoder_hidden: the recipe is frozen)
    if inert and config.recipe:
        from kml.config.recipes import recipe

        own, changed = recipe(config.recipe).settings, config.recipe_overrides or []
        inert = [name for name in inert if name not in own or name in changed]
    if inert:
        named = {name: _as_given(config.learner, name) for name in inert}
        raise KMLError(
            f"{', '.join(named.values())} {'has' if len(inert) == 1 else 'have'} no effect for "
            f"{config.learner.method} ({'; '.join(f'{named[name]} needs {_NEEDS[name]}' for name in inert)}): "
            f"drop {'it' if len(inert) == 1 else 'them'}"
        )
    if getattr(config, "activation_checkpointing", False) and config.learner.algorithm == "protonet":
        raise KMLError(
            f"{setting('activation_checkpointing')} only applies to MAML's inner loop; drop it for "
            f"{setting('algorithm', 'protonet')}"
        )
    if getattr(config, "activation_checkpointing", False) and config.learner.backbone == "resnet12":
        raise KMLError(
            f"{setting('activation_checkpointing')} works on the packed path of the 4-block backbones; ResNet-12 runs "
            f"the vmap path: use {setting('task_chunk')} to bound memory instead"
        )
    if getattr(config, "released_lr_timing", False) and config.lr_schedule != "halve":
        raise KMLError(
            f"{setting('released_lr_timing')} moves the halvings of {setting('lr_schedule', 'halve')}; "
            f"{setting('lr_schedule', config.lr_schedule)} has none: drop it"
        )
    weights = setting("weights")
    if config.weights is not None and config.policy == "alternate":
        raise KMLError(
            f"{weights} is not used by {setting('policy', 'alternate')}; drop it or use {setting('policy')} mixed, "
            f"random or per-batch"
        )
    if config.weights is not None and len(config.weights) != len(config.modes):
        raise KMLError(
            f"{weights} needs one weight per mode ({len(config.modes)}: {' '.join(config.modes)}), "
            f"got {len(config.weights)}"
        )
    if config.weights is not None and sum(config.weights) <= 0:
        raise KMLError(f"{weights} must not all be 0")


def _as_given(learner: Any, name: str) -> str:
    """A setting as the caller wrote it; a switch turned off as ``--no-proto-refine`` or ``proto_refine=False``."""
    if getattr(learner, name) is not False:
        return setting(name)
    return setting(f"no_{name}") if setting(name).startswith("--") else setting(name, False)


def check_network(network: Any, network_args: Any) -> None:
    """A network import path has the form ``package.module:name`` and its arguments are a JSON object."""
    if network is None:
        if network_args is not None:
            raise KMLError(f"{setting('network_args')} given without {setting('network')}; name the network too")
        return
    if not isinstance(network, str) or not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", network):
        raise KMLError(
            f"{setting('network')} must be an import path 'package.module:name' (e.g. my_pkg.nets:ResNet18), "
            f"got {network!r}"
        )
    if network_args is not None:
        import json

        if not isinstance(network_args, dict) or not all(isinstance(k, str) for k in network_args):
            raise KMLError(
                f"{setting('network_args')} must be a JSON object of keyword arguments, got {network_args!r}"
            )
        try:
            json.dumps(network_args)
        except (TypeError, ValueError):
            raise KMLError(
                f"{setting('network_args')} must hold JSON values only (numbers, text, lists, objects)"
            ) from None
