"""Losses that learn from annotated voxels only: unlabeled voxels (target -1) have weight 0."""

from unet3d.losses.cross_entropy import weighted_cross_entropy
from unet3d.losses.dice import dice_cross_entropy, soft_dice_loss
from unet3d.losses.factory import LOSSES, make_loss

__all__ = ["LOSSES", "dice_cross_entropy", "make_loss", "soft_dice_loss", "weighted_cross_entropy"]
