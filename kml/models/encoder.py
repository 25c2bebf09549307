"""The task encoder: a small conv net over a task's support set, pooled to one embedding.

4 stride-2 conv blocks with batch-statistics BatchNorm, global average pooling
per image, then the mean over the set (no RNN aggregation). The published
KML/MMAML encoders also map each image's pooled features through
``Linear(8E, 128) + ReLU`` before the mean (``hidden=128``); kml's default
omits that layer (``hidden=None``). Optionally the one-hot labels enter as extra
constant channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kml.models.backbone import batch_norm, packed_forward

__all__ = ["one_hot", "packed_task_embedding", "TaskEncoder", "with_label_planes"]


def one_hot(labels: torch.Tensor, ways: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B]`` int labels -> ``[B, ways]`` one-hot; unlike ``F.one_hot`` it works under vmap."""
    return (labels.unsqueeze(-1) == torch.arange(ways, device=labels.device)).to(dtype)


def with_label_planes(images: torch.Tensor, labels: torch.Tensor | None, label_ways: int | None) -> torch.Tensor:
    """Images ``[..., C, H, W]`` with their one-hot labels ``[...]`` appended as constant planes:
    ``[..., C + label_ways, H, W]`` (unchanged when ``label_ways`` is None)."""
    if label_ways is None:
        return images
    if labels is None:
        raise ValueError("this task encoder reads labels; pass the support labels")
    planes = one_hot(labels, label_ways, images.dtype)[..., None, None].expand(
        *labels.shape, label_ways, *images.shape[-2:]
    )
    return torch.cat([images, planes], dim=-3)


class TaskEncoder(nn.Module):
    """Support set ``[B, C, H, W]`` (+ labels ``[B]``) -> task embedding ``[embedding_dim]``.

    Args:
        in_channels: image channels.
        channels: E; the blocks have E, 2E, 4E, 8E channels (``embedding_dim = 8E``).
        label_ways: when given, one-hot labels of this many classes are appended as channels.
        hidden: when given, ``Linear(8E, hidden) + ReLU`` per image before the mean over the set
            (``embedding_dim = hidden``), as the published encoders (128).
        default_init: keep PyTorch's default initialisation of the convs (the released codes); otherwise
            Xavier-uniform kernels and zero biases.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int = 32,
        label_ways: int | None = None,
        hidden: int | None = None,
        default_init: bool = False,
    ) -> None:
        super().__init__()
        self.label_ways = label_ways
        previous = in_channels + (label_ways or 0)
        for index in range(1, 5):
            out = channels * 2 ** (index - 1)
            conv = nn.Conv2d(previous, out, 3, padding=1)
            if not default_init:
                nn.init.xavier_uniform_(conv.weight)
                assert conv.bias is not None  # nn.Conv2d has a bias by default
                nn.init.zeros_(conv.bias)
            self.add_module(f"conv{index}", conv)
            self.add_module(f"norm{index}", nn.BatchNorm2d(out, track_running_stats=False))
            previous = out
        self.hidden: nn.Linear | None = None
        if hidden is not None:
            self.hidden = nn.Linear(previous, hidden)  # PyTorch's default initialisation, as published
            previous = hidden
        self.embedding_dim = previous

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Support images ``[B, C, H, W]`` (+ labels ``[B]``) -> embedding ``[embedding_dim]``."""
        x = with_label_planes(images, labels, self.label_ways)
        for index in range(1, 5):
            conv, norm = getattr(self, f"conv{index}"), getattr(self, f"norm{index}")
            x = F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)
            x = F.relu(batch_norm(x, norm.weight, norm.bias, fused=True))  # differentiated once only
        x = x.mean(dim=(-2, -1))  # average pool per image: [B, 8E]
        if self.hidden is not None:
            x = F.relu(F.linear(x, self.hidden.weight, self.hidden.bias))
        return x.mean(dim=0)  # then over the set

    def forward_tasks(
        self, params: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """T support sets at once (kml's packed backend): :func:`packed_task_embedding` of per-task ``params``
        ``[T, ...]`` -> ``[T, embedding_dim]`` (channels-last on a CPU, where it runs faster)."""
        return packed_task_embedding(params, images, labels, self.label_ways, images.device.type == "cpu")


def packed_task_embedding(
    params: dict[str, torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor | None,
    label_ways: int | None,
    channels_last: bool = False,
) -> torch.Tensor:
    """:class:`TaskEncoder` of T tasks at once: support sets ``[T, B, C, H, W]`` (+ labels ``[T, B]``) -> ``[T, embedding_dim]``.

    ``params``: the encoder's parameters by name, stacked per task ``[T, ...]``. Its blocks are
    the published backbone's (stride-2 conv, BatchNorm, ReLU), so :func:`packed_forward` runs them
    as grouped convolutions in the task-packed layout: as fast as ``vmap`` of the encoder in
    float32, and it runs under bf16 autocast, which ``vmap`` escapes (its convolution batching
    rule calls ``aten::convolution``, which autocast does not cast).
    """
    images = with_label_planes(images, labels, label_ways)
    convs = {name: value for name, value in params.items() if not name.startswith("hidden.")}
    features = packed_forward(
        convs, images, None, "published", channels_last=channels_last, pool="avgpool"
    )  # [T, B, 8E]
    if "hidden.weight" in params:  # per image, before the mean over the set
        features = F.relu(
            torch.einsum("tbd,thd->tbh", features, params["hidden.weight"]) + params["hidden.bias"].unsqueeze(1)
        )
    return features.mean(dim=1)
