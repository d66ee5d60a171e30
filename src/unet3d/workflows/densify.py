"""Semi-automatic segmentation: learn from the annotated slices of a volume, segment all of it.

The recipe is tuned for accuracy per CPU-minute (experiments/ablation, docs/ablation.md): a small
U-Net (width 8, 3 levels, batch norm) trained on same-padding patches of 16×40×40 voxels (capped
by the volume), batches of 2, Adam 3e-3 with a cosine schedule annealed over the time budget,
class-balanced sampling, soft Dice plus cross-entropy with 1/sqrt(frequency) weights, and random
flips along every axis as the only augmentation.

Same padding is the one change that mattered: a valid-padding network computes a 56×80×80 input
to train on a 16×40×40 output, so each step cost about four times as much CPU for the same
labelled voxels, and within a fixed budget it saw a quarter of the steps (+0.065 foreground IoU
on the nuclei example at 40 CPU s). Prediction of a same-padding network blends overlapping
windows, so tiles stay seamless. Flips alone beat the paper's rotation, zoom, elastic and
gray-value augmentation by +0.04 to +0.055 at these short budgets (two budgets, two seeds): with
a few hundred steps the network is still underfitting the annotated slices, and strong
augmentation only slows it down. Higher rates with one-cycle and test-time flips changed IoU by
less than the noise between seeds and were not kept. Dice + cross-entropy raised IoU on the MRI
hippocampus crops, where the two foreground classes are 2-3 % of the voxels (+0.02 to +0.08, the
case the forest led most gaining most), and left the nuclei, ovule and EM volumes unchanged
(within ±0.01). Training and prediction use torch's threads (all cores; THREADS), one thread
being cheaper on a machine busy with other work.

With many annotated voxels the network also gets ilastik's filter bank as input channels (the
random forest's features): +0.14 IoU on serial-section EM, +0.02 to +0.03 on the ovule, but
-0.06 to -0.16 on small crops with a few thousand annotated voxels (`choose_inputs`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from unet3d.augmentation import AugmentationConfig
from unet3d.baselines.features import feature_memory_shortfall, input_feature_spec, with_input_features
from unet3d.data.labels import decode_labels
from unet3d.errors import UserError
from unet3d.inference import predict_array
from unet3d.model import UNet, UNetConfig
from unet3d.training import TrainConfig, train
from unet3d.training.dataset import TrainingSet, prepare_training_set

# Flips only: rotations, zoom, elastic motion and gray-value changes switched off.
FLIPS_ONLY = AugmentationConfig(rotation_deg=0.0, scale=(1.0, 1.0), elastic_sigma=0.0, gamma=(1.0, 1.0),
                                intensity_scale=(1.0, 1.0), intensity_shift=(0.0, 0.0))
# Torch's own choice (all cores). On an idle 2-core machine two threads gave 1.8x the steps of one
# in the same wall time (197 vs 110 in 30 s, foreground IoU 0.56 vs 0.53 on the example); on a
# machine busy with other work waiting threads spin, and one thread (--threads 1) costs least CPU.
THREADS = None
TARGET_PATCH = (16, 40, 40)  # voxels per training patch along (Z, Y, X), capped by the volume
# Annotated voxels from which ilastik's filter bank is added to the input by default. Measured
# (docs/ablation.md): +0.14 IoU with 282k and 1.1M annotated voxels of serial-section EM, +0.02
# and +0.03 with 65k and 181k on the ovule; -0.06 to -0.16 with 5-7k on small nuclei and MRI
# crops, where the network fits the 61 extra channels to the few labels.
FILTER_FEATURES_MIN_ANNOTATED = 50_000


@contextmanager
def torch_threads(count: int | None):
    """Run the block with `count` torch CPU threads, then restore the previous count."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class DensifyResult:
    segmentation: np.ndarray  # (Z, Y, X) class values
    probabilities: np.ndarray  # (K, Z, Y, X) float32
    model: UNet
    info: dict
    iterations: int
    seconds: float
    inputs: str  # what the network was given, and why


def default_config(data: TrainingSet, *, max_time: float = 120.0, iterations: int = 100_000, seed: int = 0,
                   width: int = 8, levels: int = 3) -> TrainConfig:
    """The densify recipe for this volume: network, patch, optimiser, schedule, augmentation."""
    network = UNetConfig(in_channels=data.channels, num_classes=len(data.class_values), width=width,
                         levels=levels, padding="same", norm="batch")
    shape = tuple(min(int(n), t) for n, t in zip(data.images[0].shape[1:], TARGET_PATCH))
    return TrainConfig(network=network, patch_shape=shape, batch_size=2, iterations=iterations,
                       max_time=max_time, optimizer="adam", learning_rate=3e-3, schedule="cosine", warmup=0.05,
                       loss="dice_ce", class_weighting="inverse_sqrt", augmentation=FLIPS_ONLY,
                       seed=seed, checkpoint_every=30.0, log_every=10)


def choose_inputs(filter_features: bool | None, image_shape, sparse: np.ndarray, ignore_label: int, spacing,
                  source: str) -> tuple[dict | None, str]:
    """The filter-bank spec to train with (None: the image alone) and one line saying why.

    None decides from the annotation: the bank when at least FILTER_FEATURES_MIN_ANNOTATED voxels
    are annotated and it fits in free memory. True insists (and refuses a volume that would not fit).
    """
    if filter_features is False:
        return None, "the image alone (filter features off)"
    spec = input_feature_spec(spacing)
    shortfall = feature_memory_shortfall(source, image_shape, spec)
    if filter_features:
        if shortfall:
            raise UserError(f"{shortfall}; train without it (--filter-features off) or on a smaller volume")
        return spec, "the image and ilastik's filter bank (asked for)"
    annotated = int(np.count_nonzero(sparse != ignore_label))
    if annotated < FILTER_FEATURES_MIN_ANNOTATED:
        return None, (f"the image alone: {annotated:,} annotated voxels; the filter bank is added "
                      f"from {FILTER_FEATURES_MIN_ANNOTATED:,} on")
    if shortfall:
        return None, f"the image alone: {shortfall}"
    return spec, f"the image and ilastik's filter bank ({annotated:,} annotated voxels)"


def densify(image: np.ndarray, sparse: np.ndarray, ignore_label: int, model_path, *, config: TrainConfig | None = None,
            max_time: float = 120.0, iterations: int = 100_000, seed: int = 0, spacing=None, num_classes: int | None = None,
            source: str = "image", progress: bool = True, device: str = "cpu",
            threads: int | None = THREADS, filter_features: bool | None = None) -> DensifyResult:
    """Train on the annotated voxels of `sparse`, then predict every voxel of `image`.

    `threads` is torch's CPU thread count while densify runs (None keeps the current setting).
    `filter_features` gives the network ilastik's filter bank of the whole volume as extra input
    channels: True always, False never, None when enough voxels are annotated (`choose_inputs`).
    """
    features, inputs = choose_inputs(filter_features, image.shape, sparse, ignore_label, spacing, source)
    network_input = with_input_features(image, features) if features else image
    data = prepare_training_set([network_input], [sparse], ignore_label, sources=[source], num_classes=num_classes,
                                spacing=spacing, input_features=features)
    config = config or default_config(data, max_time=max_time, iterations=iterations, seed=seed)
    with torch_threads(threads):
        result = train(config, data, model_path, progress=progress, device=device)
        probabilities = predict_array(result.model, data.images[0].numpy(), device=device, progress=progress)
    segmentation = decode_labels(probabilities.argmax(0), data.class_values)
    return DensifyResult(segmentation, probabilities, result.model, result.info, result.iterations, result.seconds,
                         inputs)
