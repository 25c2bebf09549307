"""Computing task-level transference for every ordered pair of tasks, batched.

One meta-gradient per source task (``S`` backward passes through the same inner loop as training), one
lookahead step per source (plain SGD, or the optimiser's own next update: :mod:`kml.transference.lookahead`),
then all ``S`` lookahead parameter sets are evaluated on all target tasks at once with
:func:`torch.func.vmap`. The learner's parameters, gradients and any optimiser state are never touched: the
lookahead lives in a dictionary passed to :func:`torch.func.functional_call`.

Each result carries the diagnostics that tell a large rate, a loss scale and the definition apart: the step
norm ``|Delta_i|``, the meta-gradient norm ``|g_i|``, the base loss ``L_j`` and the first-order prediction
``-<g_j, Delta_i> / L_j`` beside the measured Z (:mod:`kml.transference.diagnostics`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call, vmap

from kml.data.episode import Episode
from kml.errors import KMLError
from kml.transference.lookahead import Lookahead, resolve_lookahead

__all__ = [
    "COLUMNS",
    "DIAGNOSTIC_COLUMNS",
    "PARAMETER_GROUPS",
    "REQUIRED_COLUMNS",
    "TransferenceResult",
    "parameter_names",
    "result_rows",
    "task_transference",
]

PARAMETER_GROUPS = ("all", "backbone", "modulation")


@dataclass
class TransferenceResult:
    """Transference of a batch of ``S`` source tasks onto a batch of ``T`` target tasks.

    Attributes:
        z: ``[S, T]``: ``Z(i->j)`` for source task i and target task j.
        base_loss: ``[T]``: ``L_j(Theta)``.
        lookahead_loss: ``[S, T]``: ``L_j(Theta + Delta_i)``, ``Delta_i`` the lookahead step of source i.
        source_mode, target_mode: ``[S]``, ``[T]`` mode indices.
        source_classes, target_classes: ``[S, N]``, ``[T, N]``.
        mode_names: names of the source episode's modes, then the target's (equal when the same batch).
        rate: the lookahead rate ``eta`` (the optimiser's learning rate for an optimiser lookahead).
        same_batch: sources and targets are the same tasks (so ``z`` has a diagonal of self pairs).
        lookahead: the step rule: ``sgd`` (``Delta_i = -eta * g_i``), ``adam``, ``adamw`` or ``sgd-momentum``
            (the optimiser's next update from its state, with ``g_i`` as the whole gradient).
        step_norm: ``[S]``: ``|Delta_i|`` (L2 over the parameters that take the step).
        grad_norm: ``[S]``: ``|g_i|``, the source task's meta-gradient norm.
        z_linear: ``[S, T]``: the first-order prediction ``-<g_j, Delta_i> / L_j`` (``eta <g_i, g_j> / L_j`` for
            SGD); ``None`` without diagnostics. ``z - z_linear`` is the linearisation error (curvature).
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
    lookahead: str = "sgd"
    step_norm: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None
    z_linear: torch.Tensor | None = None


def parameter_names(learner: torch.nn.Module, group: str) -> list[str]:
    """Meta-parameters that take the lookahead step: all, backbone (the inner-loop ones) or modulation
    (every meta-parameter outside the inner loop: encoder, generator, and Meta-SGD rates if any)."""
    if group not in PARAMETER_GROUPS:
        raise ValueError(f"unknown parameter group {group!r}; choose one of {', '.join(PARAMETER_GROUPS)}")
    names = [name for name, p in learner.named_parameters() if p.requires_grad]
    if group == "all":
        return names
    if not callable(getattr(learner, "inner_parameter_names", None)):  # the Learner protocol's method
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


def _flat(tensors: dict[str, torch.Tensor], count: int) -> torch.Tensor:
    """``{name: [S, ...]}`` as one ``[S, P]`` matrix (``[S, 0]`` when empty)."""
    if not tensors:
        return torch.zeros(count, 0)
    return torch.cat([t.reshape(count, -1) for t in tensors.values()], dim=1)


def _per_task_gradients(
    losses: torch.Tensor, theta: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``{name: [S, ...]}``: the gradient of each ``losses[i]`` alone (S backward passes through one graph), and
    ``{name: [S]}``: whether ``losses[i]`` moves the parameter at all (a gradient that is not identically zero;
    another mode's parameter set in Multi-MAML is not), which an optimiser's lookahead then leaves in place."""
    per_task = [
        torch.autograd.grad(losses[i], list(theta.values()), retain_graph=i + 1 < len(losses), allow_unused=True)
        for i in range(len(losses))
    ]
    grads = {
        name: torch.stack([g[k] if g[k] is not None else torch.zeros_like(theta[name]) for g in per_task])
        for k, name in enumerate(theta)
    }
    device = losses.device
    reached = {
        name: torch.tensor([g[k] is not None and bool(g[k].any()) for g in per_task], device=device)
        for k, name in enumerate(theta)
    }
    return grads, reached


def task_transference(
    learner: torch.nn.Module,
    sources: Episode,
    rate: float | None = None,
    targets: Episode | None = None,
    parameters: str = "all",
    inner_steps: int | None = None,
    batched: bool = True,
    chunk_size: int | None = None,
    lookahead: str | Lookahead | torch.optim.Optimizer | Mapping[str, Any] = "sgd",
    diagnostics: bool = True,
) -> TransferenceResult:
    """``Z(i->j)`` for every source task i of ``sources`` and target task j of ``targets`` (default: ``sources``).

    Args:
        learner: any learner returning ``LearnerOutput.task_loss [T]``; its current mode is used (``train()``
            gives the training inner loop).
        sources, targets: episodes of ``S`` and ``T`` tasks.
        rate: ``eta`` of the ``"sgd"`` lookahead; for an optimiser lookahead, ``None`` keeps the optimiser's
            learning rate and a number replaces it.
        parameters: the meta-parameters that take the step: ``"all"``, ``"backbone"`` or ``"modulation"``.
        lookahead: ``"sgd"`` (``Theta - rate * g_i``), a torch optimiser (Adam, AdamW, SGD) or its
            ``state_dict()``: its next update from its current state with ``g_i`` as the gradient (the state
            is read, not changed; see :mod:`kml.transference.lookahead`), or a
            :class:`~kml.transference.lookahead.Lookahead`.
        diagnostics: also the first-order prediction ``z_linear`` (with separate targets: ``T`` more backward
            passes for the targets' gradients).
        batched: ``False`` evaluates the lookaheads one source at a time (same numbers, less memory);
            ``chunk_size`` bounds how many run at once in the batched path.
    """
    targets = sources if targets is None else targets
    names = parameter_names(learner, parameters)
    rule = resolve_lookahead(lookahead, learner, rate)
    params = dict(learner.named_parameters())
    fixed = {**{n: p.detach() for n, p in params.items() if n not in names}, **dict(learner.named_buffers())}
    theta = {n: params[n].detach().requires_grad_(True) for n in names}
    # passed only when given: a learner without an inner loop need not take the argument
    options = {} if inner_steps is None else {"inner_steps": inner_steps}
    same_batch = targets is sources

    def target_losses(adapted: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(learner, {**fixed, **adapted}, (targets,), options).task_loss

    source_loss = functional_call(learner, {**fixed, **theta}, (sources,), options).task_loss
    count = len(source_loss)
    # One meta-gradient per source task through the retained graph: S backward passes, not S*T.
    grads, reached = _per_task_gradients(source_loss, theta) if theta else ({}, {})
    target_grads: dict[str, torch.Tensor] = {}
    if same_batch or not diagnostics or not theta:
        base = source_loss.detach() if same_batch else None
        target_grads = grads if same_batch else {}
    else:
        target_loss = functional_call(learner, {**fixed, **theta}, (targets,), options).task_loss
        target_grads = _per_task_gradients(target_loss, theta)[0]
        base = target_loss.detach()
    with torch.no_grad():
        steps = rule.updates({n: t.detach() for n, t in theta.items()}, grads)
        # a parameter the source does not move takes no step (optimizer.step() skips one without a gradient)
        steps = {n: torch.where(reached[n].view(-1, *[1] * (d.dim() - 1)), d, 0.0) for n, d in steps.items()}
        shifted = {name: theta[name].detach().unsqueeze(0) + steps[name] for name in theta}
        if base is None:
            base = target_losses({n: t.detach() for n, t in theta.items()})
        if not theta:  # an empty parameter group takes no step
            after = base.unsqueeze(0).expand(count, -1)
        elif batched:
            # vmapped through the learner: kml's learners then run their vmap backend (same numbers)
            after = vmap(target_losses, chunk_size=chunk_size)(shifted)
        else:
            after = torch.stack([target_losses({n: v[i] for n, v in shifted.items()}) for i in range(count)])
        z = 1.0 - after / base.unsqueeze(0)
        flat_steps, flat_grads = _flat(steps, count), _flat(grads, count)
        z_linear = None
        if diagnostics:
            flat_targets = _flat(target_grads, len(base)).to(flat_steps) if target_grads else None
            # first order: L_j(Theta + Delta_i) ~ L_j + <g_j, Delta_i>
            z_linear = (
                -(flat_steps @ flat_targets.T) / base.unsqueeze(0) if flat_targets is not None else torch.zeros_like(z)
            )
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
        rate=float(rule.rate),
        same_batch=same_batch,
        lookahead=rule.kind,
        step_norm=flat_steps.norm(dim=1).to(z),
        grad_norm=flat_grads.norm(dim=1).to(z),
        z_linear=z_linear,
    )


def result_rows(result: TransferenceResult, step: int, batch: int = 0, include_self: bool = True) -> list[dict]:
    """Tidy records (one per ordered pair) of a result: the schema of ``transference.csv`` (:data:`COLUMNS`)."""
    rows = []
    z = result.z.double().cpu().tolist()
    before = result.base_loss.double().cpu().tolist()
    after = result.lookahead_loss.double().cpu().tolist()
    linear = result.z_linear.double().cpu().tolist() if result.z_linear is not None else None
    step_norm = result.step_norm.double().cpu().tolist() if result.step_norm is not None else None
    grad_norm = result.grad_norm.double().cpu().tolist() if result.grad_norm is not None else None
    source_modes, target_modes = result.source_mode.tolist(), result.target_mode.tolist()
    source_classes, target_classes = result.source_classes.tolist(), result.target_classes.tolist()
    nan = float("nan")
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
                    "lookahead": result.lookahead,
                    "step_norm_i": step_norm[i] if step_norm is not None else nan,
                    "grad_norm_i": grad_norm[i] if grad_norm is not None else nan,
                    "Z_linear": linear[i][j] if linear is not None else nan,
                    "linear_error": value - linear[i][j] if linear is not None else nan,
                }
            )
    return rows


# The columns of kml 0.3's transference.csv: every table has them (older tables load with the others empty).
REQUIRED_COLUMNS: Sequence[str] = (
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

# The diagnostics added since: the step rule, |Delta_i|, |g_i|, the first-order Z and Z minus it.
DIAGNOSTIC_COLUMNS: Sequence[str] = ("lookahead", "step_norm_i", "grad_norm_i", "Z_linear", "linear_error")

COLUMNS: Sequence[str] = (*REQUIRED_COLUMNS, *DIAGNOSTIC_COLUMNS)
