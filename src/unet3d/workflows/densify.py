"""Semi-automatic segmentation: learn from the annotated slices of a volume, segment all of it.

The recipe is tuned for accuracy per CPU-minute (experiments/ablation, docs/ablation.md): a small
U-Net (width 8, 3 levels, batch norm) trained on same-padding patches of 16×40×40 voxels (capped
by the volume), batches of 4, Adam 3e-3 with a cosine schedule annealed over the time budget,
class-balanced sampling, soft Dice plus cross-entropy with 1/sqrt(frequency) weights, and random
flips along every axis as the only augmentation.

Same padding is the one change that mattered: a valid-padding network computes a 56×80×80 input
to train on a 16×40×40 output, so each step cost about four times as much CPU for the same
labelled voxels, and within a fixed budget it saw a quarter of the steps (+0.065 foreground IoU
on the nuclei example at 40 CPU s). Prediction reads each tile of a same-padding network with
the network's whole reach, so tiles stay seamless. Flips alone beat the paper's rotation, zoom, elastic and
gray-value augmentation by +0.04 to +0.055 at these short budgets (two budgets, two seeds): with
a few hundred steps the network is still underfitting the annotated slices, and strong
augmentation only slows it down. Higher rates with one-cycle changed IoU by less than the noise
between seeds and were not kept; test-time flips are used where they are cheap
(`predict_with_tta`). Dice + cross-entropy raised IoU on the MRI hippocampus crops, where the two
foreground classes are 2-3 % of the voxels (+0.02 to +0.08, the case the forest led most gaining
most), and left the nuclei, ovule and EM volumes unchanged (within ±0.01). Training and
prediction use torch's threads (all cores; THREADS), one thread being cheaper on a machine busy
with other work.

With many annotated voxels the network also gets ilastik's filter bank as input channels (the
random forest's features): +0.14 IoU on serial-section EM, +0.02 to +0.03 on the ovule, but
-0.06 to -0.16 on small crops with a few thousand annotated voxels (`choose_inputs`).

The result is the geometric mean of the network's probabilities and those of ilastik's random
forest fitted on the same voxels and the same filter bank (`choose_forest`), the forest's time
(at most a quarter of the budget) taken out of the network's. The two err in different places:
with densify's settings the blend beat the forest in every run measured and was never more than
0.01 below the network alone, gaining most where one of the two was weak (docs/ablation.md,
"Blending the network with the forest"). Which of the two deserves more weight depends on the
volume, and on large ones a network trained for minutes can trail the forest; so from
HOLD_OUT_MIN_ANNOTATED annotated voxels on, a tenth of them (whole blocks) trains neither model
and the network's weight in the geometric mean is the one that scores best there
(`blend.choose_network_weight`; docs/ablation.md, "Weighing the blend on held-out annotation").

A network trained on other volumes of the same kind (`init`: `unet3d train` on volumes of the same kind, or
densify's model of an earlier volume) is fine-tuned on the slices instead of starting afresh:
on MRI crops and serial-section EM that put densify 0.10-0.38 ahead of the forest, where the
fresh network is 0.03-0.21 ahead (docs/ablation.md, "Starting from a network trained on volumes
of the same kind").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from unet3d.augmentation import AugmentationConfig
from unet3d.data.features import (
    bank_bytes,
    feature_memory_shortfall,
    filter_features,
    input_feature_spec,
    region_bank,
    with_input_features,
)
from unet3d.baselines.forest import ForestResult, segment_features
from unet3d.data.labels import decode_labels, encode_labels, infer_class_values
from unet3d.workflows.blend import HeldOut, choose_network_weight, hold_out_blocks, weighted_geometric_mean
from unet3d.errors import UserError
from unet3d.inference import predict_array, predict_volume
from unet3d.inference.predictor import make_plan
from unet3d.inference.predictor import (BANK_TILE_SHARE, Boxes, as_source, bank_per_region, label_dtype,
                                        network_and_forest, tile_memory, time_middle_tile)
from unet3d.progress import progress_bar
from unet3d.model import ForestModel, ModelInfo, UNet, UNetConfig, load_model, save_model
from unet3d.training import TrainConfig, TrainResult, train
from unet3d.training.dataset import TrainingSet, prepare_training_set
from unet3d.workflows.blocks import TIME_SHARE as BLOCKS_TIME_SHARE
from unet3d.workflows.blocks import TrainingBlocks, make_training_blocks
from unet3d.workflows.forest import (FOREST_MAX_SHARE, FOREST_TRAIN_VOXELS, FOREST_TREES, HOLD_OUT_MIN_ANNOTATED,
                                     HOLD_OUT_SHARE, MIN_TRAINING_SHARE, SAMPLE_BANK_SHARE, Annotated,
                                     forest_on_features, in_blocks, weigh)

# Flips only: rotations, zoom, elastic motion and gray-value changes switched off.
FLIPS_ONLY = AugmentationConfig(rotation_deg=0.0, scale=(1.0, 1.0), elastic_sigma=0.0, gamma=(1.0, 1.0),
                                intensity_scale=(1.0, 1.0), intensity_shift=(0.0, 0.0))
# Torch's own choice (all cores). On an idle 2-core machine two threads gave 1.8x the steps of one
# in the same wall time (197 vs 110 in 30 s, foreground IoU 0.56 vs 0.53 on the example); on a
# machine busy with other work waiting threads spin, and one thread (--threads 1) costs least CPU.
THREADS = None
TARGET_PATCH = (16, 40, 40)  # voxels per training patch along (Z, Y, X), capped by the volume
BATCH_SIZE = 4  # patches per step: +0.04 over 2 on MRI crops at one slice per axis, ±0.007 elsewhere (docs/ablation.md)
LEARNING_RATE = 3e-3  # Adam's peak rate, annealed by a cosine over the time budget
# A trained network (--init) is fine-tuned at a tenth of that: on MRI crops with one slice per
# axis, 0.75-0.79 foreground IoU against 0.69-0.71 at the full rate, which undid part of what
# the network had learned elsewhere (it scored 0.71-0.74 before any step); on EM level (0.70).
FINE_TUNING_LEARNING_RATE = 3e-4
# Annotated voxels from which ilastik's filter bank is added to the input by default. Measured
# (docs/ablation.md): +0.14 IoU with 282k and 1.1M annotated voxels of serial-section EM, +0.02
# and +0.03 with 65k and 181k on the ovule; -0.06 to -0.16 with 5-7k on small nuclei and MRI
# crops, where the network fits the 61 extra channels to the few labels.
FILTER_FEATURES_MIN_ANNOTATED = 50_000
# Test-time flips (8 mirrored predictions averaged) by default when they cost at most this share
# of the time budget: +0.00 to +0.05 foreground IoU (never less) on the small nuclei and MRI
# volumes, where they take seconds; on the ovule they took 77 CPU s for +0.001.
TTA_MAX_SHARE = 0.1
# Held-out blocks the blockwise route predicts to weigh the blend, at most (a seeded choice): each costs a
# prediction of twice its size, and this many give tens of thousands of scored voxels.
WEIGHING_BLOCKS = 64


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
    segmentation: np.ndarray | None  # (Z, Y, X) class values; None where written to `segmentation_out` as predicted
    probabilities: np.ndarray | None  # (K, Z, Y, X) float32; None from the blockwise route, which streams them
    model: UNet
    info: ModelInfo
    iterations: int
    seconds: float  # of training
    inputs: str  # what the network was given, and why
    blend: str  # whether the random forest was blended in, and why
    tta: bool  # whether the network's prediction averaged the 8 mirrored volumes
    forest_seconds: float = 0.0  # of the filter bank and the forest, taken out of the time budget
    forest_trees: int = 0
    components: dict[str, np.ndarray] = field(default_factory=dict)  # "network", "forest": each one's segmentation
    component_probabilities: dict[str, np.ndarray] = field(default_factory=dict)  # and each one's (K, Z, Y, X) map
    weighing: str = ""  # how the blend weighed the network against the forest, and on what evidence
    held_out: HeldOut | None = None  # the annotated voxels neither model trained on, which decided the weighing


def training_patch(volume_shape) -> tuple[int, int, int]:
    """densify's training patch for a (Z, Y, X) volume: TARGET_PATCH capped by the volume."""
    return tuple(min(int(n), t) for n, t in zip(volume_shape, TARGET_PATCH))


def default_config(data: TrainingSet, *, max_time: float = 120.0, iterations: int = 100_000, seed: int = 0,
                   width: int = 8, levels: int = 3, clock: str = "wall", network: UNetConfig | None = None,
                   learning_rate: float = LEARNING_RATE) -> TrainConfig:
    """The densify recipe for these volumes: network (`network`: that one's, e.g. a pretrained
    model's), patch (capped by the smallest volume), optimiser, schedule, augmentation."""
    network = network or densify_network(data.channels, len(data.class_values), width, levels)
    shape = training_patch(np.min([image.shape[1:] for image in data.images], axis=0))
    return TrainConfig(network=network, patch_shape=shape, batch_size=BATCH_SIZE, iterations=iterations,
                       max_time=max_time, optimizer="adam", learning_rate=learning_rate, schedule="cosine", warmup=0.05,
                       loss="dice_ce", class_weighting="inverse_sqrt", augmentation=FLIPS_ONLY,
                       seed=seed, checkpoint_every=30.0, log_every=10, clock=clock)


def densify_network(channels: int, num_classes: int, width: int = 8, levels: int = 3) -> UNetConfig:
    """densify's network: small, same padding, batch norm."""
    return UNetConfig(in_channels=channels, num_classes=num_classes, width=width, levels=levels, padding="same",
                      norm="batch")


def check_tiles_fit(options: "DensifyOptions", channels: int, num_classes: int, shape) -> None:
    """Refuse, before anything runs, a --max-memory that not even prediction's smallest tile fits."""
    if options.max_memory is not None:
        network = options.init.network.config if options.init is not None else densify_network(channels, num_classes)
        try:
            make_plan(UNet(network), shape, max_memory=tile_memory(options.max_memory, True))
        except UserError as exc:
            raise UserError(f"--max-memory {options.max_memory / 2**20:.0f}M is too small for {options.source}: "
                            f"prediction's tiles get {BANK_TILE_SHARE:.0%} of it, and "
                            f"{str(exc).split('too small, ')[-1]}") from None


def choose_inputs(filter_features: bool | None, image_shape, sparse: np.ndarray, ignore_label: int, spacing,
                  source: str, max_memory: int | None = None) -> tuple[dict | None, str]:
    """The filter-bank spec to train with (None: the image alone) and one line saying why.

    None decides from the annotation: the bank when at least FILTER_FEATURES_MIN_ANNOTATED voxels
    are annotated. True insists. Where the whole volume's bank would not fit in free memory (or in
    `max_memory`) it is
    made for the training blocks alone (`workflows.blocks`) and tile by tile at prediction.
    """
    if filter_features is False:
        return None, "the image alone (filter features off)"
    shortfall = feature_memory_shortfall(source, image_shape, input_feature_spec(spacing), max_memory)
    where = f", made per block ({shortfall.removeprefix(source + ': ')})" if shortfall else ""
    if filter_features:
        return input_feature_spec(spacing), f"the image and ilastik's filter bank (asked for){where}"
    annotated = int(np.count_nonzero(sparse != ignore_label))
    if annotated < FILTER_FEATURES_MIN_ANNOTATED:
        return None, (f"the image alone: {annotated:,} annotated voxels; the filter bank is added "
                      f"from {FILTER_FEATURES_MIN_ANNOTATED:,} on")
    return input_feature_spec(spacing), f"the image and ilastik's filter bank ({annotated:,} annotated voxels){where}"


@dataclass
class StartingModel:
    """A trained network densify fine-tunes instead of starting afresh, and what it was trained for."""
    network: UNet
    class_values: list[int]
    input_features: dict | None  # the filter bank it reads besides the image (None: the image alone)
    normalization: str  # the intensity normalization method, refitted on the new volume
    per_volume: bool  # and kept per volume at prediction (`train --per-volume`)
    source: str
    learning_rate: float = FINE_TUNING_LEARNING_RATE  # fine-tuning's rate (a tenth of a fresh network's)

    @classmethod
    def load(cls, path) -> "StartingModel":
        network, info = load_model(path)
        normalization = info.normalization
        return cls(network, info.class_values, info.input_features, normalization.get("method", "zscore"),
                   bool(normalization.get("per_volume")), str(path))

    def training_set_options(self) -> dict:
        """How `prepare_training_set` must encode and normalize the new volume for this network."""
        return {"class_values": self.class_values, "normalization": self.normalization, "per_volume": self.per_volume}

    def training_options(self) -> dict:
        """What `default_config` changes to fine-tune this network rather than train a new one."""
        return {"network": self.network.config, "learning_rate": self.learning_rate}

    def inputs(self, filter_features: bool | None) -> tuple[dict | None, str]:
        """The filter-bank spec to train with: the model's, whatever the annotation (it was trained so)."""
        if filter_features is not None and filter_features != (self.input_features is not None):
            raise UserError(f"{self.source}: the model was trained {'with' if self.input_features else 'without'} "
                            f"the filter bank; leave --filter-features at auto to fine-tune it")
        reads = "the image and ilastik's filter bank" if self.input_features else "the image alone"
        return self.input_features, f"{reads}, as the model it starts from ({self.source})"


WHOLE, BLOCKWISE = "whole", "blockwise"  # how the forest's filter bank is made: for the whole volume in memory, or per block


def choose_forest(forest: bool | None, image_shape, spacing, source: str,
                  max_memory: int | None = None) -> tuple[str | None, str]:
    """How to blend in the random forest (None: not at all), and one line saying why: by default
    always, its filter bank made for the whole volume at once where that fits in free memory (and
    `max_memory`), else
    block by block (`densify_blockwise`)."""
    if forest is False:
        return None, "the network alone (forest off)"
    shortfall = feature_memory_shortfall(source, image_shape, input_feature_spec(spacing), max_memory)
    if shortfall:
        return BLOCKWISE, (f"the network and a random forest on ilastik's filter bank made block by block "
                           f"({shortfall.removeprefix(source + ': ')}), geometric mean of their probabilities")
    return WHOLE, "the network and a random forest on ilastik's filter bank, geometric mean of their probabilities"


def hold_out_for_blend(labels: np.ndarray, forest_route: str | None, seed: int) -> HeldOut | None:
    """Annotated voxels taken out of the (Z, Y, X) class indices `labels` (in place) to weigh the
    network against the forest on, or None (no forest, or too few annotated voxels: the plain
    geometric mean)."""
    if not forest_route or np.count_nonzero(labels >= 0) < HOLD_OUT_MIN_ANNOTATED:
        return None
    held = hold_out_blocks(labels, HOLD_OUT_SHARE, training_patch(labels.shape), seed)
    return held if len(held) else None


def blend_with_forest(network: np.ndarray, forest: np.ndarray, held: HeldOut | None) -> tuple[np.ndarray, str, float]:
    """The blended probabilities, one line saying how they were weighed, and the network's weight."""
    if held is None:
        return weighted_geometric_mean(network, forest), "geometric mean with equal weights", 0.5
    choice = choose_network_weight(network, forest, held)
    return (weighted_geometric_mean(network, forest, choice.network_weight), choice.describe(len(held)),
            choice.network_weight)


def fit_forest_on_bank(image: np.ndarray, network_input: np.ndarray, data: TrainingSet, seed: int,
                       threads: int | None, progress: bool, seconds: float | None = None,
                       clock=time.monotonic, trees: int = FOREST_TREES) -> ForestResult:
    """The random forest on the filter bank, fitted on the annotated voxels, and its prediction of
    every voxel: the network's own bank channels when it has them, else a bank made here.
    `seconds` limits the forest's fit and prediction (`fit_forest`) to fewer than `trees` if need be."""
    with progress_bar(2, desc="random forest: filter bank", disable=not progress) as bar:
        has_bank = data.input_features is not None
        bank = network_input[image.shape[0]:] if has_bank else filter_features(image, spacing=data.spacing)
        bar.update()
        bar.set_description("random forest: fit and predict")
        result = segment_features(bank, data.labels[0].numpy(), n_trees=trees, seed=seed,
                                  max_train_voxels=FOREST_TRAIN_VOXELS, n_jobs=threads or -1,
                                  num_classes=len(data.class_values), seconds=seconds, clock=clock)
        bar.update()
    return result


def predict_with_tta(model, image: np.ndarray, tta: bool | None, max_time: float | None, now, device: str,
                     progress: bool) -> tuple[np.ndarray, bool]:
    """The network's probabilities, and whether they average the 8 mirrored predictions. Undecided
    (None), one plain prediction is timed first: flips follow if 8 more cost at most TTA_MAX_SHARE
    of `max_time`."""
    if tta:
        return predict_array(model, image, tta=True, device=device, progress=progress), True
    start = now()
    probabilities = predict_array(model, image, device=device, progress=progress)
    if tta is None and max_time is not None and 8 * (now() - start) <= TTA_MAX_SHARE * max_time:
        return predict_array(model, image, tta=True, device=device, progress=progress), True
    return probabilities, False


@dataclass
class DensifyOptions:
    """How densify runs; every field defaults to the product's choice (see `densify`)."""
    max_time: float | None = 120.0
    iterations: int = 100_000
    seed: int = 0
    spacing: tuple | None = None
    num_classes: int | None = None
    source: str = "image"
    progress: bool = True
    device: str = "cpu"
    threads: int | None = THREADS
    filter_features: bool | None = None
    forest: bool | None = None
    tta: bool | None = None
    clock: str = "wall"
    started: float | None = None  # when the command began, by `now` (reading the inputs counts; None: at densify)
    init: StartingModel | None = None
    config: TrainConfig | None = None  # the training configuration, instead of `default_config`'s
    report: Callable[[str], None] | None = None  # hears the time plan before training
    # Where the blockwise route writes the segmentation and probabilities region by region, with the
    # geometry of `output_meta` (the segmentation held in memory where none is given).
    segmentation_out: str | None = None
    probabilities_out: str | None = None
    output_meta: object | None = None
    # Bytes for the filter bank (of the whole volume, else of the training blocks and tiles) and the
    # prediction tiles (None: the free memory decides the route, prediction's default its tiles).
    max_memory: int | None = None

    @property
    def now(self):
        return time.process_time if self.clock == "cpu" else time.monotonic


@dataclass
class DensifyInputs:
    """What the first stage decides: the training set, what the network reads, whether the forest
    joins, and the annotated voxels held out to weigh the two."""
    image: object  # (C, Z, Y, X): in memory, or (blockwise route) as given, perhaps an opened volume read box by box
    data: TrainingSet
    network_input: np.ndarray | None  # the image with its filter-bank channels, before normalization
    inputs: str
    forest_route: str | None  # WHOLE, BLOCKWISE or None (the network alone)
    blend: str
    held: HeldOut | None
    blocks: TrainingBlocks | None = None  # the blockwise route's training set and forest sample


def prepare_inputs(image: np.ndarray, sparse: np.ndarray, ignore_label: int, options: DensifyOptions) -> DensifyInputs:
    """Stage 1: the network's inputs (the image, with the filter bank when it helps), the encoded
    and normalized training set, the forest decision and the held-out voxels."""
    init = options.init
    if init is not None:
        features, inputs = init.inputs(options.filter_features)
    else:
        features, inputs = choose_inputs(options.filter_features, image.shape, sparse, ignore_label, options.spacing,
                                         options.source, options.max_memory)
    forest_route, blend = choose_forest(options.forest, image.shape, options.spacing, options.source,
                                        options.max_memory)
    if forest_route == BLOCKWISE or (features and feature_memory_shortfall(options.source, image.shape, features,
                                                                           options.max_memory)):
        return prepare_blocks(image, sparse, ignore_label, options, features, inputs, forest_route, blend)
    image = as_source(image).read()
    network_input = with_input_features(image, features) if features else image
    data = prepare_training_set([network_input], [sparse], ignore_label, sources=[options.source],
                                num_classes=options.num_classes, spacing=options.spacing, input_features=features,
                                **(init.training_set_options() if init is not None else {}))
    check_init_channels(init, data.channels, options.source)
    return DensifyInputs(image, data, network_input, inputs, forest_route, blend,
                         hold_out_for_blend(data.labels[0].numpy(), forest_route, options.seed))


def prepare_blocks(image, sparse: np.ndarray, ignore_label: int, options: DensifyOptions,
                   features: dict | None, inputs: str, forest_route: str | None, blend: str) -> DensifyInputs:
    """Stage 1 of the blockwise route: the whole volume's labels encoded and held out from, then
    the network's training set and the forest's sample made on blocks around the annotation."""
    init = options.init
    if init is not None:
        class_values = init.class_values
    else:
        class_values = infer_class_values([sparse], ignore_label, options.num_classes, [options.source])
    if ignore_label in class_values:
        raise UserError(f"ignore label {ignore_label} is also one of the declared classes {class_values}")
    channels = image.shape[0] + (0 if features is None else bank_bytes((image.shape[0], 1, 1, 1), features) // 4)
    check_tiles_fit(options, channels, len(class_values), sparse.shape)
    labels = encode_labels(sparse, class_values, ignore_label, options.source)
    held = hold_out_for_blend(labels, forest_route, options.seed)
    blocks = make_training_blocks(
        image, labels, class_values, ignore_label, training_patch(labels.shape), features=features,
        forest_bank=input_feature_spec(options.spacing) if forest_route else None, spacing=options.spacing,
        normalization=init.normalization if init is not None else "zscore", max_memory=options.max_memory,
        seconds=None if options.max_time is None else BLOCKS_TIME_SHARE * options.max_time, seed=options.seed,
        source=options.source, clock=options.now)
    check_init_channels(init, blocks.data.channels, options.source)
    return DensifyInputs(image, blocks.data, None, f"{inputs}; trained on {blocks.describe()}", forest_route, blend,
                         held, blocks)


def check_init_channels(init: StartingModel | None, channels: int, source: str) -> None:
    """One line when the model densify starts from reads another number of input channels."""
    if init is not None and init.network.config.in_channels != channels:
        raise UserError(f"{init.source}: the model reads {init.network.config.in_channels} input channel(s), "
                        f"{source} gives {channels}")


def fit_forest(image: np.ndarray, prepared: DensifyInputs, options: DensifyOptions) -> ForestResult | None:
    """Stage 2: ilastik's forest on the filter bank of the annotated voxels (None when it does not join)."""
    if prepared.forest_route != WHOLE:
        return None
    limit = None if options.max_time is None else FOREST_MAX_SHARE * options.max_time
    return fit_forest_on_bank(image, prepared.network_input, prepared.data, options.seed, options.threads,
                              options.progress, limit, options.now)


def train_network(prepared: DensifyInputs, model_path, options: DensifyOptions, seconds: float | None) -> TrainResult:
    """Stage 3: densify's network (or the one `init` starts from) trained for `seconds`."""
    init = options.init
    config = options.config or default_config(prepared.data, max_time=seconds, iterations=options.iterations,
                                              seed=options.seed, clock=options.clock,
                                              **(init.training_options() if init is not None else {}))
    return train(config, prepared.data, model_path, progress=options.progress, device=options.device,
                 network=init.network if init is not None else None)


def blend_stage(network: np.ndarray, forest: ForestResult | None,
                held: HeldOut | None) -> tuple[np.ndarray, str, dict, float]:
    """Stage 5: the network's probabilities blended with the forest's (unchanged without a forest),
    how they were weighed, each one's map, and the network's weight."""
    if forest is None:
        return network, "", {}, 1.0
    blended, weighing, weight = blend_with_forest(network, forest.probabilities, held)
    return blended, weighing, {"network": network, "forest": forest.probabilities}, weight


def store_forest(model_path, result: TrainResult, forest: ForestResult, data: TrainingSet, channels: int,
                 weight: float) -> None:
    """Stage 6: the forest joins the network in the model file with the weight the blend used, so
    that `unet3d predict` with densify's model segments as densify did (the forest reads the raw
    image's filter bank, as here)."""
    model = ForestModel(forest.forest, len(data.class_values), input_feature_spec(data.spacing),
                        {"method": "none", "channels": channels}, weight)
    save_model(model_path, result.model, result.info, model)


# Prediction's measured cost is scaled by this before it is set aside from the budget: tiles at
# the volume's faces, writing.
PREDICTION_MARGIN = 1.2
# The blockwise route weighs the blend on at most this share of the time budget (and at least
# MIN_WEIGHING_BLOCKS held-out blocks): each block is predicted with half a block of context on
# every side, up to 8 times its voxels, which on a thin stack can add up to more voxels than the volume.
WEIGHING_SHARE = 0.05
MIN_WEIGHING_BLOCKS = 8


@dataclass
class PredictionCost:
    """What predicting the volume will cost, measured on one tile of the plan prediction will use."""
    seconds: float  # the whole volume, PREDICTION_MARGIN included
    per_voxel: float  # seconds per output voxel of that tile, its context and filter bank included
    tiles: int

    def weighing(self, block, shape, max_time: float | None) -> tuple[int, float]:
        """(held-out blocks, seconds) to weigh the blend on: as many as WEIGHING_SHARE of `max_time`
        pays for, from MIN_WEIGHING_BLOCKS to WEIGHING_BLOCKS."""
        box = float(np.prod([min(2 * b, n) for b, n in zip(block, shape)]))
        count = WEIGHING_BLOCKS
        if max_time is not None:
            count = int(np.clip(WEIGHING_SHARE * max_time // (self.per_voxel * box), MIN_WEIGHING_BLOCKS,
                                WEIGHING_BLOCKS))
        return count, count * box * self.per_voxel


def prediction_cost(config: UNetConfig, read, forest_at, shape, clock, device: str,
                    max_memory: int | None = None) -> PredictionCost:
    """The cost of predicting the whole (Z, Y, X) volume of `shape` with a network of `config` under
    `max_memory`, from the middle tile of that plan timed by `clock` (`read`: box → the normalized
    input there, made there if it is made per region; `forest_at`: block → the forest's
    probabilities, or None) times the plan's tiles."""
    seconds, plan, output = time_middle_tile(UNet(config), read, forest_at, shape, clock, max_memory, device)
    per_voxel = PREDICTION_MARGIN * seconds / np.prod([r.stop - r.start for r in output])
    return PredictionCost(PREDICTION_MARGIN * seconds * len(plan.starts), per_voxel, len(plan.starts))


def training_budget(max_time: float | None, spent: float, prediction: float, voxels: int, source: str,
                    report, prediction_plan: str = "") -> float | None:
    """Seconds left to train once `spent` and the `prediction` ahead are taken out of `max_time`, at
    least MIN_TRAINING_SHARE of it; refuses a budget that prediction alone would leave too little
    of, saying what would do."""
    if max_time is None:
        return None
    training = max(max_time - spent - prediction, MIN_TRAINING_SHARE * max_time)
    if prediction > (1 - MIN_TRAINING_SHARE) * max_time:
        needed = (spent + prediction) / (1 - MIN_TRAINING_SHARE)
        raise UserError(f"{source}: predicting its {voxels:,} voxels takes about {prediction:.0f} s here, which leaves "
                        f"too little of --max-time {max_time:g} to train: give --max-time {needed:.0f} or more, or "
                        "densify a crop and segment the whole volume with its model by `unet3d predict --dask`")
    if report is not None:
        report(f"time plan: {spent:.0f} s spent on the inputs and the forest, {prediction:.0f} s set aside to "
               f"predict {voxels:,} voxels{prediction_plan} (measured here), {training:.0f} s to train")
    return training


def densify_blockwise(prepared: DensifyInputs, model_path, options: DensifyOptions, start: float) -> DensifyResult:
    """The route for volumes whose filter bank does not fit in memory: the network trained on
    blocks around the annotation (`workflows.blocks`, the bank made there alone), the forest fitted
    on the same blocks' bank, weighed against the network on held-out blocks predicted where they
    lie, and the blend predicted tile by tile with the bank made once per tile for both, straight
    into the segmentation (and `probabilities_out`)."""
    now, max_time, data, blocks = options.now, options.max_time, prepared.data, prepared.blocks
    source = as_source(prepared.image)
    shape = tuple(source.shape[1:])
    voxels = int(np.prod(shape))
    config = options.config or default_config(data, max_time=max_time, seed=options.seed,
                                              **(options.init.training_options() if options.init else {}))
    bank = input_feature_spec(data.spacing)
    tiles = tile_memory(options.max_memory, bank_per_region(source, data.input_features, options.max_memory))
    forest, weighing_blocks = None, 0
    with torch_threads(options.threads):
        if prepared.forest_route:
            forest_seconds = None if max_time is None else FOREST_MAX_SHARE * (1 - SAMPLE_BANK_SHARE) * max_time
            # Before the forest: the network and the bank alone, and the forest's whole share, must fit.
            read, _ = network_and_forest(source, data.normalization, data.input_features, None, per_region=True)
            extra = None if data.input_features == bank else lambda box: region_bank(source.read, shape, box, bank)
            ahead = prediction_cost(config.network, read, extra, shape, now, options.device, tiles)
            training_budget(max_time, now() - start, ahead.seconds + (forest_seconds or 0.0), voxels, options.source,
                            None)
            forest = forest_on_features(blocks.forest_features, blocks.forest_classes, bank,
                                        {"method": "none", "channels": source.shape[0]}, len(data.class_values),
                                        seconds=forest_seconds, seed=options.seed, threads=options.threads,
                                        predict_voxels=voxels)
        cost = prediction_cost(config.network, *network_and_forest(
            source, data.normalization, data.input_features, forest, per_region=True), shape, now, options.device,
            tiles)
        prediction, plan = cost.seconds, f" in {cost.tiles} tiles"
        if forest is not None and prepared.held is not None:
            weighing_blocks, weighing_seconds = cost.weighing(training_patch(shape), shape, max_time)
            prediction += weighing_seconds
            plan += f" and weigh the blend on {weighing_blocks} held-out blocks"
        spent = now() - start
        training_time = training_budget(max_time, spent, prediction, voxels, options.source, options.report, plan)
        result = train_network(prepared, model_path, options, training_time)
        prepared.data = prepared.blocks = data = blocks = None  # the training blocks' memory goes to prediction
        read, _ = network_and_forest(source, result.info.normalization, result.info.input_features, None,
                                     per_region=True)
        weighing = (weigh_blockwise(result.model, forest, source, read, prepared.held, weighing_blocks, options)
                    if forest else "")
        segmentation = (None if options.segmentation_out else
                        np.empty(shape, label_dtype(result.info.class_values)))
        predict_volume(result.model, result.info, source, options.segmentation_out or segmentation,
                       options.probabilities_out, device=options.device, progress=options.progress, forest=forest,
                       max_memory=options.max_memory, like=options.output_meta)
    if forest is not None and forest.network_weight < 1:
        save_model(model_path, result.model, result.info, forest)
    return DensifyResult(segmentation, None, result.model, result.info, result.iterations, result.seconds,
                         prepared.inputs, prepared.blend, False, spent, forest.forest.n_estimators if forest else 0,
                         weighing=weighing, held_out=prepared.held)


def weigh_blockwise(network: UNet, forest: ForestModel, source, read, held: HeldOut | None, count: int,
                    options: DensifyOptions) -> str:
    """The network's weight in the blend, chosen on `count` of the held-out blocks (a seeded
    choice), each predicted with half a block of context (`source`: the image, read box by box;
    `read`: box → the network's input there); equal weights without held-out voxels."""
    if held is None:
        forest.network_weight = 0.5
        return "geometric mean with equal weights"
    block = training_patch(source.shape[1:])
    volume = in_blocks(Annotated(Boxes(source.read, source.shape), Boxes(read, source.shape), held.voxels,
                                 held.classes), block, count, options.seed)
    return weigh(network, forest, [volume], "held-out annotated blocks", options.seed, options.device, block)


def densify(image, sparse: np.ndarray, ignore_label: int, model_path,
            options: DensifyOptions | None = None, **changes) -> DensifyResult:
    """Train on the annotated voxels of `sparse`, then predict every voxel of `image` ((C, Z, Y, X)
    in memory, or an opened volume: read whole, or box by box on the blockwise route): the stages
    prepare_inputs → fit_forest → train_network → prediction (`predict_with_tta`) → blend_stage, or
    `densify_blockwise` where the volume's filter bank does not fit in memory (`max_memory`).

    `options` (DensifyOptions; `changes` replace its fields): `max_time` covers the whole run, the
    prediction ahead timed on a block and set aside before training (`clock`: wall or CPU seconds
    of this process; None: `iterations` alone stops training). `threads` is the CPU thread count
    of the network and the forest (None: torch's setting, every core for the forest).
    `filter_features` gives the network ilastik's filter bank as extra input channels: True always,
    False never, None when enough voxels are annotated (`choose_inputs`). `forest` blends a random
    forest on the same bank into the result: True and None always, False never (`choose_forest`). The model file holds the network and, where it was blended in, the forest with
    the network's weight (`store_forest`), so `unet3d predict` segments as densify did. `tta` averages the network's
    predictions of the 8 mirrored volumes: True always, False never, None when they cost at most
    TTA_MAX_SHARE of `max_time`. `init` fine-tunes a trained network (its classes, inputs and
    normalization) instead of training a new one.
    """
    options = replace(options or DensifyOptions(), **changes)
    now = options.now
    start = now() if options.started is None else options.started
    prepared = prepare_inputs(image, sparse, ignore_label, options)
    if prepared.blocks is not None:
        return densify_blockwise(prepared, model_path, options, start)
    image = prepared.image
    forest_result = fit_forest(image, prepared, options)
    prepared.network_input = None  # the unnormalized bank is not needed beyond the forest
    max_time = options.max_time
    data = prepared.data
    config = options.config or default_config(data, max_time=max_time, seed=options.seed,
                                              **(options.init.training_options() if options.init else {}))
    with torch_threads(options.threads):
        normalized = data.images[0].numpy()
        prediction = prediction_cost(config.network, lambda box: normalized[(slice(None),) + box], None,
                                     image.shape[1:], now, options.device).seconds
        spent = now() - start
        training_time = training_budget(max_time, spent, prediction, int(np.prod(image.shape[1:])), options.source,
                                        options.report)
        result = train_network(prepared, model_path, options, training_time)
        probabilities, tta = predict_with_tta(result.model, data.images[0].numpy(), options.tta, max_time, now,
                                              options.device, options.progress)
    probabilities, weighing, parts, weight = blend_stage(probabilities, forest_result, prepared.held)
    if forest_result is not None and weight < 1:
        store_forest(model_path, result, forest_result, data, image.shape[0], weight)
    decode = lambda p: decode_labels(p.argmax(0), data.class_values)  # noqa: E731
    return DensifyResult(decode(probabilities), probabilities, result.model, result.info, result.iterations,
                         result.seconds, prepared.inputs, prepared.blend, tta, spent,
                         forest_result.trees if forest_result else 0,
                         {name: decode(p) for name, p in parts.items()}, parts, weighing, prepared.held)
