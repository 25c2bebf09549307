"""Data parallelism over the tasks of a meta-batch, under ``torchrun``.

Every rank draws the same meta-batch (same seed, same sampler state) and
keeps the tasks ``rank, rank + world, ...``; gradients are summed across
ranks after each rank scaled its loss by its share of the tasks, so the
update equals the single-process one. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kml.errors import KMLError, setting

__all__ = ["barrier", "DistInfo", "init_distributed", "resolve_device", "shutdown", "sum_gradients", "sum_tensor"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (no-op when run alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend)
    return info


def resolve_device(device: str, info: DistInfo) -> str:
    """``auto`` -> ``cuda`` when available; each rank takes its own GPU under torchrun."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and info.enabled:
        device = f"cuda:{info.local_rank}"
    if device.startswith("cuda"):  # checked here, before torch.load would call a missing GPU a corrupt file
        if not torch.cuda.is_available():
            raise KMLError(
                f"{setting('device', device)} asked for, but this machine has no usable CUDA GPU; use "
                f"{setting('device', 'cpu')} (or auto)"
            )
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise KMLError(
                f"{setting('device', device)}: this machine has {torch.cuda.device_count()} CUDA GPU(s); use "
                f"{setting('device', 'cuda:0')}"
            )
    return device


def sum_gradients(parameters: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Sum gradients over ranks, flattened into one all-reduce."""
    if not info.enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for parameter, grad in zip(parameters, grads):
        parameter.grad = flat[offset : offset + grad.numel()].view_as(grad)
        offset += grad.numel()


def sum_tensor(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor)
    return tensor


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
