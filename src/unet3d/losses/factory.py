"""Choose a loss by name, as the command line and model files refer to it."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from unet3d.losses.cross_entropy import weighted_cross_entropy
from unet3d.losses.dice import dice_cross_entropy

LOSSES = ("ce", "dice_ce")


def make_loss(
    name: str, class_weights=None, dice_weight: float = 1.0
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """loss(logits, target) for "ce" (the paper's weighted cross-entropy) or "dice_ce" (+ soft Dice)."""
    weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
    if name == "ce":
        return functools.partial(weighted_cross_entropy, class_weights=weights)
    if name == "dice_ce":
        return functools.partial(dice_cross_entropy, class_weights=weights, dice_weight=dice_weight)
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
