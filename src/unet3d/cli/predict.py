"""`unet3d predict`: segment a volume of any size with a saved model, tile by tile."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from unet3d.cli.instances import add_objects_group, check_objects, probabilities_for_objects, write_objects
from unet3d.cli.options import int_triple, positive_int
from unet3d.device import resolve_device
from unet3d.errors import UserError
from unet3d.inference import predict_volume
from unet3d.inference.distributed import CONNECT_TIMEOUT, DEFAULT_BLOCK, predict_distributed
from unet3d.inference.predictor import DEFAULT_MAX_MEMORY
from unet3d.io import open_volume, parse_spec
from unet3d.model import load_predictor

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def memory_size(text: str) -> int:
    """'2G', '512M', '1.5G' or a plain number of bytes (binary units) → bytes."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    try:
        size = float(value[: len(value) - len(unit)]) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 2G or 512M, got {text!r}") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return int(size)



def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment a volume of any size with a saved model",
        description="Segment IMAGE with MODEL and write the label map to OUTPUT (format from its "
        "extension; the input's geometry, e.g. a NIfTI affine, is kept). Tiling is seamless: output "
        "tiles edge to edge, each read with all the context its output depends on, so the result "
        "does not depend on the tile size or --max-memory (same-padding models can blend "
        "overlapping windows instead, with --overlap). With HDF5 or "
        "Zarr input and output, tiles are read and written one at a time, so volumes larger than "
        "memory work. With --dask, blocks of the volume are predicted on a Dask cluster and written "
        "into an OME-Zarr store (see the --dask options below).",
    )
    parser.add_argument("model", help="a model file written by `unet3d train`, or a BioImage.IO package "
                        "(.zip or folder) exported from one")
    parser.add_argument("image", help="image volume: a path, or file.h5:/dataset, image.zarr:/key")
    parser.add_argument("-o", "--output", required=True, help="label map to write (.tif .nii.gz .h5 .zarr .npy ...)")
    parser.add_argument("--probabilities", metavar="FILE", help="also write class probabilities (K, Z, Y, X) as float16")
    parser.add_argument("--uncertainty", metavar="FILE",
                        help="also write per-voxel uncertainty: entropy of the probabilities / log K (0 certain, 1 uniform), float32")
    parser.add_argument("--tile", type=int_triple, metavar="Z,Y,X",
                        help="output tile size, rounded to the network's grid (default: the largest that fits --max-memory)")
    parser.add_argument("--max-memory", type=memory_size, metavar="SIZE",
                        help=f"memory for one batch of tiles, e.g. 2G or 512M (default {DEFAULT_MAX_MEMORY >> 30}G on the CPU, "
                        "half the free memory of a GPU)")
    parser.add_argument("--batch-size", type=positive_int, default=1, metavar="N", help="tiles per forward pass (default 1)")
    parser.add_argument("--overlap", type=float,
                        help="same-padding models only: blend windows overlapping by this fraction (e.g. 0.25) "
                        "instead of seamless tiles; no context margin to pay, but the result then depends on "
                        "the window size")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average the probabilities over all 8 mirrorings of each "
                        "tile; 8 forward passes, so 8x the time")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when available")
    parser.add_argument("--channel-axis", type=int, metavar="N", help="the image file's channel axis, if not detected")
    parser.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads for PyTorch")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_objects_group(parser)
    cluster = parser.add_argument_group(
        "prediction on a Dask cluster (needs unet3d[distributed])",
        "OUTPUT is then an OME-Zarr 0.5 store (.zarr): the class probabilities (float16) as its image, the "
        "label map under labels/segmentation, each with a pyramid of halved levels. IMAGE must be Zarr, HDF5 or "
        ".npy, at the same path on every worker, and so must OUTPUT and MODEL. Running the same command again "
        "after an interruption predicts only the blocks still missing. --max-memory is per task; "
        "--probabilities and --uncertainty are refused (OUTPUT holds the probabilities).")
    cluster.add_argument("--dask", metavar="ADDRESS",
                         help="local (one worker process per CPU core), local:N (N worker processes), or the "
                         "address of a running scheduler, tcp://HOST:PORT")
    cluster.add_argument("--block", type=int_triple, metavar="Z,Y,X",
                         help=f"block and output chunk size, rounded up to whole output tiles for valid-padding "
                         f"models (default {DEFAULT_BLOCK} per axis, at most the volume)")
    cluster.add_argument("--skip-empty", type=float, metavar="THRESHOLD",
                         help="do not predict blocks whose raw intensities are all at most THRESHOLD: they are "
                         "written as the first class with probability 1 (default: off, every block is predicted)")
    cluster.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT, metavar="SECONDS",
                         help=f"give up on a scheduler not reached within this time (default {CONNECT_TIMEOUT:g})")
    parser.set_defaults(run=run)


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.overlap is not None and not 0 <= args.overlap < 1:
        raise UserError(f"--overlap {args.overlap}: must be in [0, 1)")
    if args.dask:
        return _run_on_dask(args)
    if args.block or args.skip_empty is not None:
        raise UserError(f"{'--block' if args.block else '--skip-empty'}: only with --dask")
    device = resolve_device(args.device)
    outputs = [spec for spec in (args.output, args.probabilities, args.uncertainty, args.objects) if spec]
    check_outputs(outputs, args.image)
    model, info, forest = load_predictor(args.model)
    check_objects(args.model, info.class_values, args)
    with open_volume(args.image, "image", args.channel_axis) as source, \
            probabilities_for_objects(args.probabilities, args.objects) as probabilities:
        _check_image(args.image, source.shape, args.model, info.image_channels(model.config))
        summary = predict_volume(
            model, info, source, args.output, probabilities, args.uncertainty, tile=args.tile,
            max_memory=args.max_memory, batch_size=args.batch_size, tta=args.tta, device=str(device),
            overlap=args.overlap, progress=not args.quiet, report=lambda note: print(note, file=sys.stderr),
            forest=forest,
        )
        if args.objects:
            count, _ = write_objects(probabilities, args.objects, args.kind, info.class_values, args.interior,
                                     args.boundary)
            print(f"{count} objects ({args.kind})")
    _report(summary, outputs)
    return 0


def _run_on_dask(args) -> int:
    if args.objects:
        raise UserError(f"--objects: not with --dask; run `unet3d instances {args.output} -o {args.objects}` on "
                        "the store it writes")
    if args.probabilities or args.uncertainty:
        raise UserError(f"{'--probabilities' if args.probabilities else '--uncertainty'}: not with --dask, whose "
                        "OUTPUT store holds the probabilities as its image and the labels under labels/")
    check_outputs([args.output], args.image)
    summary = predict_distributed(
        args.dask, args.model, args.image, args.output, block=args.block, tile=args.tile,
        max_memory=args.max_memory, batch_size=args.batch_size, tta=args.tta, overlap=args.overlap,
        channel_axis=args.channel_axis, skip_empty=args.skip_empty, device=args.device,
        connect_timeout=args.connect_timeout, progress=not args.quiet,
        report=lambda note: print(note, file=sys.stderr),
    )
    shape, block = ("x".join(map(str, summary[key])) for key in ("shape", "block"))
    print(f"predicted {summary['predicted']} of {summary['blocks']} block(s) of {block} ({summary['already_done']} "
          f"already done, {summary['empty']} empty) of {shape} voxels on {summary['workers']} worker(s): "
          f"{summary['seconds']:.1f} s, {summary['voxels_per_second']:,.0f} voxels/s; "
          f"{summary['levels']} level(s) in {summary['total_seconds']:.1f} s")
    print(f"wrote {args.output}")
    return 0


def check_outputs(specs: list[str], image: str) -> None:
    """Refuse outputs that cannot be written before any time is spent computing them."""
    source = parse_spec(image)
    seen = set()
    for spec in specs:
        parsed = parse_spec(spec)  # unknown extension → UserError
        target = (os.path.realpath(parsed.path), parsed.key)
        if target == (os.path.realpath(source.path), source.key):
            raise UserError(f"{spec}: would overwrite the input image")
        if target in seen:
            raise UserError(f"{spec}: given for two outputs")
        seen.add(target)
        _check_writable(spec, Path(parsed.path), parsed.format)


def _check_writable(spec: str, path: Path, fmt: str) -> None:
    """Create and remove a file where the output's temporary file will go: permission bits alone
    miss read-only or virtual file systems (/proc) and privileged users."""
    if path.is_dir() and fmt != "zarr":
        raise UserError(f"{spec}: is a directory")
    folder = path.parent
    while not folder.exists():  # the writer creates missing folders from the nearest existing one
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{spec}: cannot create the output, {folder} is not a directory")
    try:
        handle, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
    except OSError as exc:
        raise UserError(f"{spec}: cannot write to directory {folder} ({exc.strerror or exc})") from None
    os.close(handle)
    os.remove(probe)


def _check_image(spec: str, shape: tuple, model_path: str, in_channels: int) -> None:
    if min(shape[1:]) < 1:
        raise UserError(f"{spec}: empty volume of shape {tuple(shape[1:])} (Z, Y, X)")
    if shape[0] != in_channels:
        raise UserError(
            f"{spec}: {shape[0]} channel(s), but {model_path} expects {in_channels} "
            "(use --channel-axis if the channels were not detected)"
        )


def _report(summary: dict, outputs: list[str]) -> None:
    shape = "x".join(map(str, summary["shape"]))
    tile_in = "x".join(map(str, summary["input_tile"]))
    tile_out = "x".join(map(str, summary["output_tile"]))
    blend = ", blended with the model's forest" if summary["forest"] else ""
    print(f"predicted {shape} voxels in {summary['tiles']} tile(s) of {tile_in} -> {tile_out}{blend}: "
          f"{summary['seconds']:.1f} s, {summary['voxels_per_second']:,.0f} voxels/s")
    print("labels: " + ", ".join(f"{value}: {share:.1%}" for value, share in summary["class_fractions"].items()))
    for spec in outputs:
        print(f"wrote {spec}")
