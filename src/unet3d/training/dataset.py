"""The training set in memory, and the stream of augmented patch batches drawn from it.

Batch i is a pure function of (seed, i): its generator is seeded with both. DataLoader workers
therefore never replay each other's augmentations, and a resumed run continues with exactly the
batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from unet3d.augmentation import AugmentationConfig, sample_patch
from unet3d.data.labels import encode_labels, infer_class_values
from unet3d.data.normalization import apply_normalization, fit_normalization
from unet3d.data.sampling import AnnotatedVoxelSampler
from unet3d.errors import UserError


@dataclass
class TrainingSet:
    images: list[torch.Tensor]  # (C, Z, Y, X) float32, normalized
    labels: list[torch.Tensor]  # (Z, Y, X) int64 class indices, -1 unlabeled
    class_values: list[int]
    ignore_label: int
    normalization: dict
    spacing: tuple[float, float, float]
    sources: list[str]
    input_features: dict | None = None  # filter-bank channels appended to the images (baselines.features)

    @property
    def channels(self) -> int:
        return self.images[0].shape[0]


def prepare_training_set(
    images: list[np.ndarray],
    labels: list[np.ndarray],
    ignore_label: int,
    *,
    sources: list[str] | None = None,
    num_classes: int | None = None,
    class_values: list[int] | None = None,
    normalization: str | dict = "zscore",
    spacing=None,
    input_features: dict | None = None,
    per_volume: bool = False,
) -> TrainingSet:
    """Check, encode and normalize (C, Z, Y, X) images with their sparse (Z, Y, X) labels.

    `normalization` is a method name (fitted here on these images) or an already fitted spec
    (validation volumes must use the training statistics); `per_volume` normalizes each image on
    its own statistics, here and at prediction. `input_features` records that the
    images already carry filter-bank channels made as it describes, so prediction can redo them.
    """
    sources = sources or [f"volume {i}" for i in range(len(images))]
    check_volumes(images, labels, sources)
    if class_values is not None:
        if ignore_label in class_values:
            raise UserError(f"ignore label {ignore_label} is also one of the declared classes {class_values}")
    else:
        class_values = infer_class_values(labels, ignore_label, num_classes, sources)
    encoded = [torch.from_numpy(encode_labels(l, class_values, ignore_label, s)) for l, s in zip(labels, sources)]
    spec = (normalization if isinstance(normalization, dict)
            else fit_normalization(images, normalization, per_volume=per_volume))
    normalized = [torch.from_numpy(apply_normalization(image, spec)) for image in images]
    spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0, 1.0, 1.0)
    return TrainingSet(normalized, encoded, list(class_values), ignore_label, spec, spacing, list(sources),
                       input_features)


def check_volumes(images, labels, sources) -> None:
    """One line naming the volume whose label shape or channel count does not match."""
    if not images or len(images) != len(labels):
        raise UserError(f"{len(images)} image(s) but {len(labels)} label volume(s): give one label volume per image")
    channels = images[0].shape[0]
    for image, label, source in zip(images, labels, sources):
        if image.shape[1:] != label.shape:
            raise UserError(f"{source}: image shape {tuple(image.shape[1:])} and label shape {tuple(label.shape)} differ")
        if image.shape[0] != channels:
            raise UserError(f"{source}: {image.shape[0]} channel(s), but {sources[0]} has {channels}")


class PatchBatches(Dataset):
    """Item i is training batch i: (images (B, C, *input), targets (B, *output) with -1 unlabeled)."""

    def __init__(self, data: TrainingSet, input_shape, output_shape, batch_size: int,
                 augmentation: AugmentationConfig | None, seed: int):
        self.data = data
        self.input_shape = tuple(input_shape)
        self.output_shape = tuple(output_shape)
        self.batch_size = batch_size
        self.augmentation = augmentation
        self.seed = seed
        self.sampler = AnnotatedVoxelSampler([l.numpy() for l in data.labels], len(data.class_values))

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, iteration: int):
        rng = np.random.default_rng([self.seed, iteration])
        patches = [self._patch(rng) for _ in range(self.batch_size)]
        return torch.stack([p[0] for p in patches]), torch.stack([p[1] for p in patches])

    def _patch(self, rng: np.random.Generator):
        volume, voxel = self.sampler.sample(rng)
        # Jitter keeps the annotated voxel inside the target patch but not always at its centre.
        jitter = [rng.uniform(-n / 4, n / 4) for n in self.output_shape]
        center = [v + j for v, j in zip(voxel, jitter)]
        image, labels = sample_patch(self.data.images[volume], self.data.labels[volume], center,
                                     self.input_shape, rng, self.augmentation, self.data.spacing)
        start = [(i - o) // 2 for i, o in zip(self.input_shape, self.output_shape)]
        target = labels[tuple(slice(s, s + o) for s, o in zip(start, self.output_shape))]
        return image, target


def batch_loader(batches: PatchBatches, start: int, stop: int, workers: int) -> DataLoader:
    """Batches start..stop-1 in order, prepared by `workers` background processes."""
    return DataLoader(batches, batch_size=None, sampler=range(start, stop), num_workers=workers,
                      prefetch_factor=2 if workers else None, persistent_workers=False)
