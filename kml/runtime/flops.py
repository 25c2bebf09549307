"""The floating-point work of a step, counted right for grouped convolutions, and the convolution shapes it ran.

torch's :class:`~torch.utils.flop_counter.FlopCounterMode` counts a convolution's forward and input gradient
right for any ``groups``, but its weight-gradient formula multiplies every input channel by every output
channel, so a grouped convolution's weight gradient is counted ``groups`` times over (kml's packed backend runs
T tasks as ``groups=T``). :func:`count_flops` runs a callable under the counter with that term divided by
``groups``, and records every convolution's shape so that the attainable throughput of the same work can be
measured (``benchmarks/learner.py``; benchmarks/README.md, "How close to the machine").

Conventions are torch's: a multiply-add is 2 FLOPs, bias additions and elementwise work are not counted
(BatchNorm, ReLU, the losses), padding is counted as if it were data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["ConvShape", "StepWork", "conv_flops", "count_flops"]

aten = torch.ops.aten


@dataclass(frozen=True)
class ConvShape:
    """One convolution as run: input ``[N, C_in, H, W]``, kernel ``[C_out, C_in/groups, k, k]``, its output side."""

    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def shared(self) -> ConvShape:
        """The same work as one shared-weight convolution: the ``groups`` groups become images.

        ``[N, g*C_in, H, W]`` with ``g`` kernels ``[C_out/g, C_in, k, k]`` -> ``[g*N, C_in, H, W]`` with one kernel.
        """
        g = self.groups
        n, c_in, *space = self.input_shape
        c_out, per_group_in, *kernel = self.weight_shape
        out_n, out_c, *out_space = self.output_shape
        return ConvShape(
            (g * n, c_in // g, *space),
            (c_out // g, per_group_in, *kernel),
            (g * out_n, out_c // g, *out_space),
            self.stride,
            self.padding,
            self.dilation,
            1,
        )


def conv_flops(shape: ConvShape, forward: bool = True, input_grad: bool = True, weight_grad: bool = True) -> int:
    """FLOPs of ``shape``'s forward, input gradient and weight gradient (2 per multiply-add, any ``groups``).

    Each is ``2 * N * C_out * (C_in / groups) * k*k * H_out*W_out``: every output element of every pass
    is one such dot product (the input gradient runs the transposed kernel, the weight gradient sums the
    same products over the batch and output positions).
    """
    n = shape.input_shape[0]
    one = 2 * n * prod(shape.weight_shape) * prod(shape.output_shape[2:])
    return one * (int(forward) + int(input_grad) + int(weight_grad))


def _corrected_backward(
    grad_out_shape: Any,
    x_shape: Any,
    w_shape: Any,
    _bias: Any,
    _stride: Any,
    _padding: Any,
    _dilation: Any,
    transposed: bool,
    _output_padding: Any,
    _groups: int,
    output_mask: list[bool],
    **_out_shape: Any,
) -> int:
    """torch's ``convolution_backward`` count with the weight gradient's counted right for ``groups > 1``.

    Both gradients are ``2 * N * prod(kernel) * prod(positions)``, the kernel ``[C_out, C_in/groups, k, k]``
    holding only the channel pairs that meet; positions are the output's (the input's for a transposed one).
    """
    positions = prod((x_shape if transposed else grad_out_shape)[2:])
    one = 2 * x_shape[0] * prod(w_shape) * positions
    return one * (int(output_mask[0]) + int(output_mask[1]))


@dataclass
class StepWork:
    """What :func:`count_flops` found: total FLOPs, FLOPs by operator, and each convolution shape with its count."""

    total: int = 0
    by_operator: dict[str, int] = field(default_factory=dict)
    convolutions: Counter[ConvShape] = field(default_factory=Counter)

    @property
    def convolution_flops(self) -> int:
        """FLOPs in convolutions (forward and both gradients), from the recorded shapes."""
        return sum(count * conv_flops(shape) for shape, count in self.convolutions.items())


class _ConvRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape of every forward convolution (its backward has the same shapes)."""

    def __init__(self, found: Counter[ConvShape]) -> None:
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is aten.convolution.default:
            x, w, _bias, stride, padding, dilation, transposed, _output_padding, groups = args
            if not transposed:
                shape = ConvShape(
                    input_shape=tuple(x.shape),
                    weight_shape=tuple(w.shape),
                    output_shape=tuple(out.shape),
                    stride=tuple(stride),
                    padding=tuple(padding),
                    dilation=tuple(dilation),
                    groups=int(groups),
                )
                self.found[shape] += 1
        return out


def count_flops(step: Callable[[], object]) -> StepWork:
    """Run ``step()`` once and count its FLOPs (grouped-convolution weight gradients counted right).

    The recorded convolutions are the forward passes; in a step that differentiates (an outer backward, MAML's
    inner gradients) each also runs an input and a weight gradient of the same shape, which ``convolutions``
    does not list separately.
    """
    counter = FlopCounterMode(display=False, custom_mapping={aten.convolution_backward: _corrected_backward})
    found: Counter[ConvShape] = Counter()
    with counter, _ConvRecorder(found):
        step()
    by_operator = {str(op): int(flops) for op, flops in counter.get_flop_counts()["Global"].items()}
    return StepWork(int(counter.get_total_flops()), by_operator, found)
