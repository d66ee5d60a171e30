"""`unet3d export`: a saved model as an ONNX file or a BioImage.IO model package."""

from __future__ import annotations

import getpass
from pathlib import Path

from unet3d.errors import UserError
from unet3d.export import DEFAULT_OPSET, export_onnx
from unet3d.io import open_volume, parse_spec
from unet3d.model import ModelInfo, load_model
from unet3d.training.checkpoint import run_files


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a saved model as ONNX or as a BioImage.IO model package",
        description="Write MODEL for other software. --onnx: an ONNX graph (batch norm folded, input "
        "'image' (N, C, Z, Y, X) float32 normalized as the model's description says, output 'logits'; "
        "batch and spatial sizes free; the description in the metadata under 'unet3d'). --bioimageio: "
        "a BioImage.IO model package (.zip) for ilastik, deepImageJ/Fiji and bioimageio.core: weights as "
        "PyTorch state dict, TorchScript and ONNX, the intensity normalization as pre-processing, class "
        "probabilities out, test tensors cut from --sample, a README and a cover; `unet3d predict` runs "
        "it too. Needs the onnx extra, and the bioimageio extra for packages.",
    )
    parser.add_argument("model", help="a model file written by `unet3d train` or `unet3d densify`")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--onnx", metavar="OUT.onnx", help="ONNX file to write")
    target.add_argument("--bioimageio", metavar="OUT.zip", help="BioImage.IO model package to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset version (default {DEFAULT_OPSET})")
    package = parser.add_argument_group("BioImage.IO package")
    package.add_argument("--sample", metavar="IMAGE",
                         help="image to cut the package's test tensors from (default: the model's first "
                         "training image, where it still exists)")
    package.add_argument("--name", help="the model's name, 5 to 128 characters (default: the model file's name and \"(unet3d)\")")
    package.add_argument("--author", action="append", metavar="NAME",
                         help="an author (repeat for several; default: your login name)")
    package.add_argument("--license", default="CC-BY-4.0", help="SPDX licence of the package (default CC-BY-4.0)")
    parser.add_argument("--network-alone", action="store_true",
                        help="a model that blends its network with a random forest: export the network alone "
                        "(neither format can hold the forest); without it such a model is refused")
    parser.set_defaults(run=run)


def network_info(args, info: ModelInfo) -> ModelInfo:
    """The model's description for a format that holds the network alone: a model blended with a
    forest is refused unless --network-alone, which says what the network alone scored."""
    if info.forest is None:
        return info
    scores = (info.forest.get("evidence") or {}).get("mean_iou") or {}
    scored = (f" (held-out mean IoU: network alone {scores['network']:.3f}, blend {scores['blend']:.3f})"
              if scores else "")
    if not args.network_alone:
        raise UserError(f"{args.model}: blends its network with a random forest{scored}, which ONNX and BioImage.IO "
                        "cannot hold; add --network-alone to export the network alone")
    print(f"exporting the network alone{scored}")
    return info.without_forest()


def run(args) -> int:
    model, info = load_model(args.model)
    info = network_info(args, info)
    if args.onnx:
        export_onnx(model, args.onnx, info=info, opset=args.opset)
        print(f"wrote {args.onnx}")
        return 0
    from unet3d.export.bioimageio import export_bioimageio

    with open_volume(_sample(args, info), "image") as sample:
        image = sample.read()
    name = args.name or f"{Path(args.model).name.removesuffix('.safetensors')} (unet3d)"
    export_bioimageio(model, info, args.bioimageio, sample=image, name=name,
                      authors=args.author or [getpass.getuser()], license=args.license,
                      curve=run_files(args.model)["curve"])
    print(f"wrote {args.bioimageio}")
    return 0


def _sample(args, info: ModelInfo) -> str:
    if args.sample:
        return args.sample
    sources = info.training.get("sources") or []
    if sources and Path(parse_spec(str(sources[0])).path).exists():
        return str(sources[0])
    raise UserError(f"{args.model}: its training images are not at hand; give --sample IMAGE to cut the "
                    "package's test tensors from")
