"""`unet3d train`: learn a segmentation from sparsely annotated volumes."""

from __future__ import annotations

import argparse

from unet3d.augmentation import AugmentationConfig
from unet3d.cli.options import DefaultsHelpFormatter, add_network_options, float_list, int_list, int_triple, positive_seconds
from unet3d.data.labels import check_painting_shape, painted_classes, present_values
from unet3d.data.normalization import METHODS as NORMALIZATION_METHODS
from unet3d.errors import UserError
from unet3d.io import read_image, read_labels
from unet3d.training.config import CLASS_WEIGHTING, LOSSES, OPTIMIZERS, SCHEDULES
from unet3d.training.distributed import DEFAULT_TIMEOUT, Processes, joined
from unet3d.workflows.densify import FILTER_FEATURES_MIN_ANNOTATED
from unet3d.workflows.forest import FOREST_MAX_SHARE
from unet3d.workflows.plan import DEFAULT_ITERATIONS, PER_VOLUME_SPREAD_RATIO
from unet3d.workflows.train import Changes, TrainOptions, train_volumes

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
    images, labels, meta = load_pairs(args.images, args.labels, args.channel_axis)
    classes = checked_paintings(images, labels, args)
    validation = []
    if args.val_images:
        val_images, val_labels, _ = load_pairs(args.val_images, args.val_labels, args.channel_axis)
        validation = list(zip(val_images, val_labels, args.val_images))
    options = TrainOptions(
        output=args.output, sources=list(args.images), ignore_label=args.ignore_label, classes=classes,
        spacing=args.spacing or meta.spacing, preset=args.preset, max_time=args.max_time, iterations=args.iterations,
        seed=args.seed, forest=ON_OFF[args.forest], changes=changes(args), validation=validation, workers=args.workers,
        amp=args.amp, validate_every=args.validate_every, checkpoint_every=args.checkpoint_every, resume=args.resume,
        threads=args.threads, progress=not args.quiet)
    train_volumes(images, labels, options, processes)
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


ON_OFF = {"auto": None, "on": True, "off": False}
# Options that change a TrainConfig field of the recipe: option name -> field.
TRAINING_OPTIONS = {"patch": "patch_shape", "batch_size": "batch_size", "optimizer": "optimizer", "lr": "learning_rate",
                    "momentum": "momentum", "weight_decay": "weight_decay", "schedule": "schedule", "warmup": "warmup",
                    "loss": "loss", "class_weighting": "class_weighting", "class_weights": "class_weights"}
NETWORK_OPTIONS = ("width", "levels", "padding", "norm", "dims", "norm_at_test")
AUGMENTATION_OPTIONS = {"rotation": "rotation_deg", "scale": "scale", "elastic_spacing": "elastic_spacing",
                        "elastic_sigma": "elastic_sigma"}


def changes(args) -> Changes:
    """The options given, as changes to the plan (or to --preset paper)."""
    given = lambda option: getattr(args, option) is not None  # noqa: E731
    augmentation = None
    if args.no_augment or args.no_flip or any(given(option) for option in AUGMENTATION_OPTIONS):
        augmentation = {"enabled": not args.no_augment, "flip": not args.no_flip,
                        **{field: tuple(args.scale) if option == "scale" else getattr(args, option)
                           for option, field in AUGMENTATION_OPTIONS.items() if given(option)}}
    return Changes(network={option: getattr(args, option) for option in NETWORK_OPTIONS if given(option)},
                   training={field: getattr(args, option) for option, field in TRAINING_OPTIONS.items() if given(option)},
                   augmentation=augmentation, filter_features=ON_OFF[args.filter_features],
                   normalization=args.normalization, per_volume=args.per_volume)
