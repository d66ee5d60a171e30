"""Fully automatic training as one workflow: the plan made from the data and the budget, the user's
changes applied inside it (each replacing its part of the plan, which says so), the paper's
configuration as a named preset beside it, ilastik's forest fitted beside the network, and the run.

`unet3d train` parses its options into `TrainOptions` and calls `train_volumes`; everything the
run decides is decided here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from unet3d.augmentation import AugmentationConfig
from unet3d.data.features import input_feature_spec
from unet3d.data.normalization import fit_normalization
from unet3d.errors import UserError
from unet3d.model import PRESETS, UNetConfig
from unet3d.training import TrainConfig, TrainResult, train
from unet3d.training.checkpoint import load_checkpoint, run_files
from unet3d.training.distributed import Processes
from unet3d.workflows.forest import ForestStage
from unet3d.workflows.plan import DEFAULT_ITERATIONS, Fingerprint, Plan, plan_table, plan_training, training_sets

# The paper's training (--preset paper): its tile and batch, weighted cross-entropy, its augmentation.
PAPER_TRAINING = {"iterations": DEFAULT_ITERATIONS, "patch_shape": (116, 132, 132), "batch_size": 1,
                  "optimizer": "adam", "learning_rate": 1e-3, "momentum": 0.99, "weight_decay": 0.0,
                  "schedule": "constant", "warmup": 0.0, "loss": "ce", "class_weighting": "inverse_sqrt"}
# The plan's recipe parts and the network (UNetConfig) and training (TrainConfig) fields that replace them.
RECIPE_PARTS = {"network": ("width", "levels", "padding", "norm", "dims", "norm_at_test"),
                "patch, batch": ("patch_shape", "batch_size"),
                "optimizer": ("optimizer", "learning_rate", "momentum", "weight_decay", "schedule", "warmup"),
                "loss": ("loss", "class_weighting", "class_weights")}


@dataclass
class Changes:
    """What the user changed: each change replaces its part of the plan (or of the paper's preset)."""
    network: dict = field(default_factory=dict)  # UNetConfig fields
    training: dict = field(default_factory=dict)  # TrainConfig fields of the recipe (patch_shape, optimizer, ...)
    augmentation: dict | None = None  # AugmentationConfig fields over the paper's augmentation (None: planned)
    filter_features: bool | None = None  # the filter bank as input channels (None: planned)
    normalization: str | None = None  # the method (None: planned, z-score)
    per_volume: bool | None = None  # normalization fitted per volume (None: planned)

    def parts(self) -> set[str]:
        """The recipe parts of the plan these changes replace."""
        given = set(self.network) | set(self.training)
        parts = {part for part, fields in RECIPE_PARTS.items() if given & set(fields)}
        return parts | ({"augmentation"} if self.augmentation is not None else set())


@dataclass
class TrainOptions:
    """How `train_volumes` runs; the defaults are the product's (the plan, the forest beside the network)."""
    output: str  # the model file
    sources: list[str]  # the training images' names, for messages and the model's provenance
    ignore_label: int
    classes: list[int]  # checked class values
    spacing: tuple | None = None
    preset: str | None = None  # "paper": the 2016 configuration instead of the plan
    max_time: float | None = None
    iterations: int | None = None
    seed: int = 0
    forest: bool | None = None  # None: with the plan, not with the paper's preset
    changes: Changes = field(default_factory=Changes)
    validation: list = field(default_factory=list)  # given validation volumes: (image, labels, name)
    workers: int = 0
    amp: bool = False
    validate_every: int = 200
    checkpoint_every: float = 60.0
    resume: bool = False
    threads: int | None = None
    progress: bool = True


def train_volumes(images: list[np.ndarray], labels: list[np.ndarray], options: TrainOptions,
                  processes: Processes, report=print) -> TrainResult:
    """Plan, prepare, fit the forest, train, and weigh and store the forest in the model files;
    `report` (process 0 only) hears the plan, the run and what the forest did."""
    if options.threads:
        torch.set_num_threads(options.threads)
    changes = options.changes
    plan = None
    if options.preset != "paper":
        plan = plan_training(Fingerprint.of(images, labels, options.ignore_label, options.spacing, options.sources),
                             max_time=options.max_time, iterations=options.iterations,
                             validation_given=bool(options.validation), seed=options.seed, source=options.sources[0])
    features = input_features(changes.filter_features, plan, options.spacing)
    per_volume = changes.per_volume if changes.per_volume is not None else bool(plan and plan.per_volume)
    if plan is not None:
        record_changes(plan, changes, features, per_volume)
    held_volumes = plan.validation_volumes if plan else []
    data, validation = training_sets(images, labels, options.ignore_label, list(options.sources),
                                     held_out=held_volumes, features=features, per_volume=per_volume,
                                     spacing=options.spacing, validation=options.validation,
                                     normalization=changes.normalization or "zscore", class_values=options.classes)
    config = training_config(options, data, plan)
    if plan is not None and not options.resume and processes.leader:
        report("plan (options override their part):\n" + plan_table(plan.describe(config)))
    stage = None
    if options.forest or (options.forest is None and options.preset != "paper"):
        raw_validation = [image for image, _, _ in options.validation] or [images[i] for i in held_volumes]
        stage = ForestStage([image for i, image in enumerate(images) if i not in held_volumes], raw_validation,
                            options.seed, options.threads)
        normalization = fit_normalization(stage.train_images, changes.normalization or "zscore",
                                          per_volume=per_volume)
        config = stage.fit(data, validation, config, input_feature_spec(options.spacing), normalization, processes,
                           resume=options.resume)
    result = train(config, data, options.output, validation=validation, resume=options.resume,
                   device=processes.device, progress=options.progress, processes=processes)
    if not processes.leader:
        return result
    across = f" by {processes.count} processes" if processes.count > 1 else ""
    report(f"trained {result.iterations} iterations{across} in {result.seconds:.0f} s (stopped by "
           f"{result.stopped_by}); model written to {options.output}")
    if stage is not None:
        files = run_files(options.output)
        stage.weigh_and_store([files["model"], files["best"]], data, validation, str(processes.device))
    return result


def input_features(filter_features: bool | None, plan: Plan | None, spacing) -> dict | None:
    """The filter bank the network reads: the plan's unless the user decided (none with the paper's preset)."""
    if filter_features is None:
        return plan.input_features if plan is not None else None
    return input_feature_spec(spacing) if filter_features else None


def record_changes(plan: Plan, changes: Changes, features: dict | None, per_volume: bool) -> None:
    """The printed and stored plan shows what runs: a change that replaced a planned choice says so."""
    plan.given = changes.parts()
    if changes.filter_features is not None:
        plan.override("inputs", "the image and ilastik's filter bank" if features else "the image alone",
                      f"--filter-features {'on' if changes.filter_features else 'off'}")
    if changes.per_volume is not None or changes.normalization:
        method = changes.normalization or "zscore"
        plan.override("normalization", f"{method} {'per volume' if per_volume else 'of the training images'}",
                      "given as an option")


def training_config(options: TrainOptions, data, plan: Plan | None) -> TrainConfig:
    """The complete configuration of the run: the plan's (or the paper's) with the changes applied,
    and the plan stored in it; a resumed run's stored one, with its iterations and budget as given."""
    if options.resume:
        stored = TrainConfig.from_dict(load_checkpoint(run_files(options.output)["checkpoint"])["config"])
        return dataclasses.replace(stored, iterations=options.iterations or stored.iterations,
                                   max_time=options.max_time if options.max_time is not None else stored.max_time)
    changes = options.changes
    try:
        base = plan.config(data, options.seed) if plan else paper_config()
        network = UNetConfig(**{**base.network.to_dict(), **changes.network, "in_channels": data.channels,
                                "num_classes": len(data.class_values)})
        augmentation = (base.augmentation if changes.augmentation is None else
                        dataclasses.replace(AugmentationConfig(), **changes.augmentation))
        config = dataclasses.replace(base, network=network, augmentation=augmentation, max_time=options.max_time,
                                     seed=options.seed, workers=options.workers, amp=options.amp,
                                     validate_every=options.validate_every,
                                     checkpoint_every=options.checkpoint_every, **changes.training,
                                     **({} if options.iterations is None else {"iterations": options.iterations}))
        return dataclasses.replace(config, plan=plan.to_dict(config)) if plan else config
    except ValueError as exc:
        raise UserError(str(exc)) from None


def paper_config() -> TrainConfig:
    """The paper's network and training (its channels and classes set from the data by the caller)."""
    return TrainConfig(network=PRESETS["paper"], **PAPER_TRAINING, augmentation=AugmentationConfig())
