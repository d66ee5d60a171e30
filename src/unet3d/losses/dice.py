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
    return dice_from_sums(*dice_sums(logits, target))


def dice_sums(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per class, over the annotated voxels: (Σ p·onehot, Σ p, Σ onehot), which processes training
    on parts of one batch add up before forming the loss (training.distributed)."""
    labeled = (target >= 0).unsqueeze(1)
    probabilities = torch.softmax(logits, dim=1) * labeled
    one_hot = (F.one_hot(target.clamp(min=0), logits.shape[1]).movedim(-1, 1) * labeled).to(probabilities.dtype)
    dims = [0, *range(2, logits.ndim)]
    return (probabilities * one_hot).sum(dims), probabilities.sum(dims), one_hot.sum(dims)


def dice_from_sums(intersection: torch.Tensor, predicted: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """1 − mean Dice over the classes with annotated voxels (0 with zero gradient when none has),
    without a data-dependent branch."""
    present = annotated > 0
    dice = 2 * intersection / torch.where(present, predicted + annotated, torch.ones_like(annotated))
    mean = (dice * present).sum() / present.sum().clamp(min=1)
    return torch.where(present.any(), 1 - mean, mean * 0)


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
