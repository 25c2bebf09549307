"""The 4-block convolutional backbone, written with functional ops on its own parameters.

Every tensor the forward pass uses is read from the module's attributes at call
time, so :func:`torch.func.functional_call` can substitute per-task (adapted,
batched, perturbed) parameters, and the same code runs per task under
:func:`torch.func.vmap`, where per-task kernels become one grouped convolution.

A block is ``conv3x3 -> BatchNorm (batch statistics) -> FiLM -> ReLU [-> max-pool]``.
BatchNorm always normalises with the statistics of the images passed in (one
task's support or query set): no running statistics are kept, as in MAML.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Backbone", "batch_norm", "block_channels", "BN_EPS", "Modulation", "output_side", "packed_forward"]

# A modulation is a flat dict of tensors (a pytree, so it passes through vmap):
#   "kernel{l}" [out, in, k, k] multiplies conv l's kernel (KML)
#   "bias{l}"   [out]           is added to conv l's bias (KML)
#   "scale{l}"  [out, 1, 1]     multiplies block l's normalised activations (FiLM)
#   "shift{l}"  [out, 1, 1]     is added to them (FiLM; KML's bias with kml_bias="after_norm")
Modulation = dict[str, torch.Tensor]

BN_EPS = 1e-5


def batch_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, fused: bool = False, eps: float = BN_EPS
) -> torch.Tensor:
    """BatchNorm of ``x [B, C, H, W]`` with the batch's own statistics and an affine ``[C]`` transform
    (none when ``weight`` and ``bias`` are ``None``: non-affine BatchNorm).

    ``fused=False`` writes it with elementary ops: in torch 2.14 the *batching rule* of
    ``F.batch_norm``'s double backward under ``vmap`` gives wrong second-order meta-gradients
    for the conv kernels below it (off by ~1e-3; tests/test_algorithms.py catches it). So the
    ``vmap`` and reference paths use the fused kernel only where nothing is differentiated twice
    (ProtoNet, first-order MAML, the task encoder); :func:`packed_forward`, which runs outside
    ``vmap``, always uses it. The fused kernel is one pass over the activations instead of about six.
    """
    if fused:
        return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = (x - mean).pow(2).mean(dim=(0, 2, 3), keepdim=True)
    normed = (x - mean) * torch.rsqrt(var + eps)
    if weight is None or bias is None:
        return normed
    return normed * weight[:, None, None] + bias[:, None, None]


class _ContiguousGradient(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous (differentiable, so second order works)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ARG004 - autograd.Function signature
        return grad.contiguous()


def block_channels(base_channels: int, layout: str) -> list[int]:
    """Output channels of the 4 blocks: ``C, 2C, 4C, 8C`` (published) or ``C`` x 4 (conv4)."""
    if layout == "published":
        return [base_channels * 2**i for i in range(4)]
    return [base_channels] * 4


def output_side(image_size: int, layout: str) -> int:
    """Spatial side after the 4 blocks (stride-2 convs with padding 1, or 2x2 max-pools)."""
    side = image_size
    for _ in range(4):
        side = (side + 1) // 2 if layout == "published" else side // 2
    return side


class Backbone(nn.Module):
    """Four 3x3 conv blocks and an optional linear ``ways``-way head.

    Args:
        in_channels: image channels.
        base_channels: C (see :func:`block_channels`).
        image_size: image side, to size the head.
        layout: ``"published"`` (stride 2, no pooling) or ``"conv4"`` (stride 1, 2x2 max-pool).
        ways: size of the linear head; ``None`` for a feature extractor (ProtoNet).
        pool: ``"flatten"`` (features ``[8C*s*s]``) or ``"avgpool"`` (spatial mean, ``[8C]``, MMAML's MAML head).
        affine: BatchNorm with a learned scale and shift (``False``: none, as MMAML's backbones).
    """

    def __init__(
        self,
        in_channels: int,
        base_channels: int,
        image_size: int,
        layout: str = "published",
        ways: int | None = None,
        pool: str = "flatten",
        affine: bool = True,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.pool = pool
        self.stride = 2 if layout == "published" else 1
        # The fused BatchNorm kernel is only exact when the backbone is differentiated once (see batch_norm).
        self.fused_norm = False
        channels = block_channels(base_channels, layout)
        previous = in_channels
        for index, out in enumerate(channels, start=1):
            conv = nn.Conv2d(previous, out, 3, padding=1)
            nn.init.xavier_uniform_(conv.weight)  # as MMAML initialises its gated conv net
            assert conv.bias is not None  # nn.Conv2d has a bias by default
            nn.init.zeros_(conv.bias)
            self.add_module(f"conv{index}", conv)
            # Holds the affine BatchNorm parameters only; statistics always come from the batch.
            self.add_module(f"norm{index}", nn.BatchNorm2d(out, affine=affine, track_running_stats=False))
            previous = out
        self.channels = channels
        self.feature_dim = channels[-1] * (1 if pool == "avgpool" else output_side(image_size, layout) ** 2)
        self.head: nn.Linear | None = None
        if ways is not None:
            self.head = nn.Linear(self.feature_dim, ways)
            nn.init.xavier_uniform_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    @property
    def conv_shapes(self) -> list[tuple[int, int, int, int]]:
        """Kernel shapes ``[out, in, k, k]`` of the 4 convs (what a KML generator modulates)."""
        return [tuple(getattr(self, f"conv{i}").weight.shape) for i in range(1, 5)]

    def features(self, x: torch.Tensor, modulation: Modulation | None = None) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> features ``[B, feature_dim]`` (the last map flattened or averaged)."""
        for index in range(1, 5):
            conv, norm = getattr(self, f"conv{index}"), getattr(self, f"norm{index}")
            weight, bias = conv.weight, conv.bias
            if modulation is not None and f"kernel{index}" in modulation:
                weight = weight * modulation[f"kernel{index}"]
            if modulation is not None and f"bias{index}" in modulation:
                bias = bias + modulation[f"bias{index}"]
            x = F.conv2d(x, weight, bias, stride=self.stride, padding=1)
            x = batch_norm(x, norm.weight, norm.bias, self.fused_norm)
            if modulation is not None and f"scale{index}" in modulation:
                x = x * modulation[f"scale{index}"]
            if modulation is not None and f"shift{index}" in modulation:
                x = x + modulation[f"shift{index}"]
            x = F.relu(x)
            if self.layout == "conv4":
                x = F.max_pool2d(x, 2)
        if self.pool == "avgpool":
            return x.mean(dim=(2, 3))
        return x.flatten(1)

    def forward(self, x: torch.Tensor, modulation: Modulation | None = None) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> logits ``[B, ways]`` (with a head) or features ``[B, feature_dim]``."""
        features = self.features(x, modulation)
        if self.head is None:
            return features
        return F.linear(features, self.head.weight, self.head.bias)

    def forward_tasks(
        self, params: dict[str, torch.Tensor], x: torch.Tensor, modulation: Modulation | None, *, inner: bool = False
    ) -> torch.Tensor:
        """T tasks at once (kml's packed backend): :func:`packed_forward` of per-task ``params`` ``[T, ...]`` on
        ``x [T, B, C, H, W]`` -> ``[T, B, ...]``, equal to :meth:`forward` per task.

        Channels-last on a CPU (oneDNN's grouped convolutions run faster so; benchmarks/README.md, "Design
        measurements"), except in MAML's inner loop (``inner``), whose double backward runs slower in that layout.
        """
        channels_last = x.device.type == "cpu" and not inner
        return packed_forward(params, x, modulation, self.layout, channels_last=channels_last, pool=self.pool)


def packed_forward(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    modulation: Modulation | None,
    layout: str,
    fused_norm: bool = True,
    channels_last: bool = False,
    pool: str = "flatten",
) -> torch.Tensor:
    """The backbone of T tasks at once, in a task-packed layout, from per-task parameters.

    ``params``: the backbone's parameters by name (``conv1.weight`` ...), each stacked per task
    ``[T, ...]``; ``x``: images ``[T, B, C, H, W]``; ``modulation``: as :class:`Backbone` takes it,
    stacked per task. Returns logits ``[T, B, ways]`` (with a head) or features ``[T, B, D]``.

    Activations stay ``[B, T*C, H, W]`` from the first layer to the last: a grouped convolution
    (``groups=T``) reads and writes that layout directly, and per-task BatchNorm is plain
    BatchNorm over the ``T*C`` channels, so nothing is relaid out between layers (what ``vmap``'s
    batching rules do around every convolution). Equal to :meth:`Backbone.forward` per task.
    ``channels_last``: lay the activations out ``[B, H, W, T*C]`` in memory (the same tensor
    values), which oneDNN's grouped convolutions run faster for a forward and backward pass
    (not for the double backward of second-order MAML; benchmarks/README.md, "Design measurements").
    Features then come flattened in ``(H, W, C)`` order per task, a fixed permutation of
    :meth:`Backbone.features`'s ``(C, H, W)`` that distances do not see and that the head's
    columns are permuted to match (same logits): flattening in memory order lets the gradient
    return channels-last (the ``(C, H, W)`` copy sent it back in the default layout, where the
    last ReLU's backward is much slower).
    ``pool="avgpool"``: features are the spatial mean of the last map ``[T, B, 8C]`` (no permutation).
    Non-affine BatchNorm: ``params`` holds no ``norm{l}.weight`` / ``norm{l}.bias``.
    """
    tasks, batch, channels = x.shape[:3]
    stride = 2 if layout == "published" else 1
    if torch.is_autocast_enabled(x.device.type) and x.dtype == torch.float32:
        # The first convolution would cast anyway (autocast casts float32 only): casting first halves
        # the relayout copy below.
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if channels_last:  # one copy into [B, H, W, T, C] order, viewed as [B, T*C, H, W]
        h = x.permute(1, 3, 4, 0, 2).reshape(batch, *x.shape[3:], tasks * channels).permute(0, 3, 1, 2)
    else:
        h = x.transpose(0, 1).reshape(batch, tasks * channels, *x.shape[3:])
    for index in range(1, 5):
        weight, bias = params[f"conv{index}.weight"], params[f"conv{index}.bias"]
        if modulation is not None and f"kernel{index}" in modulation:
            weight = weight * modulation[f"kernel{index}"]
        if modulation is not None and f"bias{index}" in modulation:
            bias = bias + modulation[f"bias{index}"]
        weight = weight.reshape(-1, *weight.shape[2:])
        if channels_last:
            # A convolution on channels-last activations returns its weight gradient channels-last too;
            # MAML's inner loop, differentiated again, would then mix layouts (slow strided reductions).
            weight = _ContiguousGradient.apply(weight)
        h = F.conv2d(h, weight, bias.reshape(-1), stride=stride, padding=1, groups=tasks)
        norm_weight, norm_bias = params.get(f"norm{index}.weight"), params.get(f"norm{index}.bias")
        if norm_weight is not None and norm_bias is not None:
            norm_weight, norm_bias = norm_weight.reshape(-1), norm_bias.reshape(-1)
        h = batch_norm(h, norm_weight, norm_bias, fused_norm)
        if modulation is not None and f"scale{index}" in modulation:
            h = h * modulation[f"scale{index}"].reshape(1, -1, 1, 1)
        if modulation is not None and f"shift{index}" in modulation:
            h = h + modulation[f"shift{index}"].reshape(1, -1, 1, 1)
        h = F.relu(h)
        if layout == "conv4":
            h = F.max_pool2d(h, 2)
    head = params.get("head.weight")
    if pool == "avgpool":  # spatial mean: [B, T*C] -> [T, B, C], the same in either memory layout
        features = h.mean(dim=(2, 3)).reshape(batch, tasks, -1).transpose(0, 1)
    elif channels_last:  # [B, s, s, T, C] in memory -> [T, B, s*s*C]
        out_channels = h.shape[1] // tasks
        features = (
            h.permute(0, 2, 3, 1).reshape(batch, -1, tasks, out_channels).permute(2, 0, 1, 3).reshape(tasks, batch, -1)
        )
        if head is not None:  # the head's columns reordered to match: [T, N, C*s*s] -> [T, N, s*s*C]
            head = head.reshape(*head.shape[:2], out_channels, -1).transpose(-1, -2).reshape(head.shape)
    else:
        features = h.reshape(batch, tasks, -1).transpose(0, 1)  # [T, B, C*s*s], each task flattened as features()
    if head is None:
        return features
    return torch.einsum("tbd,tnd->tbn", features, head) + params["head.bias"].unsqueeze(1)
