"""`unet3d densify`: the semi-automatic workflow in one command."""

from __future__ import annotations

import time

from unet3d.cli.instances import add_objects_group, check_objects, probabilities_for_objects, write_objects
from unet3d.cli.options import DefaultsHelpFormatter, add_run_options, float_list, positive_int, positive_seconds
from unet3d.data.labels import check_painting_shape, painted_classes
from unet3d.cli.predict import check_outputs, memory_size
from unet3d.device import resolve_device
from unet3d.errors import UserError
from unet3d.io import open_volume, read_labels
from unet3d.workflows.densify import (
    FILTER_FEATURES_MIN_ANNOTATED,
    FOREST_MAX_SHARE,
    FOREST_TREES,
    HOLD_OUT_MIN_ANNOTATED,
    TTA_MAX_SHARE,
    StartingModel,
)
from unet3d.workflows.densify_files import densify_and_write

AUTO_ON_OFF = {"auto": None, "on": True, "off": False}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "densify",
        help="segment a whole volume from a few annotated slices of it",
        description="Semi-automatic segmentation: train a U-Net and ilastik's random forest on the annotated "
        "voxels of SPARSE (every voxel holding the ignore label is unlabeled), then segment every voxel of IMAGE "
        "by the geometric mean of their probabilities (weighted by how each scores on held-out annotated voxels when "
        "there are many). Besides SEGMENTATION it writes the trained network "
        "with the forest and the weight between them (reusable with `unet3d predict`, which segments with the same "
        "blend) and a PNG of slices with the "
        "result overlaid.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("image", help="image volume (.tif .nii.gz .h5:/dataset .zarr .npy ...)")
    parser.add_argument("sparse", help="sparse labels of the same volume")
    parser.add_argument("-o", "--output", required=True, metavar="SEGMENTATION", help="segmentation to write")
    parser.add_argument("--ignore-label", type=int, required=True, metavar="N",
                        help="the value of unannotated voxels (0 for napari/ilastik painting, 3 in the paper, 255, ...)")
    parser.add_argument("--num-classes", type=int, metavar="K", help="number of classes (default: inferred)")
    parser.add_argument("--max-time", type=positive_seconds, default=120.0, metavar="SECONDS",
                        help="time for the whole run: the filter bank, the forest, training and prediction (measured "
                        "before training and set aside; a volume whose prediction alone would not fit is refused "
                        "up front, saying what budget would)")
    parser.add_argument("--seed", type=int, default=0,
                        help="makes a CPU run reproducible (with --iterations; on large volumes the forest's size "
                        "and --tta auto also follow the clock)")
    parser.add_argument("--iterations", type=positive_int, default=100_000, help="training steps at most")
    parser.add_argument("--init", metavar="MODEL",
                        help="fine-tune this trained model (densify's of an earlier volume, or `unet3d train` on "
                        "volumes of the same kind; same channels and classes) instead of "
                        "training a new network, at a tenth of the learning rate; the model decides the inputs")
    parser.add_argument("--model", metavar="MODEL", help="where to write the model (default: SEGMENTATION's name + .model.safetensors)")
    parser.add_argument("--overlay", metavar="PNG", help="slices with the result overlaid (default: SEGMENTATION's name + .overlay.png)")
    parser.add_argument("--probabilities", metavar="FILE", help="also write class probabilities (K, Z, Y, X) float16")
    parser.add_argument("--truth", metavar="TRUTH", help="dense ground truth: report IoU on the unannotated voxels")
    parser.add_argument("--channel-axis", type=int, help="channel axis of a multi-channel image (default: detected)")
    parser.add_argument("--spacing", type=float_list, metavar="Z,Y,X", help="voxel spacing (default: from the file)")
    parser.add_argument("--filter-features", choices=AUTO_ON_OFF, default="auto",
                        help="also give the network ilastik's filter bank (61 filters per channel, computed for the "
                        "whole volume in memory) as input channels; auto: when at least "
                        f"{FILTER_FEATURES_MIN_ANNOTATED:,} voxels are annotated and the bank fits in memory "
                        "(it lifted EM by 0.14 IoU and lowered small nuclei and MRI crops with a few thousand "
                        "annotated voxels: docs/ablation.md)")
    parser.add_argument("--forest", choices=AUTO_ON_OFF, default="auto",
                        help="also fit ilastik's random forest on the filter bank of the annotated voxels and take "
                        "the geometric mean of its probabilities and the network's (from "
                        f"{HOLD_OUT_MIN_ANNOTATED:,} annotated voxels on, weighted by what scores best on a tenth of "
                        f"them that neither model trains on): up to {FOREST_TREES} trees, as "
                        f"many as fit in {FOREST_MAX_SHARE * 100:.0f}%% of --max-time, which the forest's time "
                        "comes out of; auto: when the bank fits in memory. The model file holds the forest too")
    parser.add_argument("--max-memory", type=memory_size, metavar="SIZE",
                        help="memory for the filter bank and prediction's tiles (e.g. 8G): a volume whose whole "
                        "bank needs more is trained on blocks around the annotation and predicted tile by tile, "
                        "the bank made there alone (default: the free memory decides)")
    parser.add_argument("--tta", choices=AUTO_ON_OFF, default="auto",
                        help="average the network's predictions of the 8 mirrored volumes; auto: when that costs at "
                        f"most {TTA_MAX_SHARE * 100:.0f}%% of --max-time (a small volume)")
    add_objects_group(parser)
    add_run_options(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    args.started = time.monotonic()  # --max-time counts from here: reading the labels is part of the command
    init = StartingModel.load(args.init) if args.init else None
    with open_volume(args.image, "image", args.channel_axis) as image:
        return densify_file(args, image, init)


def densify_file(args, image, init) -> int:
    """densify of the opened `image`: densify reads it whole, or box by box where its filter bank does
    not fit in memory (or --max-memory)."""
    meta = image.meta
    sparse, _ = read_labels(args.sparse)
    check_painting_shape(image.shape, sparse.shape, args.sparse, args.image)
    classes = init.class_values if init else painted_classes([sparse], [args.sparse], args.ignore_label,
                                                             args.num_classes)
    check_objects(args.init or args.sparse, classes, args)
    if args.objects:
        check_outputs([spec for spec in (args.output, args.probabilities, args.objects) if spec], args.image)
    truth = read_labels(args.truth)[0] if args.truth else None
    if truth is not None and truth.shape != sparse.shape:
        raise UserError(f"{args.truth}: shape {truth.shape} differs from {args.sparse}: {sparse.shape}")
    with probabilities_for_objects(args.probabilities, args.objects) as probabilities:
        report = densify_and_write(image, sparse, meta, args.output, args.ignore_label, model=args.model,
                                   overlay=args.overlay, probabilities=probabilities, truth=truth, source=args.image,
                                   max_time=args.max_time, iterations=args.iterations, seed=args.seed,
                                   num_classes=args.num_classes, spacing=args.spacing or meta.spacing,
                                   device=resolve_device(args.device), threads=args.threads, progress=not args.quiet,
                                   filter_features=AUTO_ON_OFF[args.filter_features], forest=AUTO_ON_OFF[args.forest],
                                   tta=AUTO_ON_OFF[args.tta], init=init, max_memory=args.max_memory, started=args.started, report=lambda line: print(line, flush=True))
        if args.objects:
            count, _ = write_objects(probabilities, args.objects, args.kind, classes, args.interior, args.boundary,
                                     args.spacing)
            report += f"\nwrote {args.objects} ({count} objects, {args.kind})"
    print(report)
    return 0
