"""kml's config-built learners: the paper's methods as :class:`~kml.algorithms.maml.MAML` or
:class:`~kml.algorithms.protonet.ProtoNet` over kml's own task models (task encoder -> modulation ->
backbone), or over a network given by import path (``LearnerConfig.network``).

kml's 4-block backbones and task encoder run T tasks at once in a task-packed layout (``forward_tasks``:
grouped convolutions), which the ``"auto"`` backend uses; ResNet-12 and other networks run ``vmap``.
"""

from __future__ import annotations

from torch import nn

from kml.algorithms.maml import MAML
from kml.algorithms.method import MetaMethod
from kml.algorithms.protonet import ProtoNet
from kml.config.learner import LearnerConfig
from kml.errors import KMLError
from kml.models.task_model import TaskModel, network_model

__all__ = ["build_learner"]


def build_learner(config: LearnerConfig) -> MetaMethod:
    """The learner a config names (the one constructor used by training, evaluation and checkpoints).

    Multi-MAML and Multi-ProtoNet (``multi_maml``) get one task model per mode, each initialised on its own.
    """
    count = config.num_modes if config.multi_maml else 1
    for name in ("mode_inner_lr", "mode_inner_steps"):
        values = getattr(config, name)
        if values is not None and len(values) != config.num_modes:
            raise KMLError(f"learner {name} has {len(values)} entries for {config.num_modes} modes; give one per mode")
    models: list[nn.Module] = [
        TaskModel(config) if config.network is None else network_model(config) for _ in range(count)
    ]
    learner: MetaMethod
    if config.algorithm == "protonet":
        learner = ProtoNet(
            models,
            refine=config.proto_refine,
            batch_norm=config.batch_norm,
            released_query_modulation=config.released_query_modulation,
            released_refinement=config.released_refinement and config.proto_refine,
        )
    else:
        learner = MAML(
            models,
            inner_lr=config.inner_lr,
            inner_steps=config.inner_steps,
            eval_inner_steps=config.eval_inner_steps,
            first_order=config.first_order,
            inner_grad_clip=config.inner_grad_clip,
            inner_grad_clamp=config.inner_grad_clamp,
            meta_sgd=config.meta_sgd,
            mode_inner_lr=config.mode_inner_lr,
            mode_inner_steps=config.mode_inner_steps,
            batch_norm=config.batch_norm,
        )
    learner.config = config
    return learner
