"""`unet3d instances`: objects (one id each) from the class probabilities densify or predict saved."""

from __future__ import annotations

import os

import numpy as np

from unet3d.cli.evaluate import value_or_none
from unet3d.cli.options import DefaultsHelpFormatter, float_list, int_list
from unet3d.errors import UserError
from unet3d.instances import KINDS, instances_from_probabilities
from unet3d.io import parse_spec, read_image, write_volume

PROBABILITY_SLACK = 1e-2  # float16 maps and blends stray this far outside [0, 1] at most


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "instances",
        help="objects, one id each, from saved class probabilities",
        description="Cut PROBABILITIES — the (K, Z, Y, X) class probabilities written by `unet3d densify "
        "--probabilities` or `unet3d predict --probabilities` — into objects and write their labels to OUTPUT "
        "(0: no object, 1..N: one id per object, numbered in raster order). Seeds where the object is surely "
        "inside, grown by a watershed on the boundary probability. --kind nuclei: blobs on a background, seeds "
        "from the interior class, grown over the voxels the other classes do not claim; --kind cells: cells "
        "bounded by walls, seeds far from the thresholded walls (a distance transform), grown everywhere. Each "
        "kind has one fixed parameter set (docs/instances.md). The whole volume is processed in memory.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("probabilities", metavar="PROBABILITIES", help="class probabilities (K, Z, Y, X); FILE:KEY in a container")
    parser.add_argument("-o", "--output", required=True, metavar="OUTPUT", help="instance labels to write (.tif .nii.gz .h5 .zarr .npy ...)")
    parser.add_argument("--kind", choices=sorted(KINDS), default="nuclei", help="what the objects are")
    parser.add_argument("--classes", type=int_list, metavar="V,V,...",
                        help="the class value of each channel, in order, as densify and predict number them: the "
                        "sorted class values of the training labels (default: 0,1,...,K-1)")
    parser.add_argument("--interior", type=int, default=1, metavar="N", help="class value of object interiors")
    parser.add_argument("--boundary", type=value_or_none, default=2, metavar="N",
                        help="class value of object boundaries (walls); 'none' for blobs without one (e.g. "
                        "mitochondria), which then flood on 1 - P(interior)")
    parser.add_argument("--spacing", type=float_list, metavar="Z,Y,X",
                        help="voxel spacing for distances (default: from the file, else isotropic)")
    parser.add_argument("--channel-axis", type=int, metavar="N", help="the file's channel axis, if not detected")
    parser.set_defaults(run=run)


def run(args) -> int:
    target, source = parse_spec(args.output), parse_spec(args.probabilities)  # unknown extensions fail here
    if (os.path.realpath(target.path), target.key) == (os.path.realpath(source.path), source.key):
        raise UserError(f"{args.output}: would overwrite the probabilities")
    if args.boundary is None and KINDS[args.kind].seed_class != "interior":
        raise UserError(f"--kind {args.kind} --boundary none: cells are bounded by walls, a boundary class is needed")
    if args.spacing is not None and (len(args.spacing) != 3 or min(args.spacing) <= 0):
        raise UserError(f"--spacing {','.join(f'{v:g}' for v in args.spacing)}: expected three positive numbers Z,Y,X")
    probabilities, meta = read_image(args.probabilities, args.channel_axis)
    classes = channel_classes(args.probabilities, probabilities, args.classes, args.interior, args.boundary)
    labels = instances_from_probabilities(probabilities, classes, KINDS[args.kind], args.interior, args.boundary,
                                          args.spacing or meta.spacing)
    write_volume(args.output, labels, like=meta)
    print(f"{int(labels.max())} objects ({args.kind}) in {'x'.join(map(str, labels.shape))} voxels")
    print(f"wrote {args.output}")
    return 0


def channel_classes(spec: str, probabilities: np.ndarray, classes, interior: int, boundary: int | None) -> list[int]:
    """The class value of each channel, checked against the file and the interior and boundary classes."""
    count = probabilities.shape[0]
    if count < 2:
        raise UserError(f"{spec}: a single channel, not class probabilities (one channel per class, K, Z, Y, X)")
    classes = list(range(count)) if classes is None else classes
    if len(classes) != count:
        raise UserError(f"{spec}: {count} channel(s), but --classes names {len(classes)}")
    if len(set(classes)) != count:
        raise UserError(f"--classes {','.join(map(str, classes))}: a class value appears twice")
    for name, value in (("interior", interior), ("boundary", boundary)):
        if value is not None and value not in classes:
            raise UserError(f"{spec}: no channel holds the {name} class {value} (channels: "
                            f"{','.join(map(str, classes))}; set --classes or --{name})")
    if interior == boundary:
        raise UserError(f"--interior and --boundary are both {interior}: objects need two classes")
    low, high = float(probabilities.min()), float(probabilities.max())
    if low < -PROBABILITY_SLACK or high > 1 + PROBABILITY_SLACK:
        raise UserError(f"{spec}: values from {low:g} to {high:g} are not class probabilities (0 to 1)")
    return classes
