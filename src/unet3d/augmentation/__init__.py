"""On-the-fly augmentation: every training patch is a freshly transformed view of the volume."""

from unet3d.augmentation.config import AugmentationConfig
from unet3d.augmentation.patch import sample_patch

__all__ = ["AugmentationConfig", "sample_patch"]
