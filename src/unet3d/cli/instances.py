"""`unet3d instances`: objects (one id each) from the class probabilities densify or predict saved;
also the objects that `predict --objects` and `densify --objects` write beside the class labels."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from unet3d.cli.evaluate import value_or_none
from unet3d.cli.options import DefaultsHelpFormatter, float_list, int_list, int_triple
from unet3d.data.features import free_memory
from unet3d.errors import UserError
from unet3d.instances import KINDS, instances_blockwise, instances_from_probabilities
from unet3d.instances.blockwise import DEFAULT_BLOCK, DEFAULT_HALO
from unet3d.interactive.large import IN_MEMORY_VOXELS
from unet3d.io import open_volume, parse_spec, volume_writer, write_volume

PROBABILITY_SLACK = 1e-2  # float16 maps and blends stray this far outside [0, 1] at most
# Bytes a voxel that the whole-volume method holds besides the float32 probabilities: distances,
# seeds, the watershed's float64 copies, the labels (about 30 measured on 1.6 M voxels; twice that
# for room).
WHOLE_VOLUME_BYTES = 64


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
        "kind has one fixed parameter set (docs/instances.md). Volumes up to "
        f"{IN_MEMORY_VOXELS // 1_000_000} M voxels that fit in free memory are processed whole in memory, larger "
        f"ones block by block (memory follows the block; the seeds are exact, the flood is the whole volume's "
        f"where it stays within {DEFAULT_HALO} voxels of each block).",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("probabilities", metavar="PROBABILITIES", help="class probabilities (K, Z, Y, X); FILE:KEY in a container")
    parser.add_argument("-o", "--output", required=True, metavar="OUTPUT", help="instance labels to write (.tif .nii.gz .h5 .zarr .npy ...)")
    add_object_options(parser)
    parser.add_argument("--classes", type=int_list, metavar="V,V,...",
                        help="the class value of each channel, in order, as densify and predict number them: the "
                        "sorted class values of the training labels (default: 0,1,...,K-1)")
    parser.add_argument("--spacing", type=float_list, metavar="Z,Y,X",
                        help="voxel spacing for distances (default: from the file, else isotropic)")
    parser.add_argument("--block", type=int_triple, metavar="Z,Y,X",
                        help=f"process block by block, blocks of this size (the default for large volumes is "
                        f"{','.join(map(str, DEFAULT_BLOCK))}), each read with {DEFAULT_HALO} voxels around it")
    parser.add_argument("--channel-axis", type=int, metavar="N", help="the file's channel axis, if not detected")
    parser.set_defaults(run=run)


def add_objects_group(parser) -> None:
    """predict's and densify's --objects, with the options of `unet3d instances` that say what they are."""
    group = parser.add_argument_group(
        "objects (as `unet3d instances`)",
        "With --objects, the class probabilities also go through `unet3d instances` (in a temporary file "
        "unless --probabilities keeps them): --kind, --interior and --boundary name class values of the model, "
        "which knows the channel of each.")
    group.add_argument("--objects", metavar="FILE", help="also write instance labels, one id per object, to FILE")
    add_object_options(group, "--objects")


def add_object_options(parser, flag: str = "") -> None:
    """--kind, --interior and --boundary, for `unet3d instances` and for the objects predict and
    densify write (`flag`: the option they need, named in the help)."""
    needs = f"; with {flag}" if flag else ""
    parser.add_argument("--kind", choices=sorted(KINDS), default="nuclei",
                        help=f"what the objects are (default: nuclei{needs})")
    parser.add_argument("--interior", type=int, default=1, metavar="N",
                        help=f"class value of object interiors (default: 1{needs})")
    parser.add_argument("--boundary", type=value_or_none, default=2, metavar="N",
                        help=f"class value of object boundaries (walls); 'none' for blobs without one (e.g. "
                        f"mitochondria), which then flood on 1 - P(interior) (default: 2{needs})")


def run(args) -> int:
    target, source = parse_spec(args.output), parse_spec(args.probabilities)  # unknown extensions fail here
    if (os.path.realpath(target.path), target.key) == (os.path.realpath(source.path), source.key):
        raise UserError(f"{args.output}: would overwrite the probabilities")
    check_kind(args.kind, args.boundary)
    if args.spacing is not None and (len(args.spacing) != 3 or min(args.spacing) <= 0):
        raise UserError(f"--spacing {','.join(f'{v:g}' for v in args.spacing)}: expected three positive numbers Z,Y,X")
    count, shape = write_objects(args.probabilities, args.output, args.kind, args.classes, args.interior, args.boundary,
                                 args.spacing, args.block, args.channel_axis)
    print(f"{count} objects ({args.kind}) in {'x'.join(map(str, shape))} voxels")
    print(f"wrote {args.output}")
    return 0


def check_kind(kind: str, boundary: int | None) -> None:
    if boundary is None and KINDS[kind].seed_class != "interior":
        raise UserError(f"--kind {kind} --boundary none: cells are bounded by walls, a boundary class is needed")


def check_objects(spec: str, class_values, args) -> None:
    """Refuse --objects whose interior or boundary class is not among `class_values` (those of the
    model `spec`, or of the labels it is trained on) before any time is spent."""
    if args.objects:
        check_kind(args.kind, args.boundary)
        channel_classes(spec, len(class_values), class_values, args.interior, args.boundary, option="")


@contextlib.contextmanager
def probabilities_for_objects(probabilities: str | None, objects: str | None):
    """Where predict or densify saves the probabilities: the file asked for, else, for --objects, a
    temporary Zarr store beside the objects (removed afterwards), else nowhere (None)."""
    if objects is None or probabilities is not None:
        yield probabilities
        return
    with tempfile.TemporaryDirectory(prefix=".unet3d-probabilities.", dir=existing_folder(objects)) as folder:
        yield str(Path(folder) / "probabilities.zarr")


def write_objects(probabilities: str, output: str, kind: str, classes, interior: int, boundary: int | None,
                  spacing=None, block=None, channel_axis: int | None = None) -> tuple[int, tuple]:
    """The objects of the probabilities file `probabilities` written to `output`: whole in memory,
    or block by block with `block` or beyond what memory holds. Returns (objects, volume shape)."""
    with open_volume(probabilities, "image", channel_axis) as volume:
        classes = channel_classes(probabilities, volume.shape[0], classes, interior, boundary)
        shape, meta, method = tuple(volume.shape[1:]), volume.meta, KINDS[kind]
        spacing, checked = spacing or meta.spacing, CheckedProbabilities(volume, probabilities)
        if block is None and fits_in_memory(volume.shape):
            labels = instances_from_probabilities(checked.read(), classes, method, interior, boundary, spacing)
            write_volume(output, labels, like=meta)
            return int(labels.max()), shape
        with contextlib.ExitStack() as outputs:
            labels = WriterTarget(outputs, output, shape, meta)
            instances_blockwise(checked, classes, method, interior, boundary, spacing, out=labels.open,
                                block=block or DEFAULT_BLOCK, workdir=existing_folder(output))
        return labels.count, shape


def fits_in_memory(shape) -> bool:
    """Whether the whole-volume method suits (K, Z, Y, X) probabilities: at most IN_MEMORY_VOXELS
    voxels (as napari's loop), and its arrays fit in the memory free now."""
    voxels, free = math.prod(shape[1:]), free_memory()
    return voxels <= IN_MEMORY_VOXELS and (free is None or voxels * (4 * shape[0] + WHOLE_VOLUME_BYTES) <= free)


def existing_folder(spec: str) -> str | None:
    """The output's folder where it exists: the temporary ids of a large volume go beside the output,
    where there is room for it, not into a small system temporary folder."""
    folder = Path(parse_spec(spec).path).parent
    return str(folder) if folder.is_dir() else None


class CheckedProbabilities:
    """A (K, Z, Y, X) volume read box by box, each box refused unless it holds probabilities."""

    def __init__(self, volume, spec: str):
        self._volume, self._spec, self.shape = volume, spec, volume.shape

    def read(self, region=None) -> np.ndarray:
        data = self._volume.read(region)
        low, high = float(data.min()), float(data.max())
        if low < -PROBABILITY_SLACK or high > 1 + PROBABILITY_SLACK:
            raise UserError(f"{self._spec}: values from {low:g} to {high:g} are not class probabilities (0 to 1)")
        return data


class WriterTarget:
    """The output file, made when the labels' type is known (`open`), taking blocks by `[box] =`;
    counts the objects written."""

    def __init__(self, outputs: contextlib.ExitStack, spec: str, shape: tuple, meta):
        self._outputs, self._spec, self._shape, self._meta = outputs, spec, shape, meta
        self._writer, self.count = None, 0

    def open(self, dtype) -> WriterTarget:
        self._writer = self._outputs.enter_context(volume_writer(self._spec, self._shape, dtype, like=self._meta))
        return self

    def __setitem__(self, box, labels: np.ndarray) -> None:
        self._writer.write(box, labels)
        self.count = max(self.count, int(labels.max(initial=0)))


def channel_classes(spec: str, count: int, classes, interior: int, boundary: int | None,
                    option: str = "--classes or ") -> list[int]:
    """The class value of each of `count` channels (`classes`, default 0..count-1), checked against the
    interior and boundary classes; `option`: what to set besides --interior or --boundary."""
    if count < 2:
        raise UserError(f"{spec}: a single channel, not class probabilities (one channel per class, K, Z, Y, X)")
    classes = list(range(count)) if classes is None else list(classes)
    if len(classes) != count:
        raise UserError(f"{spec}: {count} channel(s), but --classes names {len(classes)}")
    if len(set(classes)) != count:
        raise UserError(f"--classes {','.join(map(str, classes))}: a class value appears twice")
    for name, value in (("interior", interior), ("boundary", boundary)):
        if value is not None and value not in classes:
            raise UserError(f"{spec}: no channel holds the {name} class {value} (channels: "
                            f"{','.join(map(str, classes))}; set {option}--{name})")
    if interior == boundary:
        raise UserError(f"--interior and --boundary are both {interior}: objects need two classes")
    return classes
