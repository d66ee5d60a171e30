"""Objects from class probabilities: seeds where objects are surely inside, grown by a watershed on
the boundary probability over the foreground.

Two kinds, one fixed parameter set each (chosen on the shared volumes, docs/instances.md):

* blobs (`nuclei`): separate objects on a background — seeds from the interior class, grown
  over the voxels the background class does not claim (ilastik's thresholding-and-watershed step);
* cells bounded by walls (`cells`): space filled with cells — seeds where the walls are far, from
  the distance transform of the thresholded boundary map (PlantSeg's distance-transform
  watershed), grown everywhere.

Seed rules, on the distance of each seed-mask voxel to the mask's edge: `core` keeps the connected
parts of the mask farther than `seed_distance` voxels from its edge, so two objects touching through
a thin neck or a gap in a wall get a seed each; `maxima` (PlantSeg) takes the local maxima of the
smoothed distance, at least `seed_distance` voxels apart. Seeds under `min_seed` voxels are dropped
and their voxels go to their neighbours. This module processes the whole volume in memory at once;
`unet3d.instances.blockwise` gives the same labels block by block for volumes that do not fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

MAXIMA_SMOOTHING = 2.0  # voxels: the Gaussian that keeps one distance maximum per object for `maxima`


@dataclass(frozen=True)
class InstanceMethod:
    """How one kind of object is cut out of the probabilities."""

    seed_class: str  # "interior": seed mask where P(interior) >= threshold; "not_boundary": P(boundary) < threshold
    threshold: float
    seeds: str  # "core" or "maxima" (see the module's docstring)
    seed_distance: float  # voxels
    min_seed: int  # voxels; smaller seeds are dropped
    grow_into_background: bool  # False: objects stop where the background class wins
    distance_weight: float = 0.0  # flood (1-w)·P(boundary) + w·(1 - normalised distance): PlantSeg's alpha = 1-w

    def as_dict(self) -> dict:
        return asdict(self)


# The fixed parameters per kind (docs/instances.md has the table they were chosen from).
KINDS = {
    "nuclei": InstanceMethod("interior", 0.5, "core", 1.0, 10, False),
    "cells": InstanceMethod("not_boundary", 0.2, "core", 6.0, 50, True),
}


def instances_from_probabilities(probabilities: np.ndarray, class_values: Sequence[int], method: InstanceMethod,
                                 interior: int = 1, boundary: int | None = 2, spacing=None) -> np.ndarray:
    """Instance labels (Z, Y, X), 0 = no object, 1..N objects, from (K, Z, Y, X) probabilities whose
    channels hold `class_values`; every class other than `interior` and `boundary` is background.
    Blobs without a boundary class (boundary None, e.g. mitochondria) flood on 1 - P(interior)."""
    check_boundary(method, boundary)
    wall, foreground, mask = flood_maps(probabilities, class_values, method, interior, boundary)
    distance = edge_distance(mask, spacing)
    if method.seeds == "maxima":
        distance = ndimage.gaussian_filter(distance, MAXIMA_SMOOTHING)
        seeds = distance_maxima(distance, method.seed_distance)
    else:
        seeds = core_seeds(mask, distance, method.seed_distance)
    elevation = wall
    if method.distance_weight:
        elevation = (1 - method.distance_weight) * wall + method.distance_weight * (1 - distance / max(distance.max(), 1))
    markers = seed_labels(seeds, method.min_seed)
    elevation = seeded_elevation(elevation, markers)
    return compact_labels(watershed(elevation, markers=markers, mask=foreground))


def seeded_elevation(elevation: np.ndarray, markers: np.ndarray, box=None, shape=None) -> np.ndarray:
    """The map to flood (float64, as the watershed floods it) with every seed voxel below every
    other value, in the raster order of the voxels in the volume of `shape` (`box`: where `elevation`
    lies in it; default: it is the volume): all seeds start at once and ties on a plateau go the way
    of the raster order, so any box holding a flood's paths floods as the whole volume does."""
    shape = elevation.shape if shape is None else tuple(shape)
    box = box or tuple(slice(0, n) for n in shape)
    seeded = np.nonzero(markers)
    raster = np.ravel_multi_index(tuple(i + b.start for i, b in zip(seeded, box)), shape)
    elevation = elevation.astype(np.float64)
    elevation[seeded] = raster / np.prod(shape, dtype=np.float64) - 2
    return elevation


def check_boundary(method: InstanceMethod, boundary: int | None) -> None:
    if boundary is None and method.seed_class != "interior":
        raise ValueError("cells are bounded by walls: a boundary class is needed")


def flood_maps(probabilities, class_values: Sequence[int], method: InstanceMethod, interior: int,
               boundary: int | None):
    """The map to flood, where the flood may go (None: everywhere) and the seed mask: voxel by voxel,
    so any box of the probabilities gives these maps of that box."""
    inside, wall, claimed = class_maps(probabilities, class_values, interior, boundary)
    foreground = None if method.grow_into_background or claimed is None else claimed >= 0.5
    mask = inside >= method.threshold if method.seed_class == "interior" else wall < method.threshold
    if foreground is not None:
        mask &= foreground
    return wall, foreground, mask


def edge_distance(mask: np.ndarray, spacing) -> np.ndarray:
    """Each mask voxel's distance to the nearest voxel outside the mask, in finest voxels."""
    return ndimage.distance_transform_edt(mask, sampling=relative_spacing(spacing)).astype(np.float32)


def core_seeds(mask: np.ndarray, distance: np.ndarray, seed_distance: float) -> np.ndarray:
    """The `core` rule: mask voxels farther than `seed_distance` from the mask's edge; a mask without
    an edge (every voxel in it) is all core (the distance transform has no edge to measure from)."""
    return mask.copy() if mask.all() else distance > seed_distance


def class_maps(probabilities, class_values: Sequence[int], interior: int, boundary: int | None):
    """P(interior), the map to flood (P(boundary), else 1 - P(interior)) and P(object) = what the
    object classes claim (None where they are the only classes: objects fill the volume)."""
    values = [int(v) for v in class_values]
    inside = np.asarray(probabilities[values.index(interior)], dtype=np.float32)
    if boundary is None:
        return inside, 1 - inside, inside
    wall = np.asarray(probabilities[values.index(boundary)], dtype=np.float32)
    return inside, wall, (inside + wall if len(values) > 2 else None)


def distance_maxima(distance: np.ndarray, radius: float) -> np.ndarray:
    """Voxels holding the largest distance within `radius` voxels (a cube), away from the edge."""
    size = 2 * int(round(radius)) + 1
    return (distance == ndimage.maximum_filter(distance, size=size)) & (distance > 1)


def seed_labels(mask: np.ndarray, min_size: int) -> np.ndarray:
    """The connected parts of `mask` of at least `min_size` voxels, numbered."""
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_size
    keep[0] = False
    return np.where(keep[labels], labels, 0)


def relative_spacing(spacing) -> tuple[float, float, float] | None:
    """The voxel spacing in units of its finest axis, so distances count the finest voxels."""
    if spacing is None:
        return None
    spacing = np.asarray(spacing, dtype=float)
    return tuple(spacing / spacing.min())


def compact_labels(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..N in raster order of their first voxel, 0 kept, in the smallest unsigned
    type that holds N: the same objects always get the same numbers."""
    values, first = np.unique(labels.ravel(), return_index=True)
    lookup, dtype = raster_numbers(values, first)
    return lookup[labels].astype(dtype)


def raster_numbers(values: np.ndarray, first: np.ndarray) -> tuple[np.ndarray, np.dtype]:
    """The lookup from label values to 1..N in the order of `first` (each value's first flat index;
    0 stays 0), and the smallest unsigned type holding N (uint16, else uint32)."""
    objects = values != 0
    order = values[objects][np.argsort(first[objects], kind="stable")]
    lookup = np.zeros(int(values.max()) + 1 if values.size else 1, dtype=np.int64)
    lookup[order.astype(np.int64)] = np.arange(1, order.size + 1)
    return lookup, np.dtype(np.uint16 if order.size < np.iinfo(np.uint16).max else np.uint32)
