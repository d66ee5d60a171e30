"""`unet3d sparsify`: simulate sparse annotation by keeping a few orthogonal slices of a dense truth."""

from __future__ import annotations

import argparse

import numpy as np

from unet3d.data.sparse import labeled_fraction, positions_for, slices_for_fraction, sparsify
from unet3d.errors import UserError
from unet3d.io import read_labels, write_volume

AXES = "ZYX"


def slice_counts(text: str) -> tuple[int, int, int]:
    """'A,B,C' → three non-negative ints (0: no slice perpendicular to that axis)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three integers A,B,C, got {text!r}") from None
    if len(values) != 3 or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected three non-negative integers A,B,C, got {text!r}")
    return values


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sparsify",
        help="keep a few orthogonal slices of a dense label volume, mark the rest unlabeled",
        description="Simulate sparse annotation (the 3D U-Net paper's protocol): keep A slices "
        "perpendicular to Z (xy-planes), B perpendicular to Y (xz-planes) and C perpendicular to X "
        "(yz-planes) of a dense label volume and write every other voxel as the ignore label. Along an "
        "axis of n voxels, k slices lie at round((i+1)·n/(k+1)), i = 0…k-1, halves rounded up. Train "
        "on the result, then measure with `unet3d evaluate --exclude SPARSE` on the voxels not kept.",
    )
    parser.add_argument("truth", metavar="TRUTH", help="dense label volume (Z, Y, X); FILE:KEY for a dataset in a container")
    parser.add_argument("-o", "--output", required=True, metavar="SPARSE",
                        help="sparse label volume to write; the format follows the extension")
    amount = parser.add_mutually_exclusive_group(required=True)
    amount.add_argument("--slices", type=slice_counts, metavar="A,B,C",
                        help="slices to keep perpendicular to Z, Y and X (0 allowed), e.g. 1,1,1 or 3,4,4")
    amount.add_argument("--fraction", type=float, metavar="F",
                        help="keep about this fraction of the voxels (0 < F < 1): the same share of slices "
                        "along every axis, at least one per axis; the achieved fraction is printed")
    parser.add_argument("--random", action="store_true",
                        help="random distinct slice positions instead of evenly spread ones")
    parser.add_argument("--seed", type=int, help="random seed for --random (default 0), for reproducible draws")
    parser.add_argument("--ignore-label", type=int, required=True, metavar="N",
                        help="value of the voxels not kept; must not occur in TRUTH (e.g. 255, or 3 as in the paper)")
    parser.set_defaults(run=run)


def run(args) -> int:
    if args.seed is not None and not args.random:
        raise UserError("--seed only applies to random slice positions; add --random")
    if args.slices is not None and not any(args.slices):
        raise UserError("--slices 0,0,0 keeps no voxel; keep at least one slice")
    truth, meta = read_labels(args.truth)
    slices = args.slices or _slices_for_fraction(truth.shape, args.fraction)
    rng = np.random.default_rng(args.seed or 0) if args.random else None
    try:
        positions = positions_for(truth.shape, slices, rng)
    except ValueError as exc:
        raise UserError(f"{args.truth}: {exc}") from None
    sparse = sparsify(truth, slices, args.ignore_label, positions=positions, source=args.truth)
    write_volume(args.output, sparse, like=meta)
    print(_report(args, truth.shape, slices, positions, sparse))
    return 0


def _slices_for_fraction(shape, fraction: float) -> tuple[int, ...]:
    try:
        return slices_for_fraction(shape, fraction)
    except ValueError as exc:
        raise UserError(f"--fraction {fraction}: {exc}") from None


def _report(args, shape, slices, positions, sparse) -> str:
    lines = [f"{args.truth}: {'×'.join(map(str, shape))} voxels (Z×Y×X)"]
    for axis, (n, k, axis_positions) in enumerate(zip(shape, slices, positions)):
        where = f" at {', '.join(map(str, axis_positions))}" if k else ""
        lines.append(f"  {AXES[axis]} ({n} voxels): {k} slice{'s' if k != 1 else ''}{where}")
    fraction = labeled_fraction(sparse, args.ignore_label)
    target = f", asked for {args.fraction:.2%}" if args.fraction is not None else ""
    lines.append(f"labeled: {round(fraction * sparse.size):,} of {sparse.size:,} voxels ({fraction:.2%}{target})")
    lines.append(f"wrote {args.output} (unlabeled voxels: {args.ignore_label})")
    return "\n".join(lines)
