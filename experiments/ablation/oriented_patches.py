"""Training patches laid flat on the annotated slice: more labelled voxels per step for the same cost.

Usage: .venv/bin/python experiments/ablation/oriented_patches.py VOLUME SLICES SEED BUDGET [notta] [forest_blend options]

densify's patch is 16×40×40 (Z, Y, X) whatever slice its centre lies on: a patch centred on a
Z slice holds 40×40 annotated voxels, one centred on a Y or X slice 16×40. Here every batch takes
the orientation of its first patch's slice (the axis along which the annotation around that voxel
is thinnest) and lays the patch's thin side along it, so each patch holds a whole 40×40 face of
annotation where the volume allows. The rest is forest_blend.py's run (same budget, forest,
blend and scoring); prints its JSON line with "patches": "oriented".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch
from scipy.ndimage import uniform_filter

from experiments.ablation import forest_blend
from unet3d.augmentation import sample_patch
from unet3d.training import dataset, trainer

POOLED = 4  # densify's three levels pool twice: patch sides are multiples of 4
NEIGHBOURHOOD = 7  # voxels across the in-plane window that decides a voxel's slice orientation


def slice_normals(labels: np.ndarray) -> np.ndarray:
    """Per voxel, the axis whose perpendicular plane holds the most annotated voxels nearby."""
    annotated = (labels >= 0).astype(np.float32)
    counts = [uniform_filter(annotated, size=[1 if a == axis else NEIGHBOURHOOD for a in range(3)], mode="constant")
              for axis in range(3)]
    return np.argmax(np.stack(counts), axis=0)


class OrientedSampler:
    """Class-balanced annotated voxels, drawn per slice orientation (the axis normal to the slice)."""

    def __init__(self, encoded_labels: list[np.ndarray], num_classes: int):
        self.shapes = [labels.shape for labels in encoded_labels]
        normals = [slice_normals(labels) for labels in encoded_labels]
        self.voxels = {(axis, c): [np.flatnonzero((labels == c) & (normal == axis))
                                   for labels, normal in zip(encoded_labels, normals)]
                       for axis in range(3) for c in range(num_classes)}

    def sample(self, rng: np.random.Generator, axis: int | None = None) -> tuple[int, tuple[int, ...], int]:
        keys = [k for k, v in self.voxels.items() if sum(map(len, v)) and (axis is None or k[0] == axis)]
        if axis is None:  # a class (uniform), then one of its orientations in proportion to its voxels there
            classes = sorted({c for _, c in keys})
            cls = classes[rng.integers(len(classes))]
            keys = [k for k in keys if k[1] == cls]
            sizes = np.array([sum(map(len, self.voxels[k])) for k in keys], dtype=np.float64)
            key = keys[int(rng.choice(len(keys), p=sizes / sizes.sum()))]
        else:
            key = keys[rng.integers(len(keys))]
        counts = np.array([len(v) for v in self.voxels[key]], dtype=np.float64)
        volume = int(rng.choice(len(counts), p=counts / counts.sum()))
        flat = self.voxels[key][volume][rng.integers(counts[volume])]
        return volume, tuple(int(i) for i in np.unravel_index(flat, self.shapes[volume])), key[0]


class OrientedPatchBatches(dataset.PatchBatches):
    """densify's batches, each patch's thin side along the normal of the batch's annotated slices."""

    def __init__(self, data, input_shape, output_shape, batch_size, augmentation, seed):
        super().__init__(data, input_shape, output_shape, batch_size, augmentation, seed)
        assert tuple(input_shape) == tuple(output_shape), "same-padding networks only"
        self.sampler = OrientedSampler([l.numpy() for l in data.labels], len(data.class_values))
        thin, wide = min(input_shape), max(input_shape)
        volume_shape = data.images[0].shape[1:]
        size = lambda n: n - n % POOLED  # noqa: E731
        self.shapes = [tuple(size(min(thin if a == axis else wide, n)) for a, n in enumerate(volume_shape))
                       for axis in range(3)]

    def __getitem__(self, iteration: int):
        rng = np.random.default_rng([self.seed, iteration])
        volume, voxel, axis = self.sampler.sample(rng)
        drawn = [(volume, voxel)] + [self.sampler.sample(rng, axis)[:2] for _ in range(self.batch_size - 1)]
        patches = [self._oriented_patch(rng, v, c, self.shapes[axis]) for v, c in drawn]
        return torch.stack([p[0] for p in patches]), torch.stack([p[1] for p in patches])

    def _oriented_patch(self, rng, volume: int, voxel, shape):
        jitter = [rng.uniform(-n / 4, n / 4) for n in shape]
        center = [v + j for v, j in zip(voxel, jitter)]
        return sample_patch(self.data.images[volume], self.data.labels[volume], center, shape, rng,
                            self.augmentation, self.data.spacing)


if __name__ == "__main__":
    trainer.PatchBatches = OrientedPatchBatches  # what train() builds its batches with
    print(json.dumps(forest_blend.run_from_arguments(sys.argv, __doc__) | {"patches": "oriented"}))
