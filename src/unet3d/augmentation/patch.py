"""Training patches: a window of a volume, optionally seen through a fresh random augmentation."""

from __future__ import annotations

import numpy as np
import torch

import unet3d.augmentation.spatial as spatial
from unet3d.augmentation.config import AugmentationConfig
from unet3d.augmentation.intensity import random_intensity


def sample_patch(image: torch.Tensor, labels: torch.Tensor, center, shape, rng: np.random.Generator,
                 config: AugmentationConfig | None = None, spacing=(1.0, 1.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (C, *shape) float32 and labels (*shape) int64 of the window of `shape` around `center`.

    The window starts at floor(center + 0.5) - shape//2 (voxel round(center) sits at index
    shape//2). Outside the volume the image is mirrored and the labels are -1 (unlabeled). With
    augmentation the window is rotated, zoomed and deformed about that voxel and the gray values
    changed; every random number comes from `rng`, so one Generator per worker and iteration
    gives independent, reproducible streams.
    """
    shape = _check(image, labels, center, shape, spacing)
    if config is None or not config.enabled:
        image_patch, label_patch = spatial.crop(image, labels, center, shape)
        return image_patch.float(), label_patch.long()
    linear = spatial.random_linear_map(rng, config, spacing)
    displacement = spatial.random_elastic_field(rng, config, shape, spacing, device=image.device)
    flipped = spatial.flips_of(linear) if displacement is None else None
    if flipped is not None:  # nothing to interpolate: a copy is exact and, for many channels, far cheaper
        image_patch, label_patch = spatial.flipped_crop(image, labels, center, shape, flipped)
        image_patch = image_patch.float()
    else:
        image_patch, label_patch = spatial.sample_transformed(image, labels, center, shape, linear, displacement)
    return random_intensity(image_patch, rng, config), label_patch


def _check(image: torch.Tensor, labels: torch.Tensor, center, shape, spacing) -> tuple[int, int, int]:
    if image.dim() != 4:
        raise ValueError(f"image must be (C, Z, Y, X), got shape {tuple(image.shape)}")
    if tuple(labels.shape) != tuple(image.shape[1:]):
        raise ValueError(f"labels {tuple(labels.shape)} and image {tuple(image.shape[1:])} differ in shape")
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"patch shape must be three positive ints, got {shape}")
    if len(center) != 3 or len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"center and spacing must have three entries (spacing positive), got {center}, {spacing}")
    return shape
