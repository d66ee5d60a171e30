"""Instance labels (one id per object) from unet3d's class probabilities."""

from unet3d.instances.blockwise import instances_blockwise
from unet3d.instances.watershed import KINDS, InstanceMethod, instances_from_probabilities

__all__ = ["KINDS", "InstanceMethod", "instances_blockwise", "instances_from_probabilities"]
