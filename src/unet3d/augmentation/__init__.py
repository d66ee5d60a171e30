"""On-the-fly augmentation: every training patch is a freshly transformed view of the volume."""

from unet3d.augmentation.config import AugmentationConfig
from unet3d.augmentation.patch import PatchCut, cut_patch, draw_augmentation, finish_patch, sample_patch

__all__ = ["AugmentationConfig", "PatchCut", "cut_patch", "draw_augmentation", "finish_patch", "sample_patch"]
