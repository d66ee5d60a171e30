"""Random gray-value changes: gamma, contrast and brightness, drawn per channel.

They act on the image only (labels are untouched by construction) and on normalized intensities
(zero mean / unit std or [0, 1]), so the brightness shift is in those units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from unet3d.augmentation.config import AugmentationConfig


@dataclass(frozen=True)
class Intensity:
    """One patch's per-channel gamma, slope and offset: plain numbers, applied on any device."""

    gamma: tuple[float, ...]
    slope: tuple[float, ...]
    shift: tuple[float, ...]


def draw_intensity(rng: np.random.Generator, config: AugmentationConfig, channels: int) -> Intensity | None:
    """Random gamma, slope and offset per channel; None when all are neutral (flips-only training
    spares a pass over every channel)."""
    gamma = np.exp(rng.uniform(math.log(config.gamma[0]), math.log(config.gamma[1]), size=channels))
    slope = rng.uniform(*config.intensity_scale, size=channels)
    shift = rng.uniform(*config.intensity_shift, size=channels)
    if np.all(gamma == 1.0) and np.all(slope == 1.0) and np.all(shift == 0.0):
        return None
    return Intensity(*(tuple(float(v) for v in values) for values in (gamma, slope, shift)))


def apply_intensity(image: torch.Tensor, intensity: Intensity | None) -> torch.Tensor:
    """A (C, Z, Y, X) patch with each channel's gamma curve, slope and offset applied (a copy)."""
    if intensity is None:
        return image
    out = image.clone()
    for channel, g, a, b in zip(out, intensity.gamma, intensity.slope, intensity.shift):
        apply_gamma_(channel, g).mul_(a).add_(b)
    return out


def random_intensity(image: torch.Tensor, rng: np.random.Generator, config: AugmentationConfig) -> torch.Tensor:
    """A (C, Z, Y, X) patch with a random gamma curve, slope and offset applied to each channel."""
    return apply_intensity(image, draw_intensity(rng, config, image.shape[0]))


def apply_gamma_(channel: torch.Tensor, gamma: float) -> torch.Tensor:
    """In place: gamma curve on the channel's own min-max range, so negative (z-scored) values work too.

    Without a data-dependent branch (a constant channel divides by 1 and stays as it is), so on a
    GPU nothing waits for the device.
    """
    if gamma == 1.0:
        return channel
    low, high = torch.aminmax(channel)
    spread = high - low
    spread = torch.where(spread > 0, spread, torch.ones_like(spread))
    return channel.sub_(low).div_(spread).pow_(gamma).mul_(spread).add_(low)
