"""Named, versioned recipes: each published method as intended and as released, and kml's own choices.

A recipe is a frozen preset of ``kml-train`` flag values (the fields of
:class:`~kml.config.run.RunConfig` and :class:`~kml.config.LearnerConfig`).
``kml-train --recipe NAME`` starts from it; a config file and flags given on the
command line override it value by value, and the run folder's ``config.json``
records ``recipe`` (``name@version``) and ``recipe_overrides`` (the recipe values
that were changed). A recipe never changes once published: a correction is a new
version, so a recorded ``mmaml@1`` always means the same settings.

Facts the published recipes follow (DESIGN.md section 3, the released code):

* MMAML (shaohua0116/MMAML-Classification): backbone 4 x [conv 3x3 stride 2 -> BatchNorm(affine=False)
  -> FiLM -> ReLU], spatial mean, ``Linear(8C, N)`` (Xavier, zero bias); task encoder 4 conv blocks ->
  per-image mean -> ``Linear(8E, 128)`` + ReLU -> mean over the set -> ``Linear(128, 2C_l)`` per block
  (PyTorch default initialisation); inner loop 5 steps at 0.05, every gradient element clamped to
  +-20, second order; 600000 tasks / meta-batch 10 = 60000 steps at a constant Adam 1e-3
  (20-way: 400000 / 5 = 80000 steps); MAML is the same network without the encoder.
* Multi-MAML (MMAML README): one run per dataset; Omniglot 0.4 and 1 step (20-way: 0.1, 5 steps),
  the others 0.01 and 5 steps at meta-batch 4 for 80000 steps.
* Released KML (sutd-visual-computing-group/KML-Classification): ProtoNet on the backbone with affine
  BatchNorm and flattened features; encoder as MMAML's, then 12 ``Linear(128, d)`` giving ``(v, u, db)``
  per conv; ``W' = W * outer(v, u).view(W.shape)``, ``b' = b + db``; Adam 1e-3 halved every 10000 steps,
  30000 steps of 10 tasks; transductive prototype refinement. Its ProtoNet (``--vanilla-model``) is
  ``scripts/models/conv_net.py``'s ``ConvModel``: the same backbone (affine BatchNorm, flattened features,
  Xavier-uniform kernels, zero biases) without modulation.

The plain recipes keep kml's fixes; the ``-as-released`` recipes turn on every quirk of the released code, each a
named switch (:data:`kml.config.run.RELEASED_QUIRKS`) recorded in ``config.json``, so a run per switch measures
each fix: ``released_query_modulation`` (KML's query pass encoded from the query images),
``released_refinement`` (the refinement drops each class's last support image and pairs blocks by position),
``released_sampling`` (meta-batch tasks picked with replacement), ``released_lr_timing`` (KML's halving one step
early) and ``released_checkpoint`` (the final checkpoint holds steps - 1 updates). kml's refinement fix applies to
every ProtoNet recipe (``protonet``, ``multi-protonet``, ``mprotonet`` too).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from kml.errors import KMLError

__all__ = ["Recipe", "recipe", "recipe_values", "RECIPES"]

# MMAML's MAML-family network and inner loop (shared by mmaml, maml, multi-maml).
_MMAML_NETWORK: dict[str, Any] = {
    "algorithm": "maml",
    "backbone": "published",
    "base_channels": 32,
    "head": "avgpool",
    "batchnorm_affine": False,
    "inner_steps": 5,
    "eval_inner_steps": 5,
    "inner_lr": 0.05,
    "first_order": False,
    "meta_sgd": False,
    "inner_grad_clip": None,
    "inner_grad_clamp": 20.0,
    "encoder_channels": 32,
    "encoder_hidden": 128,
    "encoder_uses_labels": False,
    "init": "pytorch",
    "identity_init": False,
    "multi_maml": False,
}
# MMAML's optimisation: 600000 tasks / meta-batch 10 at a constant Adam 1e-3.
_MMAML_SCHEDULE: dict[str, Any] = {
    "queries": 15,
    "meta_batch": 10,
    "steps": 60000,
    "lr": 1e-3,
    "lr_schedule": "constant",
    "policy": "mixed",
}
# 20-way: 400000 tasks / meta-batch 5.
_MMAML_20WAY: dict[str, Any] = {"meta_batch": 5, "steps": 80000}

# The released KML code's optimisation (its main.py defaults), which kml's own recipes keep.
_KML_SCHEDULE: dict[str, Any] = {
    "queries": 15,
    "meta_batch": 10,
    "steps": 30000,
    "lr": 1e-3,
    "lr_schedule": "halve",
    "lr_halve_every": 10000,
    "policy": "mixed",
}

# The released KML code's network and optimisation (its main.py defaults).
_KML_RELEASED: dict[str, Any] = {
    "algorithm": "protonet",
    "backbone": "published",
    "base_channels": 32,
    "head": "flatten",
    "batchnorm_affine": True,
    "encoder_channels": 32,
    "encoder_hidden": 128,
    "encoder_uses_labels": False,
    "init": "pytorch",
    "identity_init": False,
    "proto_refine": True,
    "multi_maml": False,
    **_KML_SCHEDULE,
}

# The released training loops' quirks (kml's fixes are the defaults): with-replacement meta-batch picks and the final
# checkpoint saved before the last update (both released codes); the KML code also halves its rate one step early.
_RELEASED_LOOP: dict[str, Any] = {"released_sampling": True, "released_checkpoint": True}
_KML_RELEASED_LOOP: dict[str, Any] = {**_RELEASED_LOOP, "released_lr_timing": True}
# The released KML ProtoNet's quirks: its refinement (drop-last, by position) and, with KML, the query-pass encoding.
_KML_RELEASED_PROTONET: dict[str, Any] = {**_KML_RELEASED_LOOP, "released_refinement": True}

# kml's own defaults, written out so that a later change of a default does not change the recipe.
_KML_OWN: dict[str, Any] = {
    "backbone": "published",
    "base_channels": 32,
    "head": "flatten",
    "batchnorm_affine": True,
    "encoder_channels": 32,
    "encoder_hidden": None,
    "encoder_uses_labels": False,
    "init": "kml",
    "identity_init": True,
    "kml_form": "residual",
    "factor_split": "plain",
    "multi_maml": False,
    **_KML_SCHEDULE,
}


@dataclass(frozen=True)
class Recipe:
    """A frozen preset of ``kml-train`` values.

    Attributes:
        name, version: recorded as ``name@version`` in the run's config.
        summary: one line for ``--help`` and the README.
        settings: flag values (RunConfig and LearnerConfig field names).
        by_ways: extra values for a number of ways (MMAML's 20-way runs use another meta-batch and length).
        mode_inner: per-mode ``(inner_lr, inner_steps)`` by mode name, ``"*"`` for the others, and by ways
            (``{ways: {mode: (lr, steps)}}``, ``0`` for any N); filled into ``mode_inner_lr/steps``.
        tasks_per_mode: meta-batch as this many tasks per mode (``meta_batch = tasks_per_mode * modes``).
        published: what the recipe reproduces (``None`` for kml's own recipes).
    """

    name: str
    version: int
    summary: str
    settings: Mapping[str, Any]
    by_ways: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    mode_inner: Mapping[int, Mapping[str, tuple[float, int]]] = field(default_factory=dict)
    tasks_per_mode: int | None = None
    published: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))

    @property
    def tag(self) -> str:
        return f"{self.name}@{self.version}"


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            "mmaml",
            1,
            "MMAML (FiLM), its released network and schedule: avg-pooled head, non-affine BatchNorm, clamp 20, 60000 "
            "constant-lr steps (kml's sampling and checkpoint; mmaml-as-released: the released ones)",
            {**_MMAML_NETWORK, **_MMAML_SCHEDULE, "modulation": "film"},
            by_ways={20: _MMAML_20WAY},
            published="MMAML (Vuorio et al. 2019), shaohua0116/MMAML-Classification, --mmaml-model True",
        ),
        Recipe(
            "maml",
            1,
            "MMAML's MAML baseline: its network without the task encoder",
            {**_MMAML_NETWORK, **_MMAML_SCHEDULE, "modulation": "none"},
            by_ways={20: _MMAML_20WAY},
            published="MMAML's MAML baseline, shaohua0116/MMAML-Classification, --maml-model True",
        ),
        Recipe(
            "multi-maml",
            1,
            "MMAML's Multi-MAML: one MAML per mode with its published rates (Omniglot 0.4 x 1 step)",
            {
                **{k: v for k, v in _MMAML_SCHEDULE.items() if k != "meta_batch"},  # meta-batch: 4 per mode
                **_MMAML_NETWORK,
                "modulation": "none",
                "multi_maml": True,
                "steps": 80000,
            },
            mode_inner={5: {"omniglot": (0.4, 1), "*": (0.01, 5)}, 20: {"omniglot": (0.1, 5), "*": (0.01, 5)}},
            tasks_per_mode=4,
            published="MMAML README's Multi-MAML commands (one run per dataset)",
        ),
        Recipe(
            "kml-protonet-released",
            1,
            "the released KML code (ProtoNet + bare KML, its factor split) with kml's fixes (kml-protonet-as-released: "
            "without them)",
            {**_KML_RELEASED, "modulation": "kml", "kml_form": "bare", "factor_split": "published"},
            published="KML (Abdollahzadeh et al. 2021), sutd-visual-computing-group/KML-Classification",
        ),
        Recipe(
            "protonet",
            1,
            "the KML paper's ProtoNet row: the released KML code's --vanilla-model (ConvModel), kml's refinement",
            {**_KML_RELEASED, "modulation": "none"},
            # the recipe's values match scripts/models/conv_net.py's ConvModel (affine BatchNorm, flattened features,
            # Xavier-uniform kernels, zero biases): this text once said that file was missing; the values never changed
            published="KML paper, ProtoNet row: released KML code's --vanilla-model (scripts/models/conv_net.py ConvModel)",
        ),
        Recipe(
            "multi-protonet",
            1,
            "the KML paper's Multi-ProtoNet row: one ProtoNet per mode, told the mode",
            {**_KML_RELEASED, "modulation": "none", "multi_maml": True},
            published="KML paper, Multi-ProtoNet row (no released code)",
        ),
        Recipe(
            "mprotonet",
            1,
            "the KML paper's MProtoNet row: ProtoNet with MMAML's FiLM encoder and generators",
            {**_KML_RELEASED, "modulation": "film", "batchnorm_affine": False},
            published="KML paper, MProtoNet (FiLM) row (no released code; MMAML's FiLM network assumed)",
        ),
        Recipe(
            "mmaml-as-released",
            1,
            "mmaml with the released training loop's quirks: with-replacement task picks, final checkpoint before "
            "the last update",
            {**_MMAML_NETWORK, **_MMAML_SCHEDULE, "modulation": "film", **_RELEASED_LOOP},
            by_ways={20: _MMAML_20WAY},
            published="MMAML as its released code ran, quirks included (shaohua0116/MMAML-Classification)",
        ),
        Recipe(
            "maml-as-released",
            1,
            "maml with the released training loop's quirks (with-replacement task picks, checkpoint before the last update)",
            {**_MMAML_NETWORK, **_MMAML_SCHEDULE, "modulation": "none", **_RELEASED_LOOP},
            by_ways={20: _MMAML_20WAY},
            published="MMAML's MAML baseline as its released code ran, quirks included",
        ),
        Recipe(
            "multi-maml-as-released",
            1,
            "multi-maml with the released quirks: each mode's 4 tasks picked with replacement among 4, as a separate "
            "released run picks; checkpoint before the last update",
            {
                **{k: v for k, v in _MMAML_SCHEDULE.items() if k != "meta_batch"},
                **_MMAML_NETWORK,
                "modulation": "none",
                "multi_maml": True,
                "steps": 80000,
                **_RELEASED_LOOP,
            },
            mode_inner={5: {"omniglot": (0.4, 1), "*": (0.01, 5)}, 20: {"omniglot": (0.1, 5), "*": (0.01, 5)}},
            tasks_per_mode=4,
            published="MMAML README's Multi-MAML commands as the released code ran them, quirks included",
        ),
        Recipe(
            "kml-protonet-as-released",
            1,
            "the released KML code as its authors ran it: kml-protonet-released with every released quirk "
            "(query-pass modulation, refinement, sampling, rate timing, checkpoint)",
            {
                **_KML_RELEASED,
                "modulation": "kml",
                "kml_form": "bare",
                "factor_split": "published",
                **_KML_RELEASED_PROTONET,
                "released_query_modulation": True,
            },
            published="KML (Abdollahzadeh et al. 2021) as its released code ran, quirks included",
        ),
        Recipe(
            "protonet-as-released",
            1,
            "protonet as the released KML code's --vanilla-model ran: its refinement, sampling, rate timing, checkpoint",
            {**_KML_RELEASED, "modulation": "none", **_KML_RELEASED_PROTONET},
            published="KML paper, ProtoNet row, as the released code's --vanilla-model ran (scripts/models/conv_net.py)",
        ),
        Recipe(
            "kml-maml",
            1,
            "kml's KML + MAML: residual KML from the identity, kml's network and schedule",
            {
                **_KML_OWN,
                "algorithm": "maml",
                "modulation": "kml",
                "inner_steps": 5,
                "eval_inner_steps": 5,
                "inner_lr": 0.05,
                "first_order": False,
                "meta_sgd": False,
                "inner_grad_clip": None,
                "inner_grad_clamp": None,
            },
        ),
        Recipe(
            "kml-protonet",
            1,
            "kml's KML + ProtoNet: residual KML from the identity, corrected refinement",
            {**_KML_OWN, "algorithm": "protonet", "modulation": "kml", "proto_refine": True},
        ),
    )
}


def recipe(name: str) -> Recipe:
    """The recipe called ``name`` or ``name@version`` (as a run's config records it); a one-line
    :class:`KMLError` names the known ones otherwise, or the version this kml holds."""
    base, _, version = str(name).partition("@")
    if base not in RECIPES:
        raise KMLError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    found = RECIPES[base]
    if version and version != str(found.version):
        raise KMLError(f"recipe {name} is not in this kml, which holds {found.tag}; use a kml version that has it")
    return found


def recipe_values(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """Flag values of recipe ``name`` overridden by ``given`` (config file and command line).

    Adds ``recipe`` (``name@version``) and ``recipe_overrides`` (recipe keys whose value ``given`` changes).
    Values that depend on the run (20-way settings, per-mode rates, per-mode meta-batch) are resolved from
    ``given``'s ``ways`` and ``modes``.
    """
    from kml.data.modes import expand_modes

    chosen = recipe(name)
    ways = int(given.get("ways", 5))
    values = {**chosen.settings, **chosen.by_ways.get(ways, {})}
    modes = expand_modes(given.get("modes", ["synthetic"]))
    if chosen.tasks_per_mode is not None:
        values["meta_batch"] = chosen.tasks_per_mode * len(modes)
    if chosen.mode_inner:
        table = chosen.mode_inner.get(ways, chosen.mode_inner.get(5, {}))
        pairs = [table.get(mode, table["*"]) for mode in modes]
        # a rate or step count given for the run replaces the per-mode ones (one value for every mode)
        if "inner_lr" not in given:
            values["mode_inner_lr"] = [lr for lr, _ in pairs]
        if "inner_steps" not in given and "eval_inner_steps" not in given:
            values["mode_inner_steps"] = [steps for _, steps in pairs]
    overrides = sorted(key for key, value in given.items() if key in values and value != values[key])
    return {**values, **given, "recipe": chosen.tag, "recipe_overrides": overrides}
