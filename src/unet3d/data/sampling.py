"""Patch centres drawn from annotated voxels, balanced over classes.

With a few annotated slices almost every random patch would contain no label at all (the trap
pytorch-3dunet's 60%-labeled filter falls into). Centring each target patch on an annotated voxel
guarantees a gradient every step; drawing the class first gives rare, thin classes (boundaries,
mitochondria) as many patches as the background.
"""

from __future__ import annotations

import numpy as np


class AnnotatedVoxelSampler:
    """Draws (volume index, voxel coordinate) pairs: class uniform, then voxel uniform within it."""

    def __init__(self, encoded_labels: list[np.ndarray], num_classes: int):
        self.shapes = [labels.shape for labels in encoded_labels]
        # per class: one flat-index array per volume
        self.voxels = [[np.flatnonzero(labels == c) for labels in encoded_labels] for c in range(num_classes)]
        self.classes = [c for c in range(num_classes) if any(len(v) for v in self.voxels[c])]

    def sample(self, rng: np.random.Generator) -> tuple[int, tuple[int, int, int]]:
        cls = self.classes[rng.integers(len(self.classes))]
        counts = np.array([len(v) for v in self.voxels[cls]], dtype=np.float64)
        volume = int(rng.choice(len(counts), p=counts / counts.sum()))
        flat = self.voxels[cls][volume][rng.integers(counts[volume])]
        return volume, tuple(int(i) for i in np.unravel_index(flat, self.shapes[volume]))
