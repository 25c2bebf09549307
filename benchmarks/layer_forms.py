"""One backbone layer of T tasks (conv 3x3 stride 2 -> per-task BatchNorm -> ReLU, forward and backward) in the
forms a batched backend could run it, to choose between them on the machine at hand.

* ``packed``: kml's layout, activations ``[B, T*C, H, W]`` channels-last, one grouped convolution (``groups=T``) over
  per-task kernels, per-task BatchNorm as one fused ``batch_norm`` over the ``T*C`` channels;
* ``shared + elementwise norm``: one shared-weight convolution over ``[T*B, C, H, W]`` (what a ProtoNet backbone
  without per-task kernels, or a task encoder, could run), per-task statistics from a reduction over a view;
* ``shared + relayout``: the same convolution, then a copy into the packed layout for the fused BatchNorm and back;
* ``shared conv only``: the shared-weight convolution alone (the ceiling of the shared forms).

    python benchmarks/layer_forms.py                    # published layer 2 (32 -> 64 channels, 42 px), 10 tasks
    python benchmarks/layer_forms.py --bf16 --images 5  # a support set's pass, in bfloat16
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from kml.models.backbone import BN_EPS
from kml.runtime import tune_cpu_allocator


def best_ms(step, repeats: int) -> float:
    step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def task_norm(h: torch.Tensor, tasks: int) -> torch.Tensor:
    """Per-task BatchNorm of ``[T*B, C, H, W]`` (channels-last) from a ``[T, B*H*W, C]`` view."""
    n, c, height, width = h.shape
    view = h.permute(0, 2, 3, 1).reshape(tasks, -1, c)
    var, mean = torch.var_mean(view, dim=1, keepdim=True, correction=0)
    return ((view - mean) * torch.rsqrt(var + BN_EPS)).reshape(n, height, width, c).permute(0, 3, 1, 2)


def to_packed(h: torch.Tensor, tasks: int) -> torch.Tensor:
    """``[T*B, C, H, W]`` channels-last -> ``[B, T*C, H, W]`` channels-last (one copy)."""
    n, c, height, width = h.shape
    moved = h.permute(0, 2, 3, 1).reshape(tasks, n // tasks, height, width, c).permute(1, 2, 3, 0, 4).contiguous()
    return moved.reshape(n // tasks, height, width, tasks * c).permute(0, 3, 1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--images", type=int, default=75, help="images per task (75: a 5-way 15-query pass)")
    parser.add_argument("--in-channels", type=int, default=32)
    parser.add_argument("--out-channels", type=int, default=64)
    parser.add_argument("--side", type=int, default=42)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny configuration for CI (figures meaningless)")
    args = parser.parse_args()
    if args.smoke:
        args.tasks, args.images, args.in_channels, args.out_channels, args.side, args.repeats = 2, 3, 4, 8, 8, 1
    tune_cpu_allocator()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    tasks, images, c_in, c_out = args.tasks, args.images, args.in_channels, args.out_channels
    g = torch.Generator().manual_seed(0)
    last = torch.channels_last

    def leaf(*shape: int, memory=torch.contiguous_format) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype).contiguous(memory_format=memory).requires_grad_()

    shared_x = leaf(tasks * images, c_in, args.side, args.side, memory=last)
    weight, bias = leaf(c_out, c_in, 3, 3), leaf(c_out)
    packed_x = leaf(images, tasks * c_in, args.side, args.side, memory=last)
    packed_w, packed_b = leaf(tasks * c_out, c_in, 3, 3), leaf(tasks * c_out)

    def run(forward, inputs):
        def step() -> None:
            torch.autograd.grad(forward().sum(), inputs)

        return step

    def conv(x, w, b, groups=1):
        return F.conv2d(x, w, b, stride=2, padding=1, groups=groups)

    forms = {
        "packed (grouped conv, fused norm)": run(
            lambda: F.relu(F.batch_norm(conv(packed_x, packed_w, packed_b, tasks), None, None, training=True)),
            (packed_x, packed_w, packed_b),
        ),
        "shared + elementwise norm": run(
            lambda: F.relu(task_norm(conv(shared_x, weight, bias), tasks)), (shared_x, weight, bias)
        ),
        "shared + relayout + fused norm": run(
            lambda: F.relu(F.batch_norm(to_packed(conv(shared_x, weight, bias), tasks), None, None, training=True)),
            (shared_x, weight, bias),
        ),
        "shared conv only": run(lambda: conv(shared_x, weight, bias), (shared_x, weight, bias)),
    }
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {dtype}: {tasks} tasks x {images} images, "
        f"{c_in} -> {c_out} channels, {args.side} px, forward + backward, best of {args.repeats}"
    )
    for name, step in forms.items():
        print(f"{name:<36}{best_ms(step, args.repeats):>9.1f} ms")


if __name__ == "__main__":
    main()
