"""The training set in memory, and the stream of augmented patch batches drawn from it.

Batch i is a pure function of (seed, i): its generator is seeded with both. DataLoader workers
therefore never replay each other's augmentations, and a resumed run continues with exactly the
batches an uninterrupted run would have drawn. Processes training together draw batch i from the
same generator and each makes its own consecutive share of it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from unet3d.augmentation import AugmentationConfig, PatchCut, cut_patch, draw_augmentation, finish_patch
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
    input_features: dict | None = None  # filter-bank channels appended to the images (data.features)

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
    """Item i is training batch i: (images (B, C, *input), targets (B, *output) with -1 unlabeled).

    With `processes` > 1 (data-parallel training), batch i is processes × batch_size patches drawn
    in sequence from the generator of (seed, i), and process `rank` makes the rank-th consecutive
    batch_size of them: together the processes train on exactly the batch one process would draw
    with the whole batch size, and one process draws what it always drew. Drawing a patch's
    random numbers costs far less than cutting and resampling it, which only the own share needs.
    """

    def __init__(self, data: TrainingSet, input_shape, output_shape, batch_size: int,
                 augmentation: AugmentationConfig | None, seed: int, rank: int = 0, processes: int = 1):
        self.data = data
        self.input_shape = tuple(input_shape)
        self.output_shape = tuple(output_shape)
        self.batch_size = batch_size
        self.augmentation = augmentation
        self.seed = seed
        self.rank, self.processes = rank, processes
        self.sampler = AnnotatedVoxelSampler([l.numpy() for l in data.labels], len(data.class_values))

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, iteration: int):
        return self.finish(self.cut(iteration))

    def cut(self, iteration: int, exact: bool = True) -> "BatchCut":
        """Batch `iteration` up to what the device that trains can do itself (see augmentation.cut_patch)."""
        rng = np.random.default_rng([self.seed, iteration])
        draws = [self._draw(rng) for _ in range(self.batch_size * self.processes)]
        own = draws[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return BatchCut([cut_patch(self.data.images[volume], self.data.labels[volume], center, self.input_shape,
                                   draw, self.data.spacing, exact) for volume, center, draw in own])

    def finish(self, cut: "BatchCut") -> tuple[torch.Tensor, torch.Tensor]:
        """(images, targets) from a batch's cut, on the device the cut is on."""
        patches = [finish_patch(patch) for patch in cut.patches]
        start = [(i - o) // 2 for i, o in zip(self.input_shape, self.output_shape)]
        box = tuple(slice(s, s + o) for s, o in zip(start, self.output_shape))
        return torch.stack([p[0] for p in patches]), torch.stack([p[1][box] for p in patches])

    def _draw(self, rng: np.random.Generator):
        volume, voxel = self.sampler.sample(rng)
        # Jitter keeps the annotated voxel inside the target patch but not always at its centre.
        jitter = [rng.uniform(-n / 4, n / 4) for n in self.output_shape]
        center = [v + j for v, j in zip(voxel, jitter)]
        draw = draw_augmentation(rng, self.augmentation, self.input_shape, self.data.spacing, self.data.channels)
        return volume, center, draw


@dataclass
class BatchCut:
    """The cut patches of one batch: what crosses to the training device."""

    patches: list[PatchCut]

    def to(self, device, non_blocking: bool = False) -> "BatchCut":
        return BatchCut([patch.to(device, non_blocking) for patch in self.patches])

    def pin_memory(self) -> "BatchCut":
        return BatchCut([patch.pin_memory() for patch in self.patches])


class _Cuts(Dataset):
    """Item i is batch i's cut for a GPU to finish: the region bounded from the control points."""

    def __init__(self, batches: PatchBatches):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, iteration: int) -> BatchCut:
        return self.batches.cut(iteration, exact=False)


def batch_loader(batches: Dataset, start: int, stop: int, workers: int, pin_memory: bool = False) -> DataLoader:
    """Batches start..stop-1 in order, prepared by `workers` background processes."""
    return DataLoader(batches, batch_size=None, sampler=range(start, stop), num_workers=workers,
                      prefetch_factor=2 if workers else None, persistent_workers=False, pin_memory=pin_memory)


def training_batches(batches: Dataset, start: int, stop: int, workers: int,
                     device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, targets) of iterations start..stop-1 for a step on `device`.

    On the CPU, as prepared by batch_loader. On a GPU every batch is prepared while the steps
    before it run: a background thread (or `workers` processes) cuts the patches' regions out of
    the volumes into page-locked memory, the copy to the GPU does not block, and the resampling
    and gray-value changes of PatchBatches run there; another batch source's batches are copied
    as they come.
    """
    if torch.device(device).type == "cpu":
        yield from batch_loader(batches, start, stop, workers)
        return
    if isinstance(batches, PatchBatches):
        for cut in prefetched(batch_loader(_Cuts(batches), start, stop, workers, pin_memory=True)):
            yield batches.finish(cut.to(device, non_blocking=True))
        return
    for images, targets in prefetched(batch_loader(batches, start, stop, workers, pin_memory=True)):
        yield images.to(device, non_blocking=True), targets.to(device, non_blocking=True)


_DONE = object()


def prefetched(items: Iterable, depth: int = 2) -> Iterator:
    """The items, produced up to `depth` ahead by a background thread (torch releases the GIL in
    its kernels, so cutting the next batch overlaps the step). An error there is raised here."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not offer(item):
                    return
            offer(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread
            offer(_Failed(exc))

    thread = threading.Thread(target=produce, name="unet3d-batches", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _DONE:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)


@dataclass
class _Failed:
    error: BaseException
