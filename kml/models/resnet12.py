"""ResNet-12, the backbone of most few-shot papers since TADAM and MetaOptNet (widths 64-160-320-640).

Four residual blocks, each three ``conv3x3 -> BatchNorm -> LeakyReLU(0.1)`` (no ReLU after the third
BatchNorm), a ``conv1x1 -> BatchNorm`` shortcut, the sum, a LeakyReLU and a 2x2 max-pool. Convolutions
have no bias. BatchNorm uses the statistics of the batch it is given (no running statistics), as every
kml backbone. No DropBlock: the MAML-style learners adapt every weight per task, where it has not been
used. Written with ordinary modules, so :func:`kml.modulate` and ``torch.func.functional_call`` apply.
"""

from __future__ import annotations

import torch
from torch import nn

from kml.errors import KMLError

__all__ = ["ResNet12", "resnet12_widths"]


def resnet12_widths(base_channels: int = 32) -> tuple[int, int, int, int]:
    """Block widths ``2C, 5C, 10C, 20C``: the usual ``64-160-320-640`` at ``C = 32``."""
    return (2 * base_channels, 5 * base_channels, 10 * base_channels, 20 * base_channels)


def _norm(channels: int, affine: bool) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, affine=affine, track_running_stats=False)


class ResidualBlock(nn.Module):
    """Three 3x3 conv layers with a 1x1 shortcut, then LeakyReLU and a 2x2 max-pool: ``[B, in, H, W] -> [B, out, H/2, W/2]``."""

    def __init__(self, in_channels: int, out_channels: int, affine: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = _norm(out_channels, affine)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(out_channels, affine)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm3 = _norm(out_channels, affine)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), _norm(out_channels, affine))
        self.activation = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.activation(self.norm1(self.conv1(x)))
        out = self.activation(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.pool(self.activation(out + self.shortcut(x)))


class ResNet12(nn.Module):
    """ResNet-12: images ``[B, C, H, W]`` -> features ``[B, feature_dim]`` or, with ``ways``, logits ``[B, ways]``.

    Args:
        in_channels: image channels.
        widths: the four blocks' channels (default 64-160-320-640; see :func:`resnet12_widths`).
        ways: size of a linear head (MAML); ``None`` for a feature extractor (ProtoNet).
        pool: ``"avgpool"`` (spatial mean of the last map, ``widths[-1]`` features) or ``"flatten"``.
        image_size: image side, needed to size the head for ``pool="flatten"``.
        affine: BatchNorm with a learned scale and shift.
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: tuple[int, ...] = (64, 160, 320, 640),
        ways: int | None = None,
        pool: str = "avgpool",
        image_size: int = 84,
        affine: bool = True,
    ) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"ResNet-12 has 4 blocks; got {len(widths)} widths")
        if pool not in ("avgpool", "flatten"):
            raise ValueError(f"unknown pool {pool!r}; choose avgpool or flatten")
        self.pool = pool
        self.image_size = image_size
        previous, side = in_channels, image_size
        blocks = []
        for width in widths:
            blocks.append(ResidualBlock(previous, width, affine))
            previous, side = width, side // 2
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = widths[-1] * (1 if pool == "avgpool" else side * side)
        self.head = nn.Linear(self.feature_dim, ways) if ways is not None else None
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu", a=0.1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> features ``[B, feature_dim]``."""
        if self.pool == "flatten" and x.shape[-1] // 16 != self.image_size // 16:  # the head is sized for one side
            raise KMLError(
                f"ResNet12(pool='flatten') was built for {self.image_size}px images, its head for that side's "
                f"features; got {x.shape[-1]}px images: build it with image_size={x.shape[-1]}, or pool='avgpool'"
            )
        x = self.blocks(x)
        return x.mean(dim=(2, 3)) if self.pool == "avgpool" else x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> logits ``[B, ways]`` (with a head) or features ``[B, feature_dim]``."""
        features = self.features(x)
        return features if self.head is None else self.head(features)
