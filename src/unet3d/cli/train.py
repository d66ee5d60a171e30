"""`unet3d train`: learn a segmentation from sparsely annotated volumes."""

from __future__ import annotations

import dataclasses

from unet3d.augmentation import AugmentationConfig
from unet3d.cli.options import (DefaultsHelpFormatter, add_network_options, float_list, int_list, int_triple,
                                network_config)
from unet3d.errors import UserError
from unet3d.io import read_image, read_labels
from unet3d.training import TrainConfig, train
from unet3d.training.checkpoint import load_checkpoint, run_files
from unet3d.training.config import CLASS_WEIGHTING, LOSSES, OPTIMIZERS, SCHEDULES
from unet3d.training.dataset import prepare_training_set
from unet3d.workflows.densify import default_config

DEFAULT_NETWORK = dict(width=16, levels=4, padding="valid", norm="batch")


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
    data.add_argument("--normalization", choices=("zscore", "percentile", "none"), default="zscore",
                      help="intensity normalization fitted on the training images and stored with the model")
    data.add_argument("--per-volume", action="store_true",
                      help="fit the normalization on each volume, in training and at prediction, instead of once on "
                      "the training images: for volumes whose intensity scale differs from scan to scan (MRI)")
    parser.add_argument("-o", "--output", required=True, metavar="MODEL", help="model file to write (.safetensors)")
    add_network_options(parser)
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--recipe", choices=("densify",),
                     help="densify: densify's network and training (small same-padding U-Net, flips, Dice + "
                     "cross-entropy, cosine schedule over --max-time) instead of the options below, to train a model "
                     "for `unet3d densify --init` on volumes like the ones to densify")
    opt.add_argument("--iterations", type=int, default=2000, help="stop after this many steps")
    opt.add_argument("--max-time", type=float, metavar="SECONDS",
                     help="stop after this much training time, whichever comes first; schedules anneal over it")
    opt.add_argument("--patch", type=int_triple, default=(116, 132, 132), metavar="Z,Y,X",
                     help="network input patch, rounded to a valid size (the paper: 116,132,132)")
    opt.add_argument("--batch-size", type=int, default=1)
    opt.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="sgd with momentum is the paper's")
    opt.add_argument("--lr", type=float, default=1e-3, help="base learning rate")
    opt.add_argument("--momentum", type=float, default=0.99, help="SGD momentum")
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--schedule", choices=SCHEDULES, default="constant", help="learning-rate schedule")
    opt.add_argument("--warmup", type=float, default=0.0, help="fraction of the run with a rising learning rate")
    opt.add_argument("--loss", choices=LOSSES, default="ce", help="weighted cross-entropy, or Dice + cross-entropy")
    opt.add_argument("--class-weighting", choices=CLASS_WEIGHTING, default="inverse_sqrt",
                     help="class weights from the labeled voxels' class frequencies")
    opt.add_argument("--class-weights", type=float_list, metavar="W,W,...", help="manual class weights")
    aug = parser.add_argument_group("augmentation")
    aug.add_argument("--no-augment", action="store_true", help="train on plain crops")
    defaults = AugmentationConfig()
    aug.add_argument("--rotation", type=float, default=defaults.rotation_deg, help="maximum rotation per axis (degrees)")
    aug.add_argument("--scale", type=float_list, default=list(defaults.scale), metavar="LOW,HIGH", help="scaling range")
    aug.add_argument("--elastic-spacing", type=float, default=defaults.elastic_spacing,
                     help="voxels between the deformation's control points (the paper: 32)")
    aug.add_argument("--elastic-sigma", type=float, default=defaults.elastic_sigma,
                     help="standard deviation of the control points' displacement in voxels (the paper: 4; 0 disables)")
    aug.add_argument("--no-flip", action="store_true", help="no random mirroring")
    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0, help="makes a CPU run reproducible")
    run.add_argument("--workers", type=int, default=0, help="processes preparing augmented patches in the background")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    run.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, all cores)")
    run.add_argument("--amp", action="store_true", help="bf16 mixed precision (CUDA only)")
    run.add_argument("--validate-every", type=int, default=200, help="iterations between validations")
    run.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                     help="seconds between checkpoints (model file and resumable state)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run that wrote MODEL.checkpoint.pt from where it stopped")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_train)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return name


def load_pairs(images, labels, channel_axis):
    if len(images) != len(labels):
        raise UserError(f"{len(images)} image(s) but {len(labels)} label volume(s): give one label volume per image")
    pairs = [(read_image(i, channel_axis), read_labels(l)) for i, l in zip(images, labels)]
    return [p[0][0] for p in pairs], [p[1][0] for p in pairs], pairs[0][0][1]


def run_train(args) -> int:
    device = resolve_device(args.device)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    images, labels, meta = load_pairs(args.images, args.labels, args.channel_axis)
    spacing = args.spacing or meta.spacing
    data = prepare_training_set(images, labels, args.ignore_label, sources=args.images,
                                num_classes=args.num_classes, class_values=args.classes,
                                normalization=args.normalization, spacing=spacing, per_volume=args.per_volume)
    validation = None
    if args.val_images:
        val_images, val_labels, _ = load_pairs(args.val_images, args.val_labels, args.channel_axis)
        validation = prepare_training_set(val_images, val_labels, args.ignore_label, sources=args.val_images,
                                          class_values=data.class_values, normalization=data.normalization,
                                          spacing=data.spacing)
    config = _config(args, data)
    result = train(config, data, args.output, validation=validation, resume=args.resume, device=device,
                   progress=not args.quiet)
    print(f"trained {result.iterations} iterations in {result.seconds:.0f} s (stopped by {result.stopped_by}); "
          f"model written to {args.output}")
    return 0


def _config(args, data) -> TrainConfig:
    if args.resume:
        stored = TrainConfig.from_dict(load_checkpoint(run_files(args.output)["checkpoint"])["config"])
        stored.iterations = args.iterations
        stored.max_time = args.max_time
        return stored
    if args.recipe == "densify":
        return dataclasses.replace(default_config(data, max_time=args.max_time, iterations=args.iterations,
                                                  seed=args.seed), checkpoint_every=args.checkpoint_every,
                                   workers=args.workers, validate_every=args.validate_every)
    try:
        network = network_config(args, in_channels=data.channels, num_classes=len(data.class_values),
                                 **DEFAULT_NETWORK)
        network = type(network).from_dict({**network.to_dict(), "in_channels": data.channels,
                                            "num_classes": len(data.class_values)})
        augmentation = AugmentationConfig(
            enabled=not args.no_augment, rotation_deg=args.rotation, scale=tuple(args.scale),
            elastic_spacing=args.elastic_spacing, elastic_sigma=args.elastic_sigma, flip=not args.no_flip)
        return TrainConfig(
            network=network, patch_shape=args.patch, batch_size=args.batch_size, iterations=args.iterations,
            max_time=args.max_time, optimizer=args.optimizer, learning_rate=args.lr, momentum=args.momentum,
            weight_decay=args.weight_decay, schedule=args.schedule, warmup=args.warmup, loss=args.loss,
            class_weighting=args.class_weighting, class_weights=args.class_weights,
            normalization=args.normalization, augmentation=augmentation, seed=args.seed, workers=args.workers,
            amp=args.amp, validate_every=args.validate_every,
            checkpoint_every=args.checkpoint_every)
    except ValueError as exc:
        raise UserError(str(exc)) from None
