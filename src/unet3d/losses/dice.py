"""Soft Dice over annotated voxels, combined with the weighted cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unet3d.losses.cross_entropy import weighted_cross_entropy


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − mean soft Dice over the classes present among the batch's annotated voxels.

    Only annotated voxels (target ≥ 0) enter the sums, so predictions at unlabeled voxels are
    neither rewarded nor penalised. Sums run over the whole batch (batch Dice), which is stable
    with the small, sparsely annotated patches this package trains on. A class with no annotated
    voxel in the batch is left out of the mean: its Dice would be 0/0 (or a constant 0 as soon as
    it is predicted anywhere), i.e. no information about its shape; predicting it at annotated
    voxels still lowers the Dice of the true classes and raises the cross-entropy. A batch with no
    annotated voxel gives 0 with zero gradient.
    """
    num_classes = logits.shape[1]
    labeled = (target >= 0).unsqueeze(1)
    probabilities = torch.softmax(logits, dim=1) * labeled
    one_hot = F.one_hot(target.clamp(min=0), num_classes).movedim(-1, 1) * labeled
    dims = [0, *range(2, logits.ndim)]
    intersection = (probabilities * one_hot).sum(dims)
    size_sum = probabilities.sum(dims) + one_hot.sum(dims)
    present = one_hot.sum(dims) > 0
    if not present.any():
        return (probabilities * 0).sum()
    dice = 2 * intersection[present] / size_sum[present]
    return 1 - dice.mean()


def dice_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    dice_weight: float = 1.0,
) -> torch.Tensor:
    """Weighted cross-entropy + dice_weight × soft Dice loss, both on annotated voxels only.

    Class weights apply to the cross-entropy; Dice needs none, as it already weighs each present
    class equally whatever its size.
    """
    return weighted_cross_entropy(logits, target, class_weights) + dice_weight * soft_dice_loss(logits, target)
