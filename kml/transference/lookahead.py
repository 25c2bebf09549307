"""The lookahead step of transference: the update one outer step would make from one task's meta-gradient.

``Z(i->j)`` compares ``L_j`` before and after a step ``Theta + Delta_i``. The step is either plain SGD at a given
rate (``Delta_i = -eta * g_i``, the definition of Fifty et al.) or the update of the optimiser training uses,
from its current state (Adam's moments and step count; SGD's momentum buffer), as ``optimizer.step()`` would
take it with ``g_i`` as the whole gradient. The state is read, never written: the optimiser, its moments and
the parameters are unchanged.

Which parameters step: those task i's meta-gradient moves (a parameter tensor it leaves identically zero, such as
another mode's set in Multi-MAML, is one task i does not reach; it takes no step, as ``optimizer.step()`` skips a
parameter without a gradient). The others take the optimiser's whole update, momentum included: under Adam part
of every ``Delta_i`` is the step the moments alone would take, shared by all sources.

Every rule maps the parameters ``theta`` (``{name: [...]}``) and the stacked per-source gradients
``{name: [S, ...]}`` to the updates ``{name: [S, ...]}``, batched over the ``S`` sources.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from kml.errors import KMLError

__all__ = [
    "LOOKAHEADS",
    "AdamLookahead",
    "Lookahead",
    "MomentumLookahead",
    "SGDLookahead",
    "optimizer_lookahead",
    "resolve_lookahead",
]

LOOKAHEADS = ("optimizer", "sgd")

Tensors = Mapping[str, torch.Tensor]


class Lookahead:
    """A lookahead rule: ``updates(theta, grads)`` ``{name: [S, ...]}`` for stacked gradients ``[S, ...]``."""

    kind: str = ""
    rate: float = 0.0

    def updates(self, theta: Tensors, grads: Tensors) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def with_rate(self, rate: float) -> Lookahead:
        """The same rule at another rate (the rule's step is linear in it)."""
        raise NotImplementedError


@dataclass(frozen=True)
class SGDLookahead(Lookahead):
    """``Delta_i = -rate * g_i``: one plain gradient step on task i alone."""

    rate: float
    kind: str = "sgd"

    def updates(self, theta: Tensors, grads: Tensors) -> dict[str, torch.Tensor]:  # noqa: ARG002
        return {name: -self.rate * g for name, g in grads.items()}

    def with_rate(self, rate: float) -> SGDLookahead:
        return replace(self, rate=float(rate))


@dataclass(frozen=True)
class AdamGroup:
    """One parameter's Adam settings and state (``exp_avg``, ``exp_avg_sq``: zeros before its first step)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool  # AdamW: the decay shrinks the parameter instead of entering the gradient
    amsgrad: bool
    maximize: bool
    step: float
    exp_avg: torch.Tensor | None
    exp_avg_sq: torch.Tensor | None
    max_exp_avg_sq: torch.Tensor | None


@dataclass(frozen=True)
class AdamLookahead(Lookahead):
    """Adam's (or AdamW's) next update from its state, as ``torch.optim.Adam.step`` computes it.

    ``rate``: the learning rate of the first parameter group (``with_rate`` rescales every group's lr by the
    same factor, so the step of a run with several groups keeps their ratios).
    """

    groups: dict[str, AdamGroup]
    rate: float
    kind: str = "adam"

    def updates(self, theta: Tensors, grads: Tensors) -> dict[str, torch.Tensor]:
        out = {}
        for name, g in grads.items():
            if name not in self.groups:  # a parameter the optimiser does not hold: its step leaves it
                out[name] = torch.zeros_like(g)
                continue
            s = self.groups[name]
            p = theta[name].unsqueeze(0)
            g = -g if s.maximize else g
            if s.weight_decay and not s.decoupled:
                g = g + s.weight_decay * p
            m0 = torch.zeros_like(p) if s.exp_avg is None else s.exp_avg.to(p).unsqueeze(0)
            v0 = torch.zeros_like(p) if s.exp_avg_sq is None else s.exp_avg_sq.to(p).unsqueeze(0)
            m = m0.lerp(g, 1 - s.beta1)  # torch's exp_avg.lerp_(grad, 1 - beta1)
            v = v0 * s.beta2 + (1 - s.beta2) * g * g
            step = s.step + 1
            if s.amsgrad:
                v = torch.maximum(torch.zeros_like(p) if s.max_exp_avg_sq is None else s.max_exp_avg_sq.to(p), v)
            denom = v.sqrt() / (1 - s.beta2**step) ** 0.5 + s.eps
            delta = -(s.lr / (1 - s.beta1**step)) * m / denom
            if s.weight_decay and s.decoupled:
                delta = delta - s.lr * s.weight_decay * p  # p * (1 - lr * wd), then the Adam step
            out[name] = delta
        return out

    def with_rate(self, rate: float) -> AdamLookahead:
        factor = float(rate) / self.rate
        groups = {n: replace(s, lr=s.lr * factor) for n, s in self.groups.items()}
        return replace(self, groups=groups, rate=float(rate))


@dataclass(frozen=True)
class MomentumGroup:
    """One parameter's SGD settings and momentum buffer (``None`` before its first step)."""

    lr: float
    momentum: float
    dampening: float
    nesterov: bool
    weight_decay: float
    maximize: bool
    buffer: torch.Tensor | None


@dataclass(frozen=True)
class MomentumLookahead(Lookahead):
    """``torch.optim.SGD``'s next update (momentum, dampening, Nesterov, weight decay) from its buffers."""

    groups: dict[str, MomentumGroup] = field(default_factory=dict)
    rate: float = 0.0
    kind: str = "sgd-momentum"

    def updates(self, theta: Tensors, grads: Tensors) -> dict[str, torch.Tensor]:
        out = {}
        for name, g in grads.items():
            if name not in self.groups:  # a parameter the optimiser does not hold: its step leaves it
                out[name] = torch.zeros_like(g)
                continue
            s = self.groups[name]
            p = theta[name].unsqueeze(0)
            g = -g if s.maximize else g
            if s.weight_decay:
                g = g + s.weight_decay * p
            if s.momentum:
                # the first step's buffer is the gradient itself (no dampening), as in torch
                buf = g if s.buffer is None else s.buffer.to(p).unsqueeze(0) * s.momentum + (1 - s.dampening) * g
                g = g + s.momentum * buf if s.nesterov else buf
            out[name] = -s.lr * g
        return out

    def with_rate(self, rate: float) -> MomentumLookahead:
        factor = float(rate) / self.rate
        groups = {n: replace(s, lr=s.lr * factor) for n, s in self.groups.items()}
        return replace(self, groups=groups, rate=float(rate))


def _optimizer_kind(group: Mapping[str, Any], optimizer: torch.optim.Optimizer | None) -> str:
    """``adam``, ``adamw`` or ``sgd-momentum`` from a live optimiser's class or a saved group's keys."""
    if optimizer is not None:
        if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
            return "adamw" if isinstance(optimizer, torch.optim.AdamW) else "adam"
        if type(optimizer) is torch.optim.SGD:
            return "sgd-momentum"
        raise KMLError(
            f"the optimizer lookahead knows Adam, AdamW and SGD, not {type(optimizer).__name__}; use lookahead='sgd'"
        )
    keys = set(group)
    # Adam and AdamW save betas and amsgrad; NAdam (momentum_decay), RAdam and Adamax save no amsgrad
    if {"betas", "eps", "amsgrad"} <= keys and "momentum_decay" not in keys:
        return "adamw" if group.get("decoupled_weight_decay") else "adam"
    if {"momentum", "dampening", "nesterov"} <= keys:
        return "sgd-momentum"
    raise KMLError(
        "the saved optimizer state is not Adam's, AdamW's or SGD's (its settings: "
        f"{', '.join(sorted(k for k in keys if k != 'params'))}); use --lookahead sgd"
    )


def _value(x: Any) -> float:
    return float(x.item()) if torch.is_tensor(x) else float(x)


def optimizer_lookahead(
    optimizer: torch.optim.Optimizer | Mapping[str, Any],
    learner: torch.nn.Module,
    rate: float | None = None,
) -> Lookahead:
    """The next update of ``optimizer`` (a live optimiser, or its ``state_dict()`` as a checkpoint saves it).

    A live optimiser's parameters are matched to the learner's names by identity. A saved state numbers them
    in the order the optimiser was given them: kml-train's (and :class:`~kml.training.trainer.Trainer`'s
    usual) ``Adam([p for p in learner.parameters() if p.requires_grad])``; its shapes are checked against that.
    ``rate`` replaces the optimiser's learning rate (of the first group; other groups keep their ratio to it).
    """
    live = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
    saved = optimizer.state_dict() if live is not None else optimizer
    if not isinstance(saved, Mapping) or "param_groups" not in saved or "state" not in saved:
        raise KMLError("the optimizer lookahead needs a torch optimizer or its state_dict(); use lookahead='sgd'")
    named = [(n, p) for n, p in learner.named_parameters() if p.requires_grad]
    if live is not None:
        by_id = {id(p): n for n, p in learner.named_parameters()}
        order = [by_id.get(id(p)) for group in live.param_groups for p in group["params"]]
        if None in order:
            raise KMLError("the optimizer holds parameters that are not the learner's; pass the learner it trains")
        names = dict(zip([i for g in saved["param_groups"] for i in g["params"]], order))
    else:
        indices = [i for g in saved["param_groups"] for i in g["params"]]
        if len(indices) != len(named):
            raise KMLError(
                f"the saved optimizer holds {len(indices)} parameters and the learner trains {len(named)}; "
                f"it was not built over this learner's parameters: use --lookahead sgd"
            )
        names = {index: name for index, (name, _) in zip(sorted(indices), named)}
    shapes = dict(named)
    groups: dict[str, Any] = {}
    kinds = set()
    for group in saved["param_groups"]:
        kind = _optimizer_kind(group, live)
        kinds.add(kind)
        for index in group["params"]:
            name = names[index]
            state = saved["state"].get(index, {})
            for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                if key in state and tuple(state[key].shape) != tuple(shapes[name].shape):
                    raise KMLError(
                        f"the saved optimizer's {key} of parameter {index} has shape {tuple(state[key].shape)}, "
                        f"but the learner's {name} is {tuple(shapes[name].shape)}: use --lookahead sgd"
                    )
            if kind == "sgd-momentum":
                groups[name] = MomentumGroup(
                    lr=_value(group["lr"]),
                    momentum=float(group["momentum"]),
                    dampening=float(group["dampening"]),
                    nesterov=bool(group["nesterov"]),
                    weight_decay=float(group["weight_decay"]),
                    maximize=bool(group.get("maximize", False)),
                    buffer=state.get("momentum_buffer"),
                )
            else:
                beta1, beta2 = group["betas"]
                groups[name] = AdamGroup(
                    lr=_value(group["lr"]),
                    beta1=_value(beta1),
                    beta2=_value(beta2),
                    eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]),
                    decoupled=kind == "adamw",
                    amsgrad=bool(group["amsgrad"]),
                    maximize=bool(group.get("maximize", False)),
                    step=_value(state.get("step", 0.0)),
                    exp_avg=state.get("exp_avg"),
                    exp_avg_sq=state.get("exp_avg_sq"),
                    max_exp_avg_sq=state.get("max_exp_avg_sq"),
                )
    if len(kinds) != 1:  # one optimiser class saves one kind of group
        raise KMLError(f"the optimizer's parameter groups mix kinds {sorted(kinds)}; use --lookahead sgd")
    kind = kinds.pop()
    base = _value(saved["param_groups"][0]["lr"])
    rule: Lookahead
    if kind == "sgd-momentum":
        plain = not any(s.momentum for s in groups.values())  # torch's SGD without momentum: the plain step
        rule = MomentumLookahead(groups=groups, rate=base, kind="sgd" if plain else "sgd-momentum")
    else:
        rule = AdamLookahead(groups=groups, rate=base, kind=kind)
    if rate is not None and rate != base:
        if base == 0:
            raise KMLError("the optimizer's learning rate is 0, so it cannot be rescaled; use --lookahead sgd")
        rule = rule.with_rate(rate)
    return rule


def resolve_lookahead(
    lookahead: str | Lookahead | torch.optim.Optimizer | Mapping[str, Any],
    learner: torch.nn.Module,
    rate: float | None,
) -> Lookahead:
    """A lookahead rule from what a caller gives: ``"sgd"`` (with ``rate``), a rule, an optimiser or its state."""
    if isinstance(lookahead, Lookahead):
        return lookahead if rate is None or rate == lookahead.rate else lookahead.with_rate(rate)
    if isinstance(lookahead, str):
        if lookahead == "sgd":
            if rate is None:
                raise KMLError("the sgd lookahead needs a rate (eta); pass rate=...")
            return SGDLookahead(float(rate))
        if lookahead == "optimizer":
            raise KMLError("lookahead='optimizer' needs the optimiser: pass lookahead=optimizer (or its state_dict())")
        raise KMLError(f"unknown lookahead {lookahead!r}; choose sgd, or pass an optimizer or its state_dict()")
    return optimizer_lookahead(lookahead, learner, rate)
