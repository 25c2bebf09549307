"""The learner's configuration: one dataclass that names the method.

It is saved with every checkpoint (``to_dict``) so that a checkpoint rebuilds
its own learner with :func:`kml.algorithms.build_learner`. How each paper
method maps onto it:

========================  =====================================================
method                    settings
========================  =====================================================
MAML                      ``algorithm="maml", modulation="none"``
Multi-MAML (oracle)       ``algorithm="maml", modulation="none", multi_maml=True``
MMAML (FiLM)              ``algorithm="maml", modulation="film"``
KML + MAML                ``algorithm="maml", modulation="kml"``
ProtoNet                  ``algorithm="protonet", modulation="none"``
Multi-ProtoNet            ``algorithm="protonet", modulation="none", multi_maml=True``
MProtoNet (FiLM)          ``algorithm="protonet", modulation="film"``
KML + ProtoNet (released) ``algorithm="protonet", modulation="kml", kml_form="bare", factor_split="published"``
                          plus its network and initialisation (see below)
========================  =====================================================

The published networks differ from kml's defaults in more than the method switch (head,
BatchNorm, encoder layer, initialisation, inner clamp): :mod:`kml.config.recipes` holds each published
method's complete settings (``kml-train --recipe NAME``), and the guide's Fidelity section
(docs/guide/methods.md) lists the known differences.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kml.config.checks import (
    TRAIN_NUMBERS,
    Number,
    check_bools,
    check_fields,
    check_learner_combinations,
    check_network,
)
from kml.errors import KMLError, setting

__all__ = [
    "ALGORITHMS",
    "BATCH_NORMS",
    "BACKBONES",
    "FACTOR_SPLITS",
    "FIELD_CHOICES",
    "HEADS",
    "INITS",
    "KML_BIASES",
    "KML_FORMS",
    "LEARNER_NUMBERS",
    "BOOL_FIELDS",
    "LearnerConfig",
    "MODULATIONS",
    "RENAMED_FIELDS",
    "upgrade_field_names",
]

ALGORITHMS = ("maml", "protonet")
MODULATIONS = ("kml", "film", "none")
BACKBONES = ("published", "conv4", "resnet12")
KML_FORMS = ("residual", "bare")
FACTOR_SPLITS = ("plain", "published")
HEADS = ("flatten", "avgpool")
INITS = ("kml", "pytorch")
KML_BIASES = ("conv", "after_norm")
BATCH_NORMS = ("transductive", "running")
# The allowed values of each string field (the CLIs build their choice lists from this).
FIELD_CHOICES = {
    "algorithm": ALGORITHMS,
    "modulation": MODULATIONS,
    "backbone": BACKBONES,
    "kml_form": KML_FORMS,
    "factor_split": FACTOR_SPLITS,
    "head": HEADS,
    "init": INITS,
    "kml_bias": KML_BIASES,
    "batch_norm": BATCH_NORMS,
}
# Fields renamed in 0.2, old name -> new name; the old ``modulation`` (form) is read before ``model`` takes its name.
# LearnerConfig's numeric fields: kml-train's rules, except that a learner always has an image size.
LEARNER_NUMBERS: dict[str, Number] = {**TRAIN_NUMBERS, "image_size": Number(int, 16)}
BOOL_FIELDS = (
    "multi_maml",
    "first_order",
    "meta_sgd",
    "encoder_uses_labels",
    "proto_refine",
    "identity_init",
    "batchnorm_affine",
    "released_query_modulation",
    "released_refinement",
)

# MAML's inner-loop settings at "off": what a saved ProtoNet config holds of them is read as this.
_MAML_ONLY_OFF: dict[str, Any] = {
    "first_order": False,
    "meta_sgd": False,
    "inner_grad_clip": None,
    "inner_grad_clamp": None,
    "mode_inner_lr": None,
    "mode_inner_steps": None,
}

RENAMED_FIELDS = {"modulation": "kml_form", "model": "modulation"}


@dataclass
class LearnerConfig:
    """Everything needed to build a meta-learner (see the module docstring for the method table).

    Attributes:
        algorithm: ``"maml"`` (inner loop + linear head) or ``"protonet"`` (prototypes, no inner loop).
        modulation: the kind of task modulation: ``"kml"`` (Kernel ModuLation), ``"film"`` (MMAML) or ``"none"``
            (named ``model`` in checkpoints before 0.2; those still load).
        multi_maml: one set of meta-parameters per mode, picked by ``episode.mode`` (oracle baseline).
        num_modes: number of parameter sets when ``multi_maml`` (the modes of the run).
        ways: N, the classes per task (size of the MAML head).
        in_channels, image_size: input images ``[in_channels, image_size, image_size]``.
        base_channels: C; the published backbone uses C, 2C, 4C, 8C, the ``conv4`` one C in every block,
            ``resnet12`` 2C, 5C, 10C, 20C (64-160-320-640 at the default C = 32).
        backbone: ``"published"`` (3x3 stride-2 convs, no pooling), ``"conv4"`` (stride 1 + 2x2 max-pool) or
            ``"resnet12"`` (:class:`kml.models.resnet12.ResNet12`; KML modulates its 16 convs, FiLM its 16
            BatchNorms; it runs the ``vmap`` path, not the packed one).
        inner_steps, eval_inner_steps: MAML inner steps when ``learner.training`` is True / False.
        inner_lr: MAML inner learning rate (initial value of the per-parameter rates with ``meta_sgd``).
        first_order: drop second derivatives (the inner gradients are treated as constants).
        meta_sgd: learn one inner learning rate per inner-loop parameter element (Meta-SGD).
        inner_grad_clip: clip each task's inner gradient to this L2 norm (all inner parameters jointly).
        kml_form: the form of KML's kernel factor: ``"residual"``: ``W * (1 + outer(v, u))``; ``"bare"``:
            ``W * outer(v, u)`` (released code); named ``modulation`` before 0.2.
        factor_split: ``"plain"``: ``outer`` is ``(out, in*k*k)``; ``"published"``: ``(k*out, k*in)``
            for layers 2-4 and ``(out, in*k*k)`` for layer 1, as the released code splits.
        encoder_channels: E; the task encoder has 4 conv blocks E, 2E, 4E, 8E.
        encoder_uses_labels: feed one-hot support labels to the task encoder as extra channels.
        proto_refine: ProtoNet's transductive soft k-means refinement of the prototypes (one step).
        identity_init: initialise the modulation generators so that a fresh learner equals its plain
            backbone (residual KML and FiLM: zero modulation; bare KML: ``outer(v, u) = 1``).
        head: how the last ``[8C, s, s]`` map becomes the feature vector (the MAML head's input and
            ProtoNet's embedding): ``"flatten"`` (``8C*s*s`` features) or ``"avgpool"`` (spatial mean,
            ``8C`` features, as MMAML's MAML networks).
        batchnorm_affine: the backbone's BatchNorm has a learned (inner-loop adapted) scale and shift;
            ``False`` as MMAML's backbones, where FiLM supplies the affine part.
        encoder_hidden: when set, the task encoder maps each image's pooled ``8E`` features through
            ``Linear(8E, encoder_hidden) + ReLU`` before the mean over the set (the published encoders: 128).
        init: ``"kml"``: Xavier-uniform encoder convs with zero biases and the generators per
            ``identity_init``; ``"pytorch"``: PyTorch's default initialisation of every encoder and
            generator layer (the released codes; needs ``identity_init=False``).
        inner_grad_clamp: clamp every inner-gradient element to ``[-c, c]`` (MMAML's
            ``--inner-loop-grad-clip 20``); applied after ``inner_grad_clip``.
        mode_inner_lr, mode_inner_steps: per-mode inner rate / step count (one entry per mode index,
            training and evaluation alike; ``None``: ``inner_lr`` / ``inner_steps`` for every mode),
            as MMAML's Multi-MAML runs each dataset with its own rates.
        kml_bias: where KML's generated bias shift acts: ``"conv"`` (added to the conv bias, as the method
            defines it; a batch-statistics BatchNorm right after normalises it away) or ``"after_norm"``
            (added after the BatchNorm, where it reaches the output: an ablation).
        batch_norm: ``"transductive"`` (each support and query set normalised with its own statistics; MAML's
            convention) or ``"running"`` (the network's running statistics, never updated: inductive; needs a
            network that keeps them, so not kml's backbones).
        network: your own network instead of kml's backbones, by import path ``"package.module:name"``: an
            ``nn.Module`` subclass, or a function annotated to return one, called with ``network_args``. It maps
            images to logits (MAML: ``ways`` of them) or features (ProtoNet); ``modulation`` puts KML or FiLM on
            it (:func:`kml.modulate`) with kml's task encoder. ``backbone``, ``base_channels``, ``head`` and
            ``batchnorm_affine`` then do not apply.
        network_args: keyword arguments of ``network`` (JSON values).
        released_query_modulation: a quirk of the released KML code, kept to reproduce its numbers (ProtoNet with
            a task encoder): the query pass is modulated from the query images' own encoding, not the support's.
        released_refinement: a quirk of the released KML code (ProtoNet's refinement): each support block's last
            image is dropped (1-shot ignores the support) and blocks pair with prototypes by position; kml-train's
            sampler and kml-eval then label each task's class blocks in a random order, as the released loaders do.
    """

    algorithm: str = "maml"
    modulation: str = "kml"
    multi_maml: bool = False
    num_modes: int = 1
    ways: int = 5
    in_channels: int = 3
    image_size: int = 84
    base_channels: int = 32
    backbone: str = "published"
    inner_steps: int = 5
    eval_inner_steps: int = 5
    inner_lr: float = 0.05
    first_order: bool = False
    meta_sgd: bool = False
    inner_grad_clip: float | None = None
    kml_form: str = "residual"
    factor_split: str = "plain"
    encoder_channels: int = 32
    encoder_uses_labels: bool = False
    proto_refine: bool = True
    identity_init: bool = True
    # Fields added for the published recipes (kml.config.recipes); their defaults keep older checkpoints' behaviour.
    head: str = "flatten"
    batchnorm_affine: bool = True
    encoder_hidden: int | None = None
    init: str = "kml"
    inner_grad_clamp: float | None = None
    mode_inner_lr: list[float] | None = None
    mode_inner_steps: list[int] | None = None
    kml_bias: str = "conv"
    batch_norm: str = "transductive"
    network: str | None = None
    network_args: dict[str, Any] | None = None
    # Quirks of the released KML code (kml.config.recipes' "-as-released" recipes); off: kml's fixes.
    released_query_modulation: bool = False
    released_refinement: bool = False

    def __post_init__(self) -> None:
        for name, choices in FIELD_CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise KMLError(f"invalid {setting(name)} {value!r}; choose one of {', '.join(choices)}")
        check_fields(self, LEARNER_NUMBERS)  # every numeric field: type, finiteness, range (shared with the CLIs)
        check_bools(self, BOOL_FIELDS)
        if self.init == "pytorch" and self.identity_init:
            raise KMLError(
                f"{setting('init', 'pytorch')} is PyTorch's default initialisation, which does not start the "
                f"modulation at the identity: turn {setting('identity_init')} off"
            )
        if self.backbone == "resnet12" and self.kml_bias != "conv":
            raise KMLError(
                "kml_bias 'after_norm' is defined for the 4-block backbones; ResNet-12 takes KML's bias on its convs"
            )
        check_learner_combinations(self)
        check_network(self.network, self.network_args)

    @property
    def method(self) -> str:
        """A short human name of the method, e.g. ``kml-maml`` or ``multi-protonet``."""
        prefix = "multi-" if self.multi_maml else ""
        modulation = "" if self.modulation == "none" else f"{self.modulation}-"
        return f"{prefix}{modulation}{self.algorithm}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LearnerConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys or invalid values raise :class:`KMLError`."""
        if not isinstance(values, dict):
            raise KMLError(f"learner config must be a mapping, got {type(values).__name__}")
        values = upgrade_field_names(values)
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise KMLError(f"unknown learner config fields {unknown}; known: {', '.join(known)}")
        if values.get("algorithm") == "protonet":  # kml 0.2 recorded these for ProtoNet runs, where they did nothing
            values = {**values, **{name: off for name, off in _MAML_ONLY_OFF.items() if name in values}}
        return cls(**values)


def upgrade_field_names(values: dict[str, Any]) -> dict[str, Any]:
    """Learner fields saved before 0.2 (``model``: the kind of modulation, ``modulation``: KML's form) under
    their current names (``modulation``, ``kml_form``); current dicts pass unchanged (they have no ``model``)."""
    if "model" not in values:
        return values
    upgraded = {key: value for key, value in values.items() if key not in RENAMED_FIELDS}
    for old, new in RENAMED_FIELDS.items():
        if old in values:
            upgraded[new] = values[old]
    return upgraded
