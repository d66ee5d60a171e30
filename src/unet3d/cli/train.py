"""`unet3d train`: learn a segmentation from sparsely annotated volumes."""

from __future__ import annotations

import argparse
import dataclasses

from unet3d.augmentation import AugmentationConfig
from unet3d.cli.options import (DefaultsHelpFormatter, add_network_options, float_list, int_list, int_triple,
                                network_config, positive_seconds)
from unet3d.data.labels import check_painting_shape, painted_classes, present_values
from unet3d.errors import UserError
from unet3d.data.normalization import METHODS as NORMALIZATION_METHODS, fit_normalization
from unet3d.io import read_image, read_labels
from unet3d.training import TrainConfig, train
from unet3d.training.checkpoint import load_checkpoint, run_files
from unet3d.training.config import CLASS_WEIGHTING, LOSSES, OPTIMIZERS, SCHEDULES
from unet3d.training.distributed import DEFAULT_TIMEOUT, Processes, joined
from unet3d.data.features import input_feature_spec
from unet3d.workflows.densify import FILTER_FEATURES_MIN_ANNOTATED
from unet3d.workflows.forest import FOREST_MAX_SHARE, ForestStage
from unet3d.workflows.plan import (DEFAULT_ITERATIONS, PER_VOLUME_SPREAD_RATIO, Fingerprint, plan_table,
                                   plan_training, training_sets)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a network on sparsely annotated volumes",
        description="Train a 3D U-Net on images whose label volumes annotate only some voxels (for example "
        "a few slices); every voxel holding the ignore label has weight 0 in the loss. Writes MODEL "
        "(safetensors, usable by `unet3d predict`) and, beside it, MODEL.checkpoint.pt (for --resume), "
        "MODEL.best.safetensors (with validation), MODEL.log.jsonl and MODEL.curve.png.",
        formatter_class=DefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--images", nargs="+", required=True, metavar="IMAGE",
                      help="image volumes (.tif .nii.gz .h5:/dataset .zarr .npy ...)")
    data.add_argument("--labels", nargs="+", required=True, metavar="LABELS",
                      help="sparse label volumes, one per image, same shape")
    data.add_argument("--ignore-label", type=int, required=True, metavar="N",
                      help="the value of unannotated voxels (0 for napari/ilastik painting, 3 in the paper, 255, ...)")
    data.add_argument("--num-classes", type=int, metavar="K",
                      help="number of classes; the classes are the first K non-negative integers other than the "
                      "ignore label (default: inferred from the labeled values)")
    data.add_argument("--classes", type=int_list, metavar="V,V,...",
                      help="explicit class values instead of --num-classes")
    data.add_argument("--channel-axis", type=int, help="axis of the channels in multi-channel images (default: detected)")
    data.add_argument("--spacing", type=float_list, metavar="Z,Y,X",
                      help="voxel spacing for augmentation (default: read from the first image, else isotropic)")
    data.add_argument("--val-images", nargs="+", default=[], metavar="IMAGE", help="held-out images for validation")
    data.add_argument("--val-labels", nargs="+", default=[], metavar="LABELS",
                      help="their annotations (same ignore label); IoU per class is logged and the best model kept")
    data.add_argument("--normalization", choices=NORMALIZATION_METHODS,
                      help="intensity normalization fitted on the training images and stored with the model "
                      "(default: planned, z-score)")
    data.add_argument("--per-volume", action=argparse.BooleanOptionalAction,
                      help="fit the normalization on each volume, in training and at prediction, instead of once on "
                      "the training images: for volumes whose intensity scale differs from scan to scan (MRI); "
                      "default: planned, on when the volumes' intensity spreads differ more than "
                      f"{PER_VOLUME_SPREAD_RATIO:g}×")
    data.add_argument("--filter-features", choices=("auto", "on", "off"), default="auto",
                      help="also give the network ilastik's filter bank (61 filters per channel) as input channels; "
                      f"auto: planned, from {FILTER_FEATURES_MIN_ANNOTATED:,} annotated voxels when it fits in memory")
    data.add_argument("--forest", choices=("auto", "on", "off"), default="auto",
                      help="also fit ilastik's random forest on the annotated voxels and store it in the model, "
                      "blended with the network at prediction by a weight chosen on annotation neither trained "
                      f"on (the validation volumes, else held-out blocks); it takes up to {FOREST_MAX_SHARE * 100:.0f}%% of "
                      "--max-time. auto: on, except with --preset paper")
    parser.add_argument("-o", "--output", required=True, metavar="MODEL", help="model file to write (.safetensors)")
    add_network_options(parser)
    opt = parser.add_argument_group(
        "optimisation", "Without options, `train` plans the run from the data and the budget (printed before "
        "training, stored in the model): densify's recipe, the most accuracy per CPU second measured. Each option "
        "overrides its part of the plan; --preset paper trains the paper's configuration instead.")
    opt.add_argument("--iterations", type=int, help="stop after this many steps (default: planned, "
                     f"{DEFAULT_ITERATIONS} without --max-time)")
    opt.add_argument("--max-time", type=positive_seconds, metavar="SECONDS",
                     help="stop after this much training time, whichever comes first; schedules anneal over it")
    opt.add_argument("--patch", type=int_triple, metavar="Z,Y,X",
                     help="network input patch, rounded to a valid size (the paper: 116,132,132)")
    opt.add_argument("--batch-size", type=int)
    opt.add_argument("--optimizer", choices=OPTIMIZERS, help="sgd with momentum is the paper's")
    opt.add_argument("--lr", type=float, help="base learning rate")
    opt.add_argument("--momentum", type=float, help="SGD momentum (the original U-Net: 0.99)")
    opt.add_argument("--weight-decay", type=float)
    opt.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule")
    opt.add_argument("--warmup", type=float, help="fraction of the run with a rising learning rate")
    opt.add_argument("--loss", choices=LOSSES, help="weighted cross-entropy, or Dice + cross-entropy")
    opt.add_argument("--class-weighting", choices=CLASS_WEIGHTING, help="class weights from the labeled voxels' class frequencies")
    opt.add_argument("--class-weights", type=float_list, metavar="W,W,...", help="manual class weights")
    aug = parser.add_argument_group("augmentation", "Planned: flips only; any option below switches to the "
                                    "paper's augmentation with that change.")
    aug.add_argument("--no-augment", action="store_true", help="train on plain crops")
    defaults = AugmentationConfig()
    aug.add_argument("--rotation", type=float, help=f"maximum rotation per axis (degrees; paper's augmentation: {defaults.rotation_deg:g})")
    aug.add_argument("--scale", type=float_list, metavar="LOW,HIGH", help=f"scaling range (paper's augmentation: {defaults.scale})")
    aug.add_argument("--elastic-spacing", type=float,
                     help="voxels between the deformation's control points (the paper: 32)")
    aug.add_argument("--elastic-sigma", type=float,
                     help="standard deviation of the control points' displacement in voxels (the paper: 4; 0 disables)")
    aug.add_argument("--no-flip", action="store_true", help="no random mirroring")
    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0, help="makes a CPU run reproducible (and the validation split)")
    run.add_argument("--workers", type=int, default=0, help="processes preparing augmented patches in the background")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (under torchrun: each process "
                     "takes cuda:LOCAL_RANK, or the CPU)")
    run.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                     help="under torchrun: how long a process waits for the others, to join and at every step, "
                     "before it stops with an error")
    run.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, all cores)")
    run.add_argument("--amp", action="store_true", help="bf16 mixed precision (CUDA only)")
    run.add_argument("--validate-every", type=int, default=200, help="iterations between validations")
    run.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                     help="seconds between checkpoints (model file and resumable state)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run that wrote MODEL.checkpoint.pt from where it stopped")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_train)


def load_pairs(images, labels, channel_axis):
    if len(images) != len(labels):
        raise UserError(f"{len(images)} image(s) but {len(labels)} label volume(s): give one label volume per image")
    pairs = [(read_image(i, channel_axis), read_labels(l)) for i, l in zip(images, labels)]
    return [p[0][0] for p in pairs], [p[1][0] for p in pairs], pairs[0][0][1]


def run_train(args) -> int:
    """Trains alone, or as one of the processes torchrun started (data-parallel; process 0 prints and writes)."""
    with joined(args.device, args.timeout) as processes:
        return _train(args, processes)


def _train(args, processes: Processes) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    images, labels, meta = load_pairs(args.images, args.labels, args.channel_axis)
    classes = checked_paintings(images, labels, args)
    spacing = args.spacing or meta.spacing
    plan = None
    if args.preset != "paper":
        fingerprint = Fingerprint.of(images, labels, args.ignore_label, spacing, args.images)
        plan = plan_training(fingerprint, max_time=args.max_time, iterations=args.iterations,
                             validation_given=bool(args.val_images), seed=args.seed, source=args.images[0])
    features = _input_features(args, plan, spacing)
    per_volume = args.per_volume if args.per_volume is not None else bool(plan and plan.per_volume)
    if plan is not None:
        _record_overrides(args, plan, features, per_volume)
    given_validation = []
    if args.val_images:
        val_images, val_labels, _ = load_pairs(args.val_images, args.val_labels, args.channel_axis)
        given_validation = list(zip(val_images, val_labels, args.val_images))
    held_volumes = plan.validation_volumes if plan else []
    data, validation = training_sets(images, labels, args.ignore_label, list(args.images), held_out=held_volumes,
                                     features=features, per_volume=per_volume, spacing=spacing,
                                     validation=given_validation, normalization=args.normalization or "zscore",
                                     class_values=classes)
    config = _config(args, data, plan)
    if plan is not None and not args.resume and processes.leader:
        print("plan (options override their part):\n" + plan_table(plan.describe(config)))
    stage = None
    if args.forest == "on" or (args.forest == "auto" and args.preset != "paper"):
        raw_validation = [image for image, _, _ in given_validation] or [images[i] for i in held_volumes]
        stage = ForestStage([images[i] for i in range(len(images)) if i not in held_volumes], raw_validation,
                            args.seed, args.threads)
        config = stage.fit(data, validation, config, input_feature_spec(spacing),
                           fit_normalization(stage.train_images, args.normalization or "zscore", per_volume=per_volume),
                           processes, resume=args.resume)
    result = train(config, data, args.output, validation=validation, resume=args.resume, device=processes.device,
                   progress=not args.quiet, processes=processes)
    if processes.leader:
        across = f" by {processes.count} processes" if processes.count > 1 else ""
        print(f"trained {result.iterations} iterations{across} in {result.seconds:.0f} s (stopped by "
              f"{result.stopped_by}); model written to {args.output}")
        if stage is not None:
            files = run_files(args.output)
            stage.weigh_and_store([files["model"], files["best"]], data, validation, str(processes.device))
    return 0


def checked_paintings(images, labels, args) -> list[int]:
    """The class values, after checking every painting against its image and the classes, so that a
    bad painting is named (not the image it belongs to) before anything is computed."""
    for image, painting, name, image_name in zip(images, labels, args.labels, args.images):
        check_painting_shape(image.shape, painting.shape, name, image_name)
    return painted_classes(labels, args.labels, args.ignore_label, args.num_classes,
                           None if args.classes is None else _given_classes(labels, args))


def _given_classes(labels, args) -> list[int]:
    """--classes, checked: not the ignore label, and holding every value the paintings use."""
    if args.ignore_label in args.classes:
        raise UserError(f"--classes {','.join(map(str, args.classes))}: the ignore label {args.ignore_label} is "
                        "also one of the declared classes")
    for painting, name in zip(labels, args.labels):
        unknown = sorted(set(present_values(painting).tolist()) - {*args.classes, args.ignore_label})
        if unknown:
            raise UserError(f"{name}: label value {unknown[0]} is neither a class ({', '.join(map(str, args.classes))}) "
                            f"nor the ignore label {args.ignore_label}")
    return list(args.classes)


# The plan's recipe parts and the options that replace them.
RECIPE_OPTIONS = {"network": ("width", "levels", "padding", "norm", "dims", "norm_at_test"),
                  "patch, batch": ("patch", "batch_size"),
                  "optimizer": ("optimizer", "lr", "momentum", "weight_decay", "schedule", "warmup"),
                  "loss": ("loss", "class_weighting", "class_weights")}


def _record_overrides(args, plan, features, per_volume: bool) -> None:
    """The printed and stored plan shows what runs: options that replaced a planned choice say so."""
    plan.given = {part for part, options in RECIPE_OPTIONS.items()
                  if any(getattr(args, option, None) not in (None, False) for option in options)}
    if _augmentation_given(args):
        plan.given.add("augmentation")
    if args.filter_features != "auto":
        plan.override("inputs", "the image and ilastik's filter bank" if features else "the image alone",
                      f"--filter-features {args.filter_features}")
    if args.per_volume is not None or args.normalization:
        method = args.normalization or "zscore"
        plan.override("normalization", f"{method} {'per volume' if per_volume else 'of the training images'}",
                      "given as an option")


def _augmentation_given(args) -> bool:
    return any(getattr(args, name) not in (None, False) for name in AUGMENTATION_OPTIONS)


def _input_features(args, plan, spacing) -> dict | None:
    """The filter bank the network reads: the plan's unless --filter-features says otherwise."""
    if args.filter_features == "off" or (args.filter_features == "auto" and plan is None):
        return None
    if args.filter_features == "on":
        return input_feature_spec(spacing)
    return plan.input_features


# The paper's configuration (--preset paper): its tile and batch, weighted cross-entropy, its augmentation.
PAPER_TRAINING = {"iterations": DEFAULT_ITERATIONS, "patch": (116, 132, 132), "batch_size": 1, "optimizer": "adam",
                  "lr": 1e-3, "momentum": 0.99, "weight_decay": 0.0, "schedule": "constant", "warmup": 0.0,
                  "loss": "ce", "class_weighting": "inverse_sqrt"}
# Options that override a TrainConfig field of the plan: option name -> field.
TRAINING_OPTIONS = {"iterations": "iterations", "patch": "patch_shape", "batch_size": "batch_size",
                    "optimizer": "optimizer", "lr": "learning_rate", "momentum": "momentum",
                    "weight_decay": "weight_decay", "schedule": "schedule", "warmup": "warmup", "loss": "loss",
                    "class_weighting": "class_weighting", "class_weights": "class_weights"}
AUGMENTATION_OPTIONS = ("no_augment", "rotation", "scale", "elastic_spacing", "elastic_sigma", "no_flip")


def _config(args, data, plan) -> TrainConfig:
    if args.resume:
        stored = TrainConfig.from_dict(load_checkpoint(run_files(args.output)["checkpoint"])["config"])
        return dataclasses.replace(stored, iterations=args.iterations or stored.iterations,
                                   max_time=args.max_time if args.max_time is not None else stored.max_time)
    try:
        base = plan.config(data, args.seed) if plan else _paper_config(args, data)
        given = {field: getattr(args, option) for option, field in TRAINING_OPTIONS.items()
                 if getattr(args, option) is not None}
        network = network_config(args, **base.network.to_dict())
        network = type(network).from_dict({**network.to_dict(), "in_channels": data.channels,
                                           "num_classes": len(data.class_values)})
        config = dataclasses.replace(base, network=network, augmentation=_augmentation(args, base.augmentation),
                                     max_time=args.max_time, seed=args.seed, workers=args.workers, amp=args.amp,
                                     validate_every=args.validate_every, checkpoint_every=args.checkpoint_every,
                                     **given)
        return dataclasses.replace(config, plan=plan.to_dict(config)) if plan else config
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _paper_config(args, data) -> TrainConfig:
    network = network_config(args, in_channels=data.channels, num_classes=len(data.class_values))
    paper = {TRAINING_OPTIONS[k]: v for k, v in PAPER_TRAINING.items()}
    return TrainConfig(network=network, **paper, augmentation=AugmentationConfig())


def _augmentation(args, planned: AugmentationConfig) -> AugmentationConfig:
    """The plan's augmentation, or the paper's with the options given applied."""
    if not _augmentation_given(args):
        return planned
    base = AugmentationConfig()
    return dataclasses.replace(
        base, enabled=not args.no_augment, flip=not args.no_flip,
        **{field: value for field, value in (("rotation_deg", args.rotation), ("elastic_spacing", args.elastic_spacing),
                                             ("elastic_sigma", args.elastic_sigma),
                                             ("scale", tuple(args.scale) if args.scale else None)) if value is not None})
