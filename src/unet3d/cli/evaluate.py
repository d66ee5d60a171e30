"""`unet3d evaluate`: IoU and Dice per class of a segmentation against a dense ground truth, or object
matching scores of instance labels."""

from __future__ import annotations

import argparse
import json

from unet3d.errors import UserError
from unet3d.evaluation.report import instance_table, score_table
from unet3d.evaluation import evaluate_volumes, match_instances
from unet3d.io import read_labels


def value_or_none(text: str) -> int | None:
    """An integer label value, or 'none' for no such class (evaluate: every class is foreground;
    instances: no boundary class)."""
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer label value or 'none', got {text!r}") from None


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="IoU and Dice per class of a segmentation against a dense ground truth",
        description="Compare a predicted label volume with a dense ground truth, voxel by voxel, on "
        "label values: IoU and Dice per class, and mean IoU over all classes and over the foreground "
        "classes. A class found in neither volume has no score and is left out of the means. With "
        "--exclude SPARSE only the voxels SPARSE leaves unlabeled are counted — the paper's measure "
        "of how well a network trained on SPARSE generalises to the voxels nobody annotated. With --instances both "
        "volumes hold object ids (0: no object) and objects are matched one to one at IoU 0.5 and 0.75: precision, "
        "recall, F1 and average precision TP/(TP+FP+FN), as in the StarDist and Cellpose papers; with --exclude, "
        "objects are their parts on the unannotated voxels.",
    )
    parser.add_argument("prediction", metavar="PREDICTION", help="predicted label volume (Z, Y, X); FILE:KEY for a dataset in a container")
    parser.add_argument("truth", metavar="TRUTH", help="dense ground-truth label volume of the same shape")
    parser.add_argument("--exclude", metavar="SPARSE",
                        help="sparse label volume used for training: evaluate only the voxels where it holds the ignore label")
    parser.add_argument("--ignore-label", type=int, metavar="N", help="the value of unlabeled voxels in SPARSE (required with --exclude)")
    parser.add_argument("--background", type=value_or_none, default=0, metavar="N",
                        help="label value left out of the foreground mean (default 0; 'none': every class is foreground)")
    parser.add_argument("--instances", action="store_true",
                        help="both volumes hold object ids (e.g. from `unet3d instances`): match objects instead of "
                        "comparing classes (--background does not apply)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.set_defaults(run=run)


def run(args) -> int:
    if (args.exclude is None) != (args.ignore_label is None):
        raise UserError("--exclude and --ignore-label go together: the ignore label says which voxels of SPARSE are unlabeled")
    prediction = read_labels(args.prediction)[0]
    truth = read_labels(args.truth)[0]
    _check_shape(args.prediction, prediction.shape, args.truth, truth.shape)
    exclude = None
    if args.exclude is not None:
        exclude = read_labels(args.exclude)[0]
        _check_shape(args.exclude, exclude.shape, args.truth, truth.shape)
    if args.instances:
        mask = None if exclude is None else exclude == args.ignore_label
        result = match_instances(prediction, truth, mask)
    else:
        result = evaluate_volumes(prediction, truth, exclude, args.ignore_label, args.background)
    if args.exclude is not None and result["voxels"] == 0:
        raise UserError(f"{args.exclude}: every voxel is annotated (none holds the ignore label {args.ignore_label}); nothing to evaluate")
    if args.json:
        print(json.dumps({"prediction": args.prediction, "truth": args.truth, "exclude": args.exclude,
                          "ignore_label": args.ignore_label, **result}))
    else:
        where = f", those holding the ignore label {args.ignore_label} in {args.exclude}" if args.exclude else ""
        print((instance_table if args.instances else score_table)(result, where))
    return 0


def _check_shape(path: str, shape, truth_path: str, truth_shape) -> None:
    if shape != truth_shape:
        raise UserError(f"{path}: shape {_size(shape)} differs from {truth_path}: shape {_size(truth_shape)}")


def _size(shape) -> str:
    return "×".join(map(str, shape))
