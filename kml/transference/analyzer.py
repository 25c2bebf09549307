"""Computing task-level transference for every ordered pair of tasks, batched.

One meta-gradient per source task (``T`` backward passes through the same
inner loop as training), then all ``T`` lookahead parameter sets are
evaluated on all target tasks at once with :func:`torch.func.vmap`. The
learner's parameters, gradients and any optimiser state are never touched:
the lookahead lives in a dictionary passed to
:func:`torch.func.functional_call`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.func import functional_call, vmap

from kml.data.episode import Episode
from kml.errors import KMLError

__all__ = ["COLUMNS", "PARAMETER_GROUPS", "parameter_names", "result_rows", "task_transference", "TransferenceResult"]

PARAMETER_GROUPS = ("all", "backbone", "modulation")


@dataclass
class TransferenceResult:
    """Transference of a batch of source tasks onto a batch of target tasks.

    Attributes:
        z: ``[S, T]``: ``Z(i->j)`` for source task i and target task j.
        base_loss: ``[T]``: ``L_j(Theta)``.
        lookahead_loss: ``[S, T]``: ``L_j(Theta - eta * grad L_i)``.
        source_mode, target_mode: ``[S]``, ``[T]`` mode indices.
        source_classes, target_classes: ``[S, N]``, ``[T, N]``.
        mode_names: names of the source episode's modes, then the target's (equal when the same batch).
        rate: the lookahead rate ``eta``.
        same_batch: sources and targets are the same tasks (so ``z`` has a diagonal of self pairs).
    """

    z: torch.Tensor
    base_loss: torch.Tensor
    lookahead_loss: torch.Tensor
    source_mode: torch.Tensor
    target_mode: torch.Tensor
    source_classes: torch.Tensor
    target_classes: torch.Tensor
    source_mode_names: tuple[str, ...]
    target_mode_names: tuple[str, ...]
    rate: float
    same_batch: bool


def parameter_names(learner: torch.nn.Module, group: str) -> list[str]:
    """Meta-parameters that take the lookahead step: all, backbone (the inner-loop ones) or modulation
    (every meta-parameter outside the inner loop: encoder, generator, and Meta-SGD rates if any)."""
    if group not in PARAMETER_GROUPS:
        raise ValueError(f"unknown parameter group {group!r}; choose one of {', '.join(PARAMETER_GROUPS)}")
    names = [name for name, p in learner.named_parameters() if p.requires_grad]
    if group == "all":
        return names
    if not hasattr(learner, "inner_parameter_names"):
        raise KMLError(
            f"parameter group {group!r} needs a learner that names its inner-loop parameters "
            f"(inner_parameter_names()); {type(learner).__name__} does not: use parameters='all'"
        )
    inner = set(learner.inner_parameter_names())
    if group == "backbone":
        return [n for n in names if n in inner]
    if group == "modulation":
        return [n for n in names if n not in inner]
    return names


def task_transference(
    learner: torch.nn.Module,
    sources: Episode,
    rate: float,
    targets: Episode | None = None,
    parameters: str = "all",
    inner_steps: int | None = None,
    batched: bool = True,
    chunk_size: int | None = None,
) -> TransferenceResult:
    """``Z(i->j)`` for every source task i of ``sources`` and target task j of ``targets`` (default: ``sources``).

    Uses the learner's current mode (``train()`` gives the training inner loop).
    ``batched=False`` evaluates the lookaheads one source at a time (same numbers, less memory);
    ``chunk_size`` bounds how many lookaheads run at once in the batched path.
    """
    targets = sources if targets is None else targets
    names = parameter_names(learner, parameters)
    params = dict(learner.named_parameters())
    fixed = {**{n: p.detach() for n, p in params.items() if n not in names}, **dict(learner.named_buffers())}
    theta = {n: params[n].detach().requires_grad_(True) for n in names}
    # passed only when given: a learner without an inner loop need not take the argument
    options = {} if inner_steps is None else {"inner_steps": inner_steps}

    def target_losses(adapted: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(learner, {**fixed, **adapted}, (targets,), options).task_loss

    source_loss = functional_call(learner, {**fixed, **theta}, (sources,), options).task_loss
    # One meta-gradient per source task through the retained graph: S backward passes, not S*T.
    per_source = [
        torch.autograd.grad(
            source_loss[i], list(theta.values()), retain_graph=i + 1 < len(source_loss), allow_unused=True
        )
        if theta
        else ()  # an empty parameter group takes no step
        for i in range(len(source_loss))
    ]
    with torch.no_grad():
        stacked = {
            name: torch.stack(
                [grads[k] if grads[k] is not None else torch.zeros_like(theta[name]) for grads in per_source]
            )
            for k, name in enumerate(theta)
        }
        lookahead = {name: theta[name].detach().unsqueeze(0) - rate * stacked[name] for name in theta}
        same_batch = targets is sources
        base = source_loss.detach() if same_batch else target_losses({n: t.detach() for n, t in theta.items()})
        if not theta:
            after = base.unsqueeze(0).expand(len(source_loss), -1)
        elif batched:
            # The lookaheads are vmapped through the learner: use its vmap-composable path (same numbers).
            with learner.batched_with("vmap") if hasattr(learner, "batched_with") else nullcontext():
                after = vmap(target_losses, chunk_size=chunk_size)(lookahead)
        else:
            after = torch.stack(
                [target_losses({n: v[i] for n, v in lookahead.items()}) for i in range(len(source_loss))]
            )
    z = 1.0 - after / base.unsqueeze(0)
    return TransferenceResult(
        z=z.detach(),
        base_loss=base.detach(),
        lookahead_loss=after.detach(),
        source_mode=sources.mode,
        target_mode=targets.mode,
        source_classes=sources.classes,
        target_classes=targets.classes,
        source_mode_names=sources.mode_names,
        target_mode_names=targets.mode_names,
        rate=float(rate),
        same_batch=same_batch,
    )


def result_rows(result: TransferenceResult, step: int, batch: int = 0, include_self: bool = True) -> list[dict]:
    """Tidy records (one per ordered pair) of a result: the schema of ``transference.csv``."""
    rows = []
    z = result.z.double().cpu().tolist()
    before = result.base_loss.double().cpu().tolist()
    after = result.lookahead_loss.double().cpu().tolist()
    source_modes, target_modes = result.source_mode.tolist(), result.target_mode.tolist()
    source_classes, target_classes = result.source_classes.tolist(), result.target_classes.tolist()
    for i, row in enumerate(z):
        for j, value in enumerate(row):
            self_pair = result.same_batch and i == j
            if self_pair and not include_self:
                continue
            rows.append(
                {
                    "step": step,
                    "batch": batch,
                    "task_i": i,
                    "task_j": j,
                    "mode_i": result.source_mode_names[source_modes[i]],
                    "mode_j": result.target_mode_names[target_modes[j]],
                    "classes_i": " ".join(map(str, source_classes[i])),
                    "classes_j": " ".join(map(str, target_classes[j])),
                    "loss_j": before[j],
                    "loss_j_after": after[i][j],
                    "rate": result.rate,
                    "self_pair": self_pair,
                    "Z": value,
                }
            )
    return rows


COLUMNS: Sequence[str] = (
    "step",
    "batch",
    "task_i",
    "task_j",
    "mode_i",
    "mode_j",
    "classes_i",
    "classes_j",
    "loss_j",
    "loss_j_after",
    "rate",
    "self_pair",
    "Z",
)
