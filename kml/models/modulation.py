"""Modulation generators: task embedding -> per-layer modulation of the backbone.

Kernel ModuLation (KML), for conv ``l`` with kernel ``W_l [out, in, k, k]``::

    W'_l = W_l * reshape(1 + outer(v_l, u_l), W_l.shape)   # "residual" (identity when v = 0)
    W'_l = W_l * reshape(outer(v_l, u_l), W_l.shape)       # "bare", as the released code
    b'_l = b_l + beta_l

``(v_l, u_l)`` come from a linear map of the task embedding; the factor split
(the matricisation in which the modulation is rank 1) is ``(out, in*k*k)``
("plain") or, for layers 2-4, ``(k*out, k*in)`` ("published", the released
code's split; layer 1 stays ``(out, in*k*k)``). The reshape is row-major, so in
the published split one row of the factor matrix spans several kernels.

FiLM (MMAML), per block ``l``: activations ``x * (1 + gamma_l) + beta_l`` after BatchNorm.

Note: a per-output-channel scale or an additive shift *before* a batch-statistics
BatchNorm is normalised away. So KML's bias modulation ``beta_l`` has no effect
on the backbone here (it is kept because the method defines it), and FiLM
equals KML-with-``u``-constant only at the conv output, not after the BatchNorm.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kml.models.backbone import Modulation

__all__ = ["factor_shape", "film_as_kml", "FiLMGenerator", "kernel_factor", "KMLGenerator", "KMLLayer"]


def factor_shape(weight_shape: tuple[int, ...], layer: int, split: str) -> tuple[int, int]:
    """Rows and columns of the rank-1 factor matrix of conv ``layer`` (0-based) of kernel ``weight_shape``."""
    out, inp, kh, kw = weight_shape
    if split == "published" and layer > 0:
        if kh != kw:
            raise ValueError(f"the published factor split needs square kernels, got {kh}x{kw}")
        return kh * out, kw * inp
    return out, inp * kh * kw


def kernel_factor(v: torch.Tensor, u: torch.Tensor, weight_shape: tuple[int, ...], residual: bool) -> torch.Tensor:
    """``reshape([1 +] outer(v, u), weight_shape)``: the elementwise multiplier of a kernel."""
    matrix = v.unsqueeze(-1) * u.unsqueeze(-2)
    if residual:
        matrix = matrix + 1
    return matrix.reshape(*matrix.shape[:-2], *weight_shape)


def _linear(inputs: int, outputs: int, weight: float | None, bias: float | None) -> nn.Linear:
    """A linear layer; ``weight``/``bias`` given as numbers are constant-initialised."""
    layer = nn.Linear(inputs, outputs)
    if weight is not None:
        nn.init.constant_(layer.weight, weight)
    if bias is not None:
        nn.init.constant_(layer.bias, bias)
    return layer


class KMLLayer(nn.Module):
    """Generates ``(v, u, beta)`` of one conv layer from the task embedding."""

    def __init__(
        self,
        embedding_dim: int,
        rows: int,
        cols: int,
        out: int,
        residual: bool,
        identity_init: bool,
        default_init: bool = False,
    ) -> None:
        super().__init__()
        if default_init:  # PyTorch's default initialisation of all three, as the released KML code
            self.v, self.u, self.beta = (nn.Linear(embedding_dim, n) for n in (rows, cols, out))
            return
        if residual:
            # outer(v, u) = 0 at the start with v = 0; u stays non-zero so v still gets gradients.
            self.v = _linear(embedding_dim, rows, 0.0 if identity_init else None, 0.0 if identity_init else None)
            self.u = _linear(embedding_dim, cols, None, 1.0 if identity_init else None)
        else:
            # outer(v, u) = 1 at the start: constant ones, the embedding enters through the weights.
            self.v = _linear(embedding_dim, rows, 0.0 if identity_init else None, 1.0)
            self.u = _linear(embedding_dim, cols, 0.0 if identity_init else None, 1.0)
        self.beta = _linear(embedding_dim, out, 0.0 if identity_init else None, 0.0 if identity_init else None)

    def forward(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.v(embedding), self.u(embedding), self.beta(embedding)


class KMLGenerator(nn.Module):
    """Task embedding ``[D]`` -> KML modulation ``{"kernel{l}": [out, in, k, k], "bias{l}": [out]}``.

    With ``bias_after_norm`` the bias shift is emitted as ``"shift{l}": [out, 1, 1]`` instead, which the
    backbone adds after its BatchNorm, where batch statistics do not normalise it away (an ablation of the
    method as defined, whose bias acts before the BatchNorm).

    Args:
        embedding_dim: D.
        conv_shapes: kernel shapes of the modulated convs, in order.
        form: ``"residual"`` or ``"bare"``.
        split: ``"plain"`` or ``"published"`` (see :func:`factor_shape`).
        identity_init: start with the identity modulation (kernels unchanged, zero bias shift).
        default_init: PyTorch's default initialisation of every generator layer (overrides ``identity_init``).
    """

    def __init__(
        self,
        embedding_dim: int,
        conv_shapes: list[tuple[int, int, int, int]],
        form: str = "residual",
        split: str = "plain",
        identity_init: bool = True,
        default_init: bool = False,
        bias_after_norm: bool = False,
    ) -> None:
        super().__init__()
        self.conv_shapes = [tuple(shape) for shape in conv_shapes]
        self.bias_after_norm = bias_after_norm
        self.residual = form == "residual"
        self.split = split
        self.layers = nn.ModuleList(
            KMLLayer(
                embedding_dim, *factor_shape(shape, index, split), shape[0], self.residual, identity_init, default_init
            )
            for index, shape in enumerate(self.conv_shapes)
        )

    def factors(self, embedding: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(v_l, u_l, beta_l)`` per layer: ``[rows]``, ``[cols]``, ``[out]``."""
        return [layer(embedding) for layer in self.layers]

    def forward(self, embedding: torch.Tensor) -> Modulation:
        modulation: Modulation = {}
        for index, ((v, u, beta), shape) in enumerate(zip(self.factors(embedding), self.conv_shapes), start=1):
            modulation[f"kernel{index}"] = kernel_factor(v, u, shape, self.residual)
            if self.bias_after_norm:
                modulation[f"shift{index}"] = beta.unsqueeze(-1).unsqueeze(-1)
            else:
                modulation[f"bias{index}"] = beta
        return modulation


class FiLMGenerator(nn.Module):
    """Task embedding ``[D]`` -> FiLM modulation ``{"scale{l}": [C, 1, 1], "shift{l}": [C, 1, 1]}``.

    ``scale = 1 + gamma``, so ``identity_init`` (zero last layer) starts at the identity. Without it the
    layers keep PyTorch's default initialisation. MMAML generates ``(gamma, beta)`` of block ``l`` with one
    ``Linear(D, 2C_l)``; here they are two ``Linear(D, C_l)``: the same parameters, count and default
    initialisation (its bounds depend on the input width only), under other names.
    """

    def __init__(self, embedding_dim: int, channels: list[int], identity_init: bool = True) -> None:
        super().__init__()
        init = 0.0 if identity_init else None
        self.gamma = nn.ModuleList(_linear(embedding_dim, c, init, init) for c in channels)
        self.beta = nn.ModuleList(_linear(embedding_dim, c, init, init) for c in channels)

    def forward(self, embedding: torch.Tensor) -> Modulation:
        modulation: Modulation = {}
        for index, (gamma, beta) in enumerate(zip(self.gamma, self.beta), start=1):
            modulation[f"scale{index}"] = (1 + gamma(embedding)).unsqueeze(-1).unsqueeze(-1)
            modulation[f"shift{index}"] = beta(embedding).unsqueeze(-1).unsqueeze(-1)
        return modulation


def film_as_kml(
    scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The KML kernel factor and bias shift that reproduce FiLM applied to a conv's output.

    ``scale * conv(x, W, b) + shift == conv(x, W * M, b + beta)`` with ``M = outer(scale, 1)``
    (constant along the input axis) and ``beta = (scale - 1) * b + shift``. Shapes: ``scale``,
    ``shift``, ``bias`` ``[out]``; ``weight`` ``[out, in, k, k]``. Used by the tests to check
    that KML generalises FiLM.
    """
    ones = torch.ones(math.prod(weight.shape[1:]), dtype=weight.dtype, device=weight.device)
    return kernel_factor(scale, ones, tuple(weight.shape), residual=False), (scale - 1) * bias + shift
