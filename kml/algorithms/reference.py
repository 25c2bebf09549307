"""The per-task reference loops: each method as the obvious Python loop over tasks with ordinary autograd.

The test oracles: every backend of :class:`~kml.algorithms.maml.MAML` and :class:`~kml.algorithms.protonet.ProtoNet`
is held equal to these in float64 (tests/test_algorithms.py, tests/test_generic.py), and the benchmarks time the
batched paths against them. Written independently of the batched code on purpose: a task at a time, the model
called as a module on one task's parameters, per-mode step counts taken literally.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kml.algorithms.contract import LearnerOutput
from kml.algorithms.functional import ModelCalls, Params, batch_norm_mode, clip_gradients, subset
from kml.algorithms.losses import accuracy, cross_entropy, prototypical_loss
from kml.algorithms.method import rate_key
from kml.data.episode import Episode
from kml.runtime import float32_inner_loop

if TYPE_CHECKING:
    from kml.algorithms.maml import MAML
    from kml.algorithms.protonet import ProtoNet

__all__ = ["maml_loop", "protonet_loop", "released_refinement"]


def _task_model(learner: MAML | ProtoNet, mode: int) -> tuple[int, Params]:
    """The parameter set a task of ``mode`` uses, and its parameters (named as in the model)."""
    index = mode if learner.num_modes > 1 else 0
    return index, subset(dict(learner.named_parameters()), f"models.{index}.")


def maml_loop(learner: MAML, episode: Episode, inner_steps: int | None = None) -> LearnerOutput:
    """:meth:`MAML.forward <kml.algorithms.maml.MAML.forward>` one task at a time."""
    modes = episode.mode.tolist()
    steps = learner.steps(inner_steps)
    losses, accuracies = [], []
    for t in range(episode.num_tasks):
        index, params = _task_model(learner, modes[t])
        calls = ModelCalls(learner.models[index])
        support_x, support_y = episode.support_x[t], episode.support_y[t]
        with batch_norm_mode(learner.models[index], learner.batch_norm):
            modulation = calls.modulation(params, support_x, support_y)
            prefix = calls.network_prefix
            network = subset(params, prefix)
            task_steps = steps
            if learner.mode_inner_steps is not None and inner_steps is None:
                task_steps = learner.mode_inner_steps[modes[t]]
            task_lr = learner.mode_inner_lr[modes[t]] if learner.mode_inner_lr is not None else learner.inner_lr
            # Meta-SGD: the learned rates, keyed by the network's parameter names
            rates = subset(dict(learner.named_parameters()), f"inner_rates.{index}.") if learner.inner_rates else None
            fast = {name[len(prefix) :]: params[name] for name in learner.adapted}
            with torch.enable_grad(), float32_inner_loop(support_x.device.type):
                fast = {n: p if p.requires_grad else p.detach().requires_grad_() for n, p in fast.items()}
                for _ in range(task_steps):
                    loss = cross_entropy(calls({**network, **fast}, support_x, modulation), support_y)
                    raw = torch.autograd.grad(
                        loss, list(fast.values()), create_graph=not learner.first_order and torch.is_grad_enabled()
                    )
                    grads = clip_gradients(dict(zip(fast, raw)), learner.inner_grad_clip, learner.inner_grad_clamp)
                    fast = {
                        n: p - (task_lr if rates is None else rates[rate_key(n)]) * grads[n] for n, p in fast.items()
                    }
            logits = calls({**network, **fast}, episode.query_x[t], modulation)
        losses.append(cross_entropy(logits, episode.query_y[t]))
        accuracies.append(accuracy(logits, episode.query_y[t]))
    task_loss = torch.stack(losses)
    return LearnerOutput(task_loss.mean(), task_loss, torch.stack(accuracies).detach())


def protonet_loop(learner: ProtoNet, episode: Episode) -> LearnerOutput:
    """:meth:`ProtoNet.forward <kml.algorithms.protonet.ProtoNet.forward>` one task at a time."""
    modes = episode.mode.tolist()
    losses, accuracies = [], []
    for t in range(episode.num_tasks):
        index, params = _task_model(learner, modes[t])
        model = learner.models[index]
        calls = ModelCalls(model)
        support_x, support_y = episode.support_x[t], episode.support_y[t]
        with batch_norm_mode(model, learner.batch_norm):
            modulation = calls.modulation(params, support_x, support_y)
            query_modulation = modulation
            if learner.released_query_modulation:
                query_modulation = calls.modulation(params, episode.query_x[t], episode.query_y[t])
            network = subset(params, calls.network_prefix)
            support = calls(network, support_x, modulation).flatten(1)
            query = calls(network, episode.query_x[t], query_modulation).flatten(1)
        if learner.refine and learner.released_refinement:
            centres = released_refinement(support, support_y, query, episode.ways)
            logits = -((query.unsqueeze(1) - centres.unsqueeze(0)) ** 2).sum(-1)
            loss, acc = cross_entropy(logits, episode.query_y[t]), accuracy(logits, episode.query_y[t])
        else:
            loss, acc = prototypical_loss(support, support_y, query, episode.query_y[t], episode.ways, learner.refine)
        losses.append(loss)
        accuracies.append(acc)
    task_loss = torch.stack(losses)
    return LearnerOutput(task_loss.mean(), task_loss, torch.stack(accuracies).detach())


def released_refinement(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, ways: int) -> torch.Tensor:
    """One task's prototypes ``[N, D]`` as the released KML code refines them, written as its loops are
    (``scripts/trainer.py`` ``_calculate_proto``, the ``features_sum`` slice, ``_update_proto``): support ``[N*K, D]``
    by label, block j's first K-1 images by position, query ``[M, D]`` softly by squared distance."""
    shots = support.shape[0] // ways
    centres = torch.stack([support[support_y == c].mean(dim=0) for c in range(ways)])  # [N, D]
    kept = [support[j * shots : (j + 1) * shots - 1].sum(dim=0) for j in range(ways)]
    weights = torch.softmax(-((query.unsqueeze(1) - centres.unsqueeze(0)) ** 2).sum(-1), dim=1)  # [M, N]
    rows = [(kept[j] + (weights[:, j : j + 1] * query).sum(dim=0)) / (shots + weights[:, j].sum()) for j in range(ways)]
    return torch.stack(rows)
