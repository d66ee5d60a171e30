"""Softmax weighted cross-entropy on sparse targets (the paper's loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ w[t]·CE over annotated voxels / Σ w[t] over annotated voxels.

    logits (N, K, *S); target (N, *S) int64 class indices, -1 for unlabeled voxels; class_weights
    (K,) or None for all 1. Every voxel's weight is its class weight, times 0 where unlabeled, so
    unlabeled voxels get exactly zero gradient. Dividing by the summed weights (the convention of
    torch's `cross_entropy(weight=..., reduction="mean")`) makes the loss independent of how many
    voxels a patch happens to have annotated. A batch without annotated voxels gives 0, not NaN.
    """
    return cross_entropy_from_sums(*cross_entropy_sums(logits, target, class_weights))


def cross_entropy_sums(logits: torch.Tensor, target: torch.Tensor,
                       class_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ w[t]·CE, Σ w[t]) over the annotated voxels: the loss's two terms, which processes
    training on parts of one batch add up before forming the loss (training.distributed)."""
    labeled = target >= 0
    safe_target = target.clamp(min=0)
    voxel_ce = F.cross_entropy(logits, safe_target, reduction="none")
    weights = voxel_weights(safe_target, labeled, class_weights, voxel_ce.dtype)
    return (weights * voxel_ce).sum(), weights.sum()


def cross_entropy_from_sums(weighted: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """The loss from its sums; 0 (not NaN) when no voxel is annotated."""
    return weighted / torch.where(total > 0, total, torch.ones_like(total))


def voxel_weights(safe_target, labeled, class_weights, dtype) -> torch.Tensor:
    """Per-voxel weights: the class weight of the voxel's target, 0 at unlabeled voxels."""
    if class_weights is None:
        return labeled.to(dtype)
    class_weights = torch.as_tensor(class_weights, dtype=dtype, device=safe_target.device)
    return class_weights[safe_target] * labeled
