"""What the machine can do with a step's convolutions: the attainable throughput, measured where it runs.

For every convolution shape a step ran (:func:`kml.runtime.flops.count_flops`), the same work as one
shared-weight convolution (a grouped convolution's groups become images) is timed forward, input gradient and
weight gradient, in each memory layout (NCHW, channels-last), in the step's precision; the best layout counts.
The attainable rate is the recorded convolutions' FLOPs over the sum of their best times: the speed of a step
that did nothing but the convolutions it needs, each in the best form this torch has for it on this machine.
A step's **% of attainable** is its achieved GFLOP/s (all counted FLOPs / step time) over that rate.
"""

from __future__ import annotations

import time
from collections import Counter

import torch
import torch.nn.functional as F

from kml.runtime.flops import ConvShape, conv_flops

__all__ = ["attainable_gflops", "time_convolution"]

LAYOUTS = {"nchw": torch.contiguous_format, "channels-last": torch.channels_last}


def time_convolution(shape: ConvShape, layout: str, dtype: torch.dtype, device: str, repeats: int = 3) -> float:
    """Best seconds of ``shape``'s forward + input and weight gradients in ``layout`` and ``dtype``."""
    g = torch.Generator(device="cpu").manual_seed(0)
    memory = LAYOUTS[layout]
    x = torch.randn(shape.input_shape, generator=g).to(device, dtype).contiguous(memory_format=memory)
    w = torch.randn(shape.weight_shape, generator=g).to(device, dtype).contiguous(memory_format=memory)
    x.requires_grad_(True)
    w.requires_grad_(True)
    grad_out = torch.randn(shape.output_shape, generator=g).to(device, dtype).contiguous(memory_format=memory)

    def once() -> None:
        out = F.conv2d(x, w, None, shape.stride, shape.padding, shape.dilation, shape.groups)
        torch.autograd.grad(out, (x, w), grad_out)

    once()  # warm-up: kernel choice, allocations
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        once()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def attainable_gflops(
    convolutions: Counter[ConvShape], dtype: torch.dtype, device: str
) -> tuple[float, dict[ConvShape, tuple[str, float]]]:
    """(attainable GFLOP/s, per shared shape: best layout and its GFLOP/s) for a step's ``convolutions``."""
    shared: Counter[ConvShape] = Counter()
    for shape, count in convolutions.items():
        shared[shape.shared()] += count
    total_flops, total_seconds, best = 0, 0.0, {}
    for shape, count in shared.items():
        seconds, layout = min((time_convolution(shape, name, dtype, device), name) for name in LAYOUTS)
        best[shape] = (layout, conv_flops(shape) / seconds / 1e9)
        total_flops += count * conv_flops(shape)
        total_seconds += count * seconds
    return total_flops / total_seconds / 1e9, best
