"""How to train on these volumes, with this budget, on this machine: the plan `unet3d train` follows.

In the spirit of nnU-Net's fingerprint → plan, with the time budget as an input: a fingerprint of
the training data (shapes, voxel spacing, each volume's intensity spread, annotated voxels) decides
the intensity normalization, the inputs, a held-out validation split and the training recipe,
each choice with its reason. The recipe is densify's (`workflows.densify.default_config`), the one
chosen by accuracy per CPU second on every shared volume (docs/ablation.md), so one place decides
how to train on sparse slices; the paper's configuration stays one option away (`--preset paper`).
The plan is printed before training and stored in the model file; every explicit option
overrides its part (`workflows.train`, which runs the plan, applies them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from unet3d.data.features import feature_memory_shortfall, input_feature_spec, with_input_features
from unet3d.errors import UserError
from unet3d.training import TrainConfig
from unet3d.training.dataset import TrainingSet, check_volumes, prepare_training_set
from unet3d.workflows.densify import FILTER_FEATURES_MIN_ANNOTATED, TARGET_PATCH, default_config

# Volumes are standardized each on its own statistics (in training and at prediction) when their
# intensity spreads differ by more than this factor: MSD Hippocampus scans differ about tenfold,
# and one shared z-score made the network predict background everywhere (docs/ablation.md).
PER_VOLUME_SPREAD_RATIO = 2.0
# Without validation volumes, from this many training volumes on, a seeded share of them (at least
# one) is held out to choose the best model on: generalization is measured, not assumed.
AUTO_VALIDATION_MIN_VOLUMES = 4
AUTO_VALIDATION_SHARE = 0.2
# Without --max-time, the steps to train for (the cosine schedule anneals over them).
DEFAULT_ITERATIONS = 2000
SPREAD_PERCENTILES = (1.0, 99.0)
_SAMPLE = 200_000  # voxels per volume sampled for the intensity spread


@dataclass
class Fingerprint:
    """What the plan is decided from."""
    shapes: list[tuple[int, int, int]]
    channels: int
    spacing: tuple[float, float, float]
    spreads: list[list[float]]  # per volume, per channel: the 1st-99th percentile range of intensities
    annotated: int  # annotated voxels over all volumes
    voxels: int

    @classmethod
    def of(cls, images: list[np.ndarray], labels: list[np.ndarray], ignore_label: int, spacing,
           sources: list[str] | None = None) -> "Fingerprint":
        check_volumes(images, labels, sources or [f"volume {i + 1}" for i in range(len(images))])
        rng = np.random.default_rng(0)
        spreads = []
        for image in images:
            flat = image.reshape(image.shape[0], -1)
            sample = flat[:, rng.choice(flat.shape[1], _SAMPLE)] if flat.shape[1] > _SAMPLE else flat
            low, high = np.percentile(sample.astype(np.float64), SPREAD_PERCENTILES, axis=1)
            spreads.append((high - low).tolist())
        return cls([tuple(int(n) for n in image.shape[1:]) for image in images], int(images[0].shape[0]),
                   tuple(float(s) for s in (spacing or (1.0, 1.0, 1.0))), spreads,
                   int(sum(np.count_nonzero(l != ignore_label) for l in labels)), int(sum(l.size for l in labels)))

    def spread_ratio(self) -> float:
        """The largest ratio between two volumes' intensity spreads, over channels (1: alike)."""
        spreads = np.maximum(np.asarray(self.spreads), 1e-8)
        return float((spreads.max(axis=0) / spreads.min(axis=0)).max())


@dataclass
class Choice:
    part: str
    value: str
    why: str


@dataclass
class Plan:
    per_volume: bool
    input_features: dict | None  # the filter bank the network reads besides the image (None: the image alone)
    validation_volumes: list[int]  # training volumes held out for validation (the automatic split)
    iterations: int
    max_time: float | None
    choices: list[Choice] = field(default_factory=list)
    given: set[str] = field(default_factory=set)  # parts of the recipe that options replaced

    def override(self, part: str, value: str, option: str) -> None:
        """Record that an explicit option replaced the plan's choice for `part`."""
        self.choices = [Choice(part, value, option) if c.part == part else c for c in self.choices]

    def config(self, data: TrainingSet, seed: int) -> TrainConfig:
        """The training recipe for the prepared data (densify's, over this plan's budget)."""
        return default_config(data, max_time=self.max_time, iterations=self.iterations, seed=seed)

    def describe(self, config: TrainConfig) -> list[Choice]:
        """The plan's choices, with the recipe's as `config` finally has them (options applied)."""
        network = config.network
        recipe = [
            Choice("network", f"width {network.width}, {network.levels} levels, {network.padding} padding, "
                   f"{network.norm} norm", "densify's: the most accuracy per CPU second on every shared volume"),
            Choice("patch, batch", f"{'×'.join(map(str, config.patch_shape))}, {config.batch_size}",
                   f"{'×'.join(map(str, TARGET_PATCH))} capped by the smallest volume"),
            Choice("optimizer", f"{config.optimizer} {config.learning_rate:g}, {config.schedule} schedule",
                   "annealed over the budget: the run ends with a low rate whenever it stops"),
            Choice("loss", f"{config.loss}, {config.class_weighting} class weights",
                   "Dice + cross-entropy lifted rare classes (2-3 % of the voxels) by 0.02-0.08"),
            Choice("augmentation", "flips" if not config.augmentation.rotation_deg and
                   not config.augmentation.elastic_sigma else "rotation, scaling, elastic, gray values, flips",
                   "flips beat the paper's augmentation at budgets of minutes (+0.04 to +0.055)"),
        ]
        return self.choices + [Choice(c.part, c.value, "given as an option") if c.part in self.given else c
                               for c in recipe]

    def to_dict(self, config: TrainConfig) -> dict:
        return {"choices": [asdict(c) for c in self.describe(config)],
                "validation_volumes": self.validation_volumes}


def plan_training(fingerprint: Fingerprint, *, max_time: float | None, iterations: int | None,
                  validation_given: bool, seed: int, source: str = "training images") -> Plan:
    """The plan for `fingerprint` within `max_time` seconds (or `iterations` steps)."""
    if max_time is not None and max_time <= 0:
        raise UserError(f"--max-time {max_time:g}: the budget must be positive")
    per_volume, normalization = _normalization(fingerprint)
    features, inputs = _inputs(fingerprint, source)
    validation, split = _validation(fingerprint, validation_given, seed)
    steps = iterations or (100_000 if max_time is not None else DEFAULT_ITERATIONS)
    budget = (f"{max_time:g} s" + (f" or {iterations} steps" if iterations else "") if max_time is not None
              else f"{steps} steps")
    why_budget = ("--max-time: the schedule anneals over it" if max_time is not None
                  else "no --max-time: a fixed number of steps")
    choices = [Choice("normalization", "z-score per volume" if per_volume else "z-score of the training images",
                      normalization),
               Choice("inputs", "the image and ilastik's filter bank" if features else "the image alone", inputs),
               Choice("validation", *split),
               Choice("budget", budget, why_budget)]
    return Plan(per_volume, features, validation, steps, max_time, choices)


def _normalization(fingerprint: Fingerprint) -> tuple[bool, str]:
    if len(fingerprint.shapes) == 1:
        return False, "one volume"
    ratio = fingerprint.spread_ratio()
    if ratio > PER_VOLUME_SPREAD_RATIO:
        return True, (f"intensity spreads differ up to {ratio:.1f}× between volumes (as between MRI scans); "
                      "each volume is standardized on its own, at prediction too")
    return False, f"intensity spreads within {ratio:.1f}× of each other"


def _inputs(fingerprint: Fingerprint, source: str) -> tuple[dict | None, str]:
    """The filter bank from FILTER_FEATURES_MIN_ANNOTATED annotated voxels per volume (on average):
    densify's rule, measured one volume at a time (+0.14 on EM with 282k, -0.06 to -0.16 on crops
    with 5-7k); many volumes of a few thousand each stay with the image alone, as unmeasured."""
    per_volume = fingerprint.annotated // len(fingerprint.shapes)
    if per_volume < FILTER_FEATURES_MIN_ANNOTATED:
        return None, (f"{per_volume:,} annotated voxels per volume; the filter bank is added from "
                      f"{FILTER_FEATURES_MIN_ANNOTATED:,} on (+0.14 on EM, -0.06 to -0.16 with a few thousand)")
    spec = input_feature_spec(fingerprint.spacing)
    shortfall = feature_memory_shortfall(source, (fingerprint.channels, fingerprint.voxels), spec)
    if shortfall:
        return None, shortfall
    return spec, (f"{per_volume:,} annotated voxels per volume: the forest's features help the network "
                  "read texture (+0.14 on EM, +0.02 to +0.03 on the ovule)")


def _validation(fingerprint: Fingerprint, given: bool, seed: int) -> tuple[list[int], tuple[str, str]]:
    count = len(fingerprint.shapes)
    if given:
        return [], ("the --val-images", "the best model by validation IoU is kept (MODEL.best.safetensors)")
    if count < AUTO_VALIDATION_MIN_VOLUMES:
        return [], ("none", f"{count} volume(s): too few to hold one out (from {AUTO_VALIDATION_MIN_VOLUMES} on)")
    held = max(1, round(AUTO_VALIDATION_SHARE * count))
    chosen = sorted(np.random.default_rng(seed).choice(count, held, replace=False).tolist())
    return chosen, (f"{held} of {count} volumes held out (numbers {', '.join(str(i + 1) for i in chosen)})",
                    "no --val-images: the best model on unseen volumes is kept (MODEL.best.safetensors)")


def training_sets(images: list[np.ndarray], labels: list[np.ndarray], ignore_label: int, sources: list[str], *,
                  held_out: list[int], features: dict | None, per_volume: bool, spacing,
                  validation: list[tuple[np.ndarray, np.ndarray, str]] = (), normalization: str = "zscore",
                  num_classes: int | None = None, class_values: list[int] | None = None
                  ) -> tuple[TrainingSet, TrainingSet | None]:
    """The training set a plan trains on and its validation set (None: nothing to validate on).

    `held_out`: training volumes kept for validation (the plan's automatic split); `validation`:
    (image, labels, source) given separately instead. Both get the filter bank `features` and the
    training normalization, as prediction will give them."""
    if features:
        images = [with_input_features(image, features) for image in images]
        validation = [(with_input_features(image, features), l, s) for image, l, s in validation]
    pairs = list(validation) or [(images[i], labels[i], sources[i]) for i in held_out]
    kept = [i for i in range(len(images)) if i not in held_out]
    data = prepare_training_set([images[i] for i in kept], [labels[i] for i in kept], ignore_label,
                                sources=[sources[i] for i in kept], num_classes=num_classes, class_values=class_values,
                                normalization=normalization, spacing=spacing, per_volume=per_volume,
                                input_features=features)
    if not pairs:
        return data, None
    val_images, val_labels, val_sources = (list(x) for x in zip(*pairs))
    return data, prepare_training_set(val_images, val_labels, ignore_label, sources=val_sources,
                                      class_values=data.class_values, normalization=data.normalization,
                                      spacing=data.spacing, input_features=features)


def plan_table(choices: list[Choice]) -> str:
    """The plan as a short aligned table: each choice and why."""
    width = max(len(c.part) for c in choices)
    return "\n".join(f"  {c.part:<{width}}  {c.value}  ({c.why})" for c in choices)
