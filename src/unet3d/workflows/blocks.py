"""The training set of a volume too large for its filter bank: blocks around annotated voxels.

Where the bank of the whole volume does not fit in memory (a 126 M-voxel EM stack needs 58 GiB),
the network still gains most from it (+0.14 IoU on serial-section EM). Training only ever reads
patches around annotated voxels, so the bank is needed only there: blocks of twice the training
patch, each centred on an annotated voxel drawn in a seeded order (by turns from all of them
and class by class), made with the
bank's halo (the same values as the whole volume's bank) until their memory share or their time
share is spent. Only the central patch-sized part of a block keeps its labels, so every patch
drawn around a label reads real context (at most a quarter patch mirrored, from the sampler's
jitter). The forest's training sample is taken from the same float32 bank before the blocks are
stored as float16: the bank of the annotated neighbourhoods is made once for both models. Where
the network takes no bank (the napari loop), the forest's bank is made only on the box its sampled
voxels span inside the labelled part: the widest filter reads 50 voxels around a box, so the bank
of a whole block cost twice as much for voxels never sampled.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
import torch

from unet3d.data.features import bank_at, bank_bytes, free_memory, region_with_input_features
from unet3d.data.labels import UNLABELED
from unet3d.data.normalization import apply_normalization, fit_normalization
from unet3d.inference.predictor import as_source
from unet3d.training.dataset import TrainingSet

# Shares of the memory budget (--max-memory, else the free memory) and of the time budget that the
# blocks' inputs may take; at least MIN_BLOCKS are made whatever the time.
MEMORY_SHARE = 0.25
TIME_SHARE = 0.15
MIN_BLOCKS = 8
NORMALIZATION_SAMPLE = 500_000  # voxels of all blocks together the normalization is fitted on
FOREST_SAMPLE_PER_BLOCK = 2_000  # annotated voxels per block whose bank the forest may train on


@dataclass
class TrainingBlocks:
    """The blocks as a training set, the forest's sample of their bank, and what they cost."""
    data: TrainingSet
    forest_features: np.ndarray  # (F, N) the raw image's filter bank at annotated voxels of the blocks
    forest_classes: np.ndarray  # (N,) their class indices
    annotated: int  # labelled voxels the network trains on
    seconds: float
    boxes: list  # where each block lies in the volume

    def describe(self) -> str:
        block = "×".join(str(n) for n in self.data.images[0].shape[1:])
        return (f"{len(self.data.images)} blocks of {block} voxels around the annotation ({self.annotated:,} "
                f"annotated voxels), inputs made in {self.seconds:.0f} s")


def block_boxes(labels: np.ndarray, patch, seed: int):
    """Seeded (block, labelled) box pairs: a block of twice `patch` around an annotated voxel, and
    the patch-sized box around that voxel which keeps its labels. Voxels are drawn by turns from
    all annotated voxels (the bulk, as the forest's sample of a volume in memory) and class by
    class (every class as often, as the network's patches are drawn)."""
    flat = labels.reshape(-1)
    rng = np.random.default_rng(seed)
    every = np.flatnonzero(flat != UNLABELED)
    if not every.size:
        return
    by_class = [voxels for voxels in (every[flat[every] == c] for c in range(int(flat.max()) + 1)) if voxels.size]
    for turn in itertools.count():
        voxels = every if turn % 2 == 0 else by_class[rng.integers(len(by_class))]
        center = np.unravel_index(int(voxels[rng.integers(voxels.size)]), labels.shape)
        yield around(center, [2 * p for p in patch], labels.shape), around(center, patch, labels.shape)


def around(center, size, shape) -> tuple[slice, ...]:
    """The box of `size` centred on `center`, clipped to `shape`."""
    return tuple(slice(max(int(c) - s // 2, 0), min(int(c) - s // 2 + s, n)) for c, s, n in zip(center, size, shape))


def block_labels(labels: np.ndarray, block, labelled) -> np.ndarray:
    """The block's class indices, unlabeled outside its `labelled` box."""
    out = np.full(tuple(b.stop - b.start for b in block), UNLABELED, labels.dtype)
    inside = tuple(slice(k.start - b.start, k.stop - b.start) for k, b in zip(labelled, block))
    out[inside] = labels[labelled]
    return out


def block_inputs(read, shape, block, features: dict | None) -> np.ndarray:
    """The raw network input of a block: the image, followed by its filter bank when `features`."""
    if features is None:
        return np.asarray(read(block), np.float32)
    return region_with_input_features(read, shape, block, features)


def sampled_voxels(labels: np.ndarray, rng) -> np.ndarray:
    """Flat indices of up to FOREST_SAMPLE_PER_BLOCK of the annotated voxels of `labels`, in raster order."""
    voxels = np.flatnonzero(labels.reshape(-1) != UNLABELED)
    if voxels.size > FOREST_SAMPLE_PER_BLOCK:
        voxels = np.sort(rng.choice(voxels, FOREST_SAMPLE_PER_BLOCK, replace=False))
    return voxels


def forest_sample(inputs: np.ndarray, labels: np.ndarray, channels: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(F, n) filter bank and (n,) classes at sampled annotated voxels of a block whose inputs hold the bank."""
    voxels = sampled_voxels(labels, rng)
    bank = inputs[channels:].reshape(inputs.shape[0] - channels, -1)
    return bank[:, voxels], labels.reshape(-1)[voxels]


def forest_sample_around(read, shape, labels: np.ndarray, labelled, bank: dict, rng) -> tuple[np.ndarray, np.ndarray]:
    """(F, n) filter bank and (n,) classes at sampled annotated voxels of the `labelled` box of
    (Z, Y, X) `labels`, the bank made on the box those voxels span (the same voxels and values as
    `forest_sample` of the block's bank: the labelled box keeps the block's raster order)."""
    local = labels[labelled]
    voxels = sampled_voxels(local, rng)
    coordinates = [c + b.start for c, b in zip(np.unravel_index(voxels, local.shape), labelled)]
    features = bank_at(read, shape, bank, np.ravel_multi_index(coordinates, shape), block=shape)
    return features, local.reshape(-1)[voxels]


def block_budget(channels: int, patch, max_memory: int | None) -> int:
    """How many blocks of 2×`patch` voxels with `channels` float16 channels fit in MEMORY_SHARE of
    `max_memory` (None: of the memory free now)."""
    budget = max_memory if max_memory is not None else (free_memory() or 8 << 30)
    block_bytes = 2 * channels * int(np.prod([2 * p for p in patch]))
    return max(int(MEMORY_SHARE * budget // block_bytes), MIN_BLOCKS)


def make_training_blocks(volume, labels: np.ndarray, class_values, ignore_label: int, patch, *,
                         features: dict | None, forest_bank: dict | None, spacing, normalization: str | dict = "zscore",
                         max_memory: int | None = None, seconds: float | None = None, seed: int = 0,
                         source: str = "image", clock=time.monotonic) -> TrainingBlocks:
    """The training blocks of a (C, Z, Y, X) image (`volume`: an array, or an opened volume read
    box by box) with (Z, Y, X) class indices `labels` (-1 unlabeled): the network's inputs (with the bank
    `features`), normalized on a sample of them (or by the fitted spec `normalization`) and kept as float16, and the forest's sample of the bank `forest_bank` (that of `features` when they
    are the same filters, else made for the sample's blocks here)."""
    volume = as_source(volume)
    start, shape, channels, read = clock(), labels.shape, volume.shape[0], volume.read
    width = channels + (0 if features is None else bank_bytes((channels, 1, 1, 1), features) // 4)
    count = block_budget(width, patch, max_memory)
    rng = np.random.default_rng(seed)
    inputs, targets, bank, classes, boxes = [], [], [], [], []
    for block, labelled in block_boxes(labels, patch, seed):
        if len(inputs) >= count or (seconds is not None and len(inputs) >= MIN_BLOCKS and clock() - start > seconds):
            break
        raw = block_inputs(read, shape, block, features)
        target = block_labels(labels, block, labelled)
        if forest_bank is not None:
            sample = (forest_sample(raw, target, channels, rng) if forest_bank == features
                      else forest_sample_around(read, shape, labels, labelled, forest_bank, rng))
            bank.append(sample[0])
            classes.append(sample[1])
        inputs.append(raw.astype(np.float16))
        targets.append(target)
        boxes.append(block)
    spec = (normalization if isinstance(normalization, dict)
            else fit_normalization([normalization_sample(inputs, rng)], normalization))
    images = [torch.from_numpy(apply_normalization(x, spec).astype(np.float16)) for x in inputs]
    data = TrainingSet(images, [torch.from_numpy(t) for t in targets], list(class_values), ignore_label, spec,
                       tuple(float(s) for s in spacing) if spacing is not None else (1.0, 1.0, 1.0),
                       [f"{source} block {i}" for i in range(len(images))], features)
    annotated = sum(int(np.count_nonzero(t != UNLABELED)) for t in targets)
    empty = np.empty((0, 0), np.float32), np.empty(0, np.int64)
    forest = (np.concatenate(bank, axis=1), np.concatenate(classes)) if bank else empty
    return TrainingBlocks(data, *forest, annotated, clock() - start, boxes)


def normalization_sample(inputs: list[np.ndarray], rng) -> np.ndarray:
    """(C, n) voxels drawn evenly from the blocks, NORMALIZATION_SAMPLE in all."""
    each = max(NORMALIZATION_SAMPLE // len(inputs), 1)
    picks = []
    for x in inputs:
        flat = x.reshape(x.shape[0], -1)
        picks.append(flat[:, rng.choice(flat.shape[1], min(each, flat.shape[1]), replace=False)].astype(np.float32))
    return np.concatenate(picks, axis=1)

