"""Choose a loss by name, as the command line and model files refer to it."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from unet3d.losses.cross_entropy import weighted_cross_entropy
from unet3d.losses.dice import dice_cross_entropy

LOSSES = ("ce", "dice_ce")


def make_loss(
    name: str, class_weights=None, dice_weight: float = 1.0, pseudo_label_weight: float = 0.0
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """loss(logits, target) for "ce" (the paper's weighted cross-entropy) or "dice_ce" (+ soft Dice).

    With `pseudo_label_weight` > 0, targets K + c mark voxels another model labelled c
    (`with_pseudo_labels`)."""
    weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
    if name == "ce":
        loss = functools.partial(weighted_cross_entropy, class_weights=weights)
    elif name == "dice_ce":
        loss = functools.partial(dice_cross_entropy, class_weights=weights, dice_weight=dice_weight)
    else:
        raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
    if pseudo_label_weight > 0:
        return functools.partial(with_pseudo_labels, loss, class_weights=weights, weight=pseudo_label_weight)
    return loss


def with_pseudo_labels(loss, logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None,
                       weight: float) -> torch.Tensor:
    """`loss` on the annotated voxels (targets 0..K-1) + `weight` × the weighted cross-entropy on
    the pseudo-labelled ones (targets K..2K-1: class target - K, labelled by another model, e.g. the
    random forest where the annotation is silent). -1 stays unlabeled for both."""
    num_classes = logits.shape[1]
    pseudo = target >= num_classes
    annotated = torch.where(pseudo, -1, target)
    return loss(logits, annotated) + weight * weighted_cross_entropy(
        logits, torch.where(pseudo, target - num_classes, -1), class_weights)
