"""Random gray-value changes: gamma, contrast and brightness, drawn per channel.

They act on the image only (labels are untouched by construction) and on normalized intensities
(zero mean / unit std or [0, 1]), so the brightness shift is in those units.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from unet3d.augmentation.config import AugmentationConfig


def random_intensity(image: torch.Tensor, rng: np.random.Generator, config: AugmentationConfig) -> torch.Tensor:
    """A (C, Z, Y, X) patch with a random gamma curve, slope and offset applied to each channel."""
    channels = image.shape[0]
    gamma = np.exp(rng.uniform(math.log(config.gamma[0]), math.log(config.gamma[1]), size=channels))
    slope = rng.uniform(*config.intensity_scale, size=channels)
    shift = rng.uniform(*config.intensity_shift, size=channels)
    if np.all(gamma == 1.0) and np.all(slope == 1.0) and np.all(shift == 0.0):
        return image  # switched off (flips-only training): spare a pass over every channel
    out = image.clone()
    for channel, g, a, b in zip(out, gamma, slope, shift):
        apply_gamma_(channel, float(g)).mul_(float(a)).add_(float(b))
    return out


def apply_gamma_(channel: torch.Tensor, gamma: float) -> torch.Tensor:
    """In place: gamma curve on the channel's own min-max range, so negative (z-scored) values work too."""
    low, high = channel.min(), channel.max()
    if gamma == 1.0 or high <= low:
        return channel
    return channel.sub_(low).div_(high - low).pow_(gamma).mul_(high - low).add_(low)
