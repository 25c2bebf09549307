"""bf16 autocast where the hardware computes bf16 natively, refused where it would be emulated."""

from __future__ import annotations

import platform
from contextlib import AbstractContextManager, nullcontext

import torch

from kml.errors import KMLError

__all__ = ["autocast", "bf16_native", "check_bf16", "float32_inner_loop"]


def bf16_native(device: str | torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware.

    CUDA: bf16 without emulation (Ampere or newer). x86 CPUs: AVX512-BF16 or AMX (oneDNN's bf16
    on plain AVX-512 converts to float32 and runs slower than float32). Other CPUs (ARM): oneDNN's
    own bf16 check.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_bf16(device: str | torch.device) -> None:
    """One-line error when bf16 autocast is asked for on a device that would only emulate it (slower, not faster)."""
    if not bf16_native(device):
        raise KMLError(
            f"--bf16 needs bf16 arithmetic in hardware (a CUDA GPU from Ampere on, or a CPU with AVX512-BF16 or AMX); "
            f"{torch.device(device)} would emulate it and run slower; drop --bf16 (resuming: add --no-bf16)"
        )


def float32_inner_loop(device_type: str) -> AbstractContextManager:
    """Autocast off inside a MAML inner loop, when it is on around it.

    The inner steps amplify bf16 rounding of the support-set gradients (sums of cancelling
    per-image terms over a handful of images), so the loop runs in float32, which costs little of
    bf16's speed; the query pass stays in bf16. The figures: benchmarks/README.md, "Design measurements".
    """
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()


def autocast(device: str | torch.device, bf16: bool) -> AbstractContextManager:
    """bf16 autocast on ``device`` when ``bf16``, else nothing.

    Convolutions and matrix products run in bf16 and BatchNorm on bf16 activations (accumulating
    in float32), except in MAML's inner loop (:func:`float32_inner_loop`); losses, prototype distances (:func:`kml.algorithms.losses.distance_logits`) and
    accuracies are float32, and the parameters and optimiser state are float32 throughout.
    """
    if not bf16:
        return nullcontext()
    return torch.autocast(torch.device(device).type, torch.bfloat16)
