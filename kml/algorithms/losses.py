"""Per-task heads: the MAML classifier loss and the prototypical loss (pure functions of features)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kml.errors import KMLError
from kml.models.encoder import one_hot

__all__ = [
    "accuracy",
    "cross_entropy",
    "distance_logits",
    "prototypes",
    "prototypical_loss",
    "refine_prototypes",
    "refine_prototypes_as_released",
    "squared_distances",
]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of ``argmax(logits [..., B, N]) == labels [..., B]`` per leading index, detached (no host sync)."""
    # float32, not logits.dtype: under bf16 autocast a bf16 mean would round every task's accuracy.
    return (logits.detach().argmax(dim=-1) == labels).float().mean(dim=-1)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits [..., B, N]`` against ``labels [..., B]``, per leading index."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits: log-softmax in float32
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return losses.view(labels.shape).mean(dim=-1)


def distance_logits(queries: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``[..., B, D]`` x ``[..., N, D]`` -> ``[..., B, N]`` logits ``2 q.p - |p|^2``, in float32 at least.

    That is ``-|q - p|^2`` plus ``|q|^2``, a constant per query, which softmax, cross-entropy and
    argmax do not see (nor their gradients): ProtoNet's logits without the ``|q|^2`` pass over every
    query feature and its backward. One matrix product instead of a ``[..., B, N, D]`` difference
    tensor (at the published setup that tensor and its backward were a third of a ProtoNet step).
    float32 even under bf16 autocast, where rounding the cross term would lose small differences
    (with TF32 matmuls enabled on a GPU, ``torch.backends.cuda.matmul.allow_tf32``, the cross term
    is rounded like bf16; kml leaves that switch at torch's default, off).
    """
    dtype = torch.promote_types(torch.promote_types(queries.dtype, prototypes.dtype), torch.float32)
    with torch.autocast(queries.device.type, enabled=False):
        queries, prototypes = queries.to(dtype), prototypes.to(dtype)
        return 2 * (queries @ prototypes.transpose(-1, -2)) - prototypes.pow(2).sum(dim=-1).unsqueeze(-2)


def squared_distances(queries: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``[..., B, D]`` x ``[..., N, D]`` -> ``[..., B, N]`` squared Euclidean distances, in float32 at least.

    ``|q|^2 - distance_logits(q, p)``, clamped at 0 (see :func:`distance_logits`).
    """
    logits = distance_logits(queries, prototypes)
    with torch.autocast(queries.device.type, enabled=False):
        return (queries.to(logits.dtype).pow(2).sum(dim=-1, keepdim=True) - logits).clamp(min=0)


def prototypes(features: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """Class means of support features ``[..., N*K, D]`` with labels ``[..., N*K]`` -> ``[..., N, D]``."""
    assignment = one_hot(labels, ways, features.dtype)  # [N*K, N]
    return (assignment.transpose(-1, -2) @ features) / assignment.sum(dim=-2).unsqueeze(-1)


def refine_prototypes(
    prototypes: torch.Tensor, support_features: torch.Tensor, support_y: torch.Tensor, query_features: torch.Tensor
) -> torch.Tensor:
    """One soft k-means step (Ren et al. 2018): every support image keeps its hard label, every query
    image joins each class with its softmax weight under the current prototypes.

    ``p_c = (sum_{s: y_s = c} f_s + sum_q w_qc f_q) / (K_c + sum_q w_qc)``.
    Unlike the released KML code this uses all K support images of a class (it drops the last one,
    so 1-shot ignores the support) and pairs support blocks with classes by their label, not order.
    """
    ways = prototypes.shape[-2]
    hard = one_hot(support_y, ways, support_features.dtype)  # [N*K, N]
    soft = torch.softmax(distance_logits(query_features, prototypes), dim=-1)  # [N*Q, N]
    total = hard.transpose(-1, -2) @ support_features + soft.transpose(-1, -2) @ query_features
    count = hard.sum(dim=-2) + soft.sum(dim=-2)
    return total / count.unsqueeze(-1)


def refine_prototypes_as_released(
    prototypes: torch.Tensor, support_features: torch.Tensor, query_features: torch.Tensor
) -> torch.Tensor:
    """The released KML code's refinement step (``scripts/trainer.py`` lines 166-168 and 123-134), kept to
    reproduce its numbers: ``p_j = (sum of the first K-1 images of support block j + sum_q w_qj f_q) / (K + sum_q w_qj)``.

    The support ``[..., N*K, D]`` is read as N consecutive blocks of K images and block j is paired with prototype
    row j whatever its labels (the released loader lays blocks out by first appearance of their label); each
    block's last image is dropped but still counted in the ``K`` of the denominator, so 1-shot ignores the support.
    ``prototypes [..., N, D]``, ``query_features [..., M, D]`` -> ``[..., N, D]``.
    """
    ways = prototypes.shape[-2]
    if support_features.shape[-2] % ways:
        raise KMLError(
            f"the released refinement reads the support as {ways} blocks of K images; "
            f"{support_features.shape[-2]} support images do not split so"
        )
    blocks = support_features.unflatten(-2, (ways, -1))  # [..., N, K, D]
    shots = blocks.shape[-2]
    kept = blocks[..., : shots - 1, :].sum(dim=-2)  # [..., N, D]: the released slice j*K:(j+1)*K-1
    soft = torch.softmax(distance_logits(query_features, prototypes), dim=-1)  # [..., M, N]
    total = kept + soft.transpose(-1, -2) @ query_features
    return total / (shots + soft.sum(dim=-2)).unsqueeze(-1)


def prototypical_loss(
    support_features: torch.Tensor,
    support_y: torch.Tensor,
    query_features: torch.Tensor,
    query_y: torch.Tensor,
    ways: int,
    refine: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``-squared distance`` to (optionally refined) prototypes; returns (loss, accuracy).

    The logits are :func:`distance_logits`: ``-squared distance`` up to a per-query constant.

    Shapes ``[..., N*K, D]``, ``[..., N*K]``, ``[..., N*Q, D]``, ``[..., N*Q]``: one task, or ``[T, ...]`` tasks."""
    centres = prototypes(support_features, support_y, ways)
    if refine:
        centres = refine_prototypes(centres, support_features, support_y, query_features)
    logits = distance_logits(query_features, centres)
    return cross_entropy(logits, query_y), accuracy(logits, query_y)
