"""Training patches: a window of a volume, optionally seen through a fresh random augmentation.

A patch is made in three parts, so that only the cheap ones need the CPU:
  draw_augmentation  every random number (CPU generator: the same on any device),
  cut_patch          the part of the volume the patch reads, copied out of it,
  finish_patch       resampling and gray values, on whatever device the cut was moved to.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

import unet3d.augmentation.spatial as spatial
from unet3d.augmentation.config import AugmentationConfig
from unet3d.augmentation.intensity import Intensity, apply_intensity, draw_intensity


@dataclass(frozen=True)
class PatchDraw:
    """The random numbers of one augmented patch."""

    linear: np.ndarray  # 3×3: flips, rotation, zoom
    elastic: spatial.ElasticControl | None
    intensity: Intensity | None


@dataclass
class PatchCut:
    """What one patch reads from its volume, and the rest of its augmentation.

    Without `warp`, `image` (C, *shape) float32 and `labels` (*shape) int64 (-1 outside) are the
    patch already (a crop, perhaps flipped); with it, they are the region the transform reads,
    labels as float class + 1 (0: outside), and `finish_patch` resamples them.
    """

    image: torch.Tensor
    labels: torch.Tensor
    warp: spatial.Warp | None = None
    displacement: torch.Tensor | None = None  # the dense field, where it was needed to cut the region
    elastic: spatial.ElasticControl | None = None  # otherwise its control points, to make it where resampled
    intensity: Intensity | None = None

    def to(self, device, non_blocking: bool = False) -> "PatchCut":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(self, image=move(self.image), labels=move(self.labels), displacement=move(self.displacement),
                       warp=self.warp and self.warp.to(device, non_blocking),
                       elastic=self.elastic and self.elastic.to(device, non_blocking))

    def pin_memory(self) -> "PatchCut":
        """Page-locked copies, so that the copy to a GPU runs without blocking (DataLoader calls this)."""
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return replace(self, image=pin(self.image), labels=pin(self.labels), displacement=pin(self.displacement),
                       warp=self.warp and spatial.Warp(pin(self.warp.matrix), pin(self.warp.offset),
                                                       pin(self.warp.scale), self.warp.shape),
                       elastic=self.elastic and self.elastic.pin_memory())


def sample_patch(image: torch.Tensor, labels: torch.Tensor, center, shape, rng: np.random.Generator,
                 config: AugmentationConfig | None = None, spacing=(1.0, 1.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (C, *shape) float32 and labels (*shape) int64 of the window of `shape` around `center`.

    The window starts at floor(center + 0.5) - shape//2 (voxel round(center) sits at index
    shape//2). Outside the volume the image is mirrored and the labels are -1 (unlabeled). With
    augmentation the window is rotated, zoomed and deformed about that voxel and the gray values
    changed; every random number comes from `rng`, so one Generator per worker and iteration
    gives independent, reproducible streams. Everything runs on the volume's device.
    """
    shape = check_patch(image, labels, center, shape, spacing)
    draw = draw_augmentation(rng, config, shape, spacing, image.shape[0])
    return finish_patch(cut_patch(image, labels, center, shape, draw, spacing))


def draw_augmentation(rng: np.random.Generator, config: AugmentationConfig | None, shape, spacing,
                      channels: int) -> PatchDraw | None:
    """Every random number of one patch's augmentation, in a fixed order; None without augmentation."""
    if config is None or not config.enabled:
        return None
    linear = spatial.random_linear_map(rng, config, spacing)
    elastic = spatial.random_elastic_control(rng, config, shape, spacing)
    return PatchDraw(linear, elastic, draw_intensity(rng, config, channels))


def cut_patch(image: torch.Tensor, labels: torch.Tensor, center, shape, draw: PatchDraw | None, spacing,
              exact: bool = True) -> PatchCut:
    """The part of the volume the patch reads, on the volume's device.

    `exact` makes the dense displacement here and cuts exactly the region it reaches (where the
    patch is finished on this device anyway). Otherwise the region is bounded from the control
    points, a few voxels wider, and the field is made where the patch is finished: on a GPU, the
    CPU then only copies the region.
    """
    if draw is None:
        image_patch, label_patch = spatial.crop(image, labels, center, shape)
        return PatchCut(image_patch.float(), label_patch.long())
    flipped = spatial.flips_of(draw.linear) if draw.elastic is None else None
    if flipped is not None:  # nothing to interpolate: a copy is exact and, for many channels, far cheaper
        image_patch, label_patch = spatial.flipped_crop(image, labels, center, shape, flipped)
        return PatchCut(image_patch.float(), label_patch, intensity=draw.intensity)
    displacement, reach = None, None
    if draw.elastic is not None and exact:
        displacement = draw.elastic.to(image.device).field()
        reach = tuple(v.cpu().numpy()[::-1] for v in torch.aminmax(displacement.reshape(-1, 3), dim=0))
    elif draw.elastic is not None:
        bound = draw.elastic.bound()
        reach = (-bound, bound)
    image_region, label_region, warp = spatial.cut_transformed(image, labels, center, shape, draw.linear, reach)
    if not exact:  # a compact copy: what is pinned and sent is the region, not the volume it views
        image_region = image_region.contiguous()
    return PatchCut(image_region, label_region, warp, displacement, None if exact else draw.elastic, draw.intensity)


def finish_patch(cut: PatchCut) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (C, *shape) float32 and labels (*shape) int64 (-1 unlabeled), on the cut's device."""
    if cut.warp is None:
        return apply_intensity(cut.image, cut.intensity), cut.labels
    displacement = cut.displacement if cut.elastic is None else cut.elastic.field()
    image_patch, label_patch = spatial.resample(cut.image, cut.labels, cut.warp, displacement)
    return apply_intensity(image_patch, cut.intensity), label_patch


def check_patch(image: torch.Tensor, labels: torch.Tensor, center, shape, spacing) -> tuple[int, int, int]:
    """The patch shape as three ints, after checking the arguments of a patch request."""
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
