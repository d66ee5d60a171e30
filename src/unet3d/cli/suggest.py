"""`unet3d suggest`: which slice to annotate next."""

from __future__ import annotations

import argparse
import json

from unet3d.cli.options import DefaultsHelpFormatter, float_list, positive_seconds
from unet3d.device import resolve_device
from unet3d.errors import UserError
from unet3d.interactive.suggest import AXIS_NAMES, DEFAULT_STRATEGY, STRATEGIES
from unet3d.io import read_image, read_labels
from unet3d.workflows.densify_files import output_base
from unet3d.workflows.suggest import suggest_slices, suggestion_figure


def axes_list(text: str) -> tuple[int, ...]:
    names = [a.strip().lower() for a in text.split(",") if a.strip()]
    if not names or any(a not in AXIS_NAMES for a in names):
        raise argparse.ArgumentTypeError(f"{text!r}: give some of z, y, x separated by commas")
    return tuple(sorted({AXIS_NAMES.index(a) for a in names}))


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "suggest",
        help="rank the slices not yet annotated: which one to paint next",
        description="Rank the slices of IMAGE (along z, y and x) that SPARSE does not annotate yet by how many "
        "voxels the current network expects to get wrong there (the sum of 1 - its highest class probability over "
        "the slice's unannotated voxels), damped near slices already annotated along the same axis, the volume's "
        "outermost slices last (painting them helped no more than their neighbours); print the best "
        "--count and write a PNG of the best one with the current segmentation and its uncertainty. The network is "
        "--model, or one trained now for --max-time seconds on the annotated voxels as the napari loop trains it "
        "(densify's recipe on the image alone, blended with ilastik's forest). A slice counts "
        "as annotated from half of its voxels on. How it compares: with a simulated annotator on eight real "
        "volumes, no ranking saved slices against evenly spaced ones beyond the noise between training seeds "
        "(random slices did as well; docs/suggest.md); use it to find where the network is wrong, and keep "
        "spreading slices evenly when in doubt.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("image", help="image volume (.tif .nii.gz .h5:/dataset .zarr .npy ...)")
    parser.add_argument("sparse", help="sparse labels of the same volume")
    parser.add_argument("--ignore-label", type=int, required=True, metavar="N", help="the value of unannotated voxels")
    parser.add_argument("--model", metavar="MODEL", help="judge with this trained model instead of training one now")
    parser.add_argument("--count", type=int, default=5, metavar="K", help="how many slices to list")
    parser.add_argument("--axes", type=axes_list, default=(0, 1, 2), metavar="z,y,x",
                        help="axes whose slices are candidates (default: all three)")
    parser.add_argument("--max-time", type=positive_seconds, default=60.0, metavar="SECONDS",
                        help="training time of the network when no --model is given")
    parser.add_argument("--strategy", choices=STRATEGIES, default=DEFAULT_STRATEGY,
                        help="how slices are scored (docs/suggest.md compares them)")
    parser.add_argument("--figure", metavar="PNG", help="picture of the best slice (default: SPARSE's name + .suggest.png)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--seed", type=int, default=0, help="seed of the network's training")
    parser.add_argument("--channel-axis", type=int, help="channel axis of a multi-channel image (default: detected)")
    parser.add_argument("--spacing", type=float_list, metavar="Z,Y,X", help="voxel spacing (default: from the file)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.set_defaults(run=run)


def run(args) -> int:
    if args.count < 1:
        raise UserError(f"--count must be at least 1, got {args.count}")
    image, meta = read_image(args.image, args.channel_axis)
    sparse, _ = read_labels(args.sparse)
    result = suggest_slices(image, sparse, args.ignore_label, model_path=args.model, max_time=args.max_time,
                            count=args.count, axes=args.axes, strategy=args.strategy, seed=args.seed,
                            spacing=args.spacing or meta.spacing, device=str(resolve_device(args.device)),
                            source=args.sparse)
    figure = args.figure or f"{output_base(args.sparse)}.suggest.png"
    suggestion_figure(figure, image, result)
    if args.json:
        print(json.dumps({**result.to_dict(), "figure": figure}))
        return 0
    print(f"judged by {result.network}; slices to annotate next, best first:")
    print("| rank | axis | index | score |")
    print("|---|---|---|---|")
    for rank, s in enumerate(result.suggestions, start=1):
        print(f"| {rank} | {AXIS_NAMES[s.axis]} | {s.index} | {s.score:,.4g} |")
    print(f"wrote {figure}")
    return 0
