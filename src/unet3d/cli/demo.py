"""`unet3d demo`: the semi-automatic job on the built-in example, start to finish."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from unet3d.cli.options import DefaultsHelpFormatter, add_run_options, positive_int
from unet3d.device import resolve_device
from unet3d.data.sparse import labeled_fraction, positions_for, sparsify
from unet3d.io import read_image, read_labels, write_volume
from unet3d.workflows.densify_files import densify_and_write

IGNORE = 255
SLICES = (3, 3, 2)  # the paper's table: 3, 3 and 2 annotated slices along Z, Y and X


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="densify the built-in example from a few of its slices and report IoU",
        description="Keep 3, 3 and 2 orthogonal slices of the built-in example's ground truth (a confocal "
        "nuclei crop, 31×61×57 voxels; StarDist, BSD-3-Clause), train on them alone, segment the whole "
        "volume, report IoU on the voxels that were not annotated, and write the segmentation, the model "
        "and a PNG of slices with the result overlaid.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("-o", "--output", default="demo-output", metavar="DIR", help="folder for the results")
    parser.add_argument("--max-time", type=float, default=120.0, metavar="SECONDS",
                        help="time for the filter bank, the forest and training, as for densify")
    parser.add_argument("--iterations", type=positive_int, metavar="N",
                        help="train N steps with no time limit instead (the forest grows all its trees): the same "
                        "result on any machine, as the tests check it")
    parser.add_argument("--seed", type=int, default=0)
    add_run_options(parser)
    parser.set_defaults(run=run)


def example_files() -> tuple[str, str]:
    folder = resources.files("unet3d.examples") / "nuclei_tiny"
    return str(folder / "image.tif"), str(folder / "labels.tif")


def run(args) -> int:
    image_path, truth_path = example_files()
    out = Path(args.output)
    image, meta = read_image(image_path)
    truth, _ = read_labels(truth_path)
    sparse = sparsify(truth, SLICES, IGNORE)
    write_volume(str(out / "sparse.tif"), sparse, like=meta)
    positions = positions_for(truth.shape, SLICES)
    print(f"example: {image_path} ({'×'.join(map(str, truth.shape))} voxels, Z×Y×X)")
    print(f"annotated slices kept: Z {positions[0]}, Y {positions[1]}, X {positions[2]} — "
          f"{labeled_fraction(sparse, IGNORE):.1%} of the voxels; the rest is unlabeled ({IGNORE})")
    budget = ({"max_time": None, "iterations": args.iterations} if args.iterations else {"max_time": args.max_time})
    print("learning from these slices alone " + (f"for {args.iterations} steps ..." if args.iterations
                                                 else f"for up to {args.max_time:.0f} s ..."))
    report = densify_and_write(image, sparse, meta, str(out / "segmentation.tif"), IGNORE, truth=truth,
                               **budget, seed=args.seed, source=image_path, spacing=meta.spacing,
                               device=resolve_device(args.device), threads=args.threads,
                               progress=not args.quiet)
    print(report)
    return 0
