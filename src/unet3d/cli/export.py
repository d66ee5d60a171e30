"""`unet3d export`: a saved model as an ONNX file, for ONNX Runtime and other inference engines."""

from __future__ import annotations

from unet3d.export import DEFAULT_OPSET, export_onnx
from unet3d.model import load_model


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a saved model as ONNX (needs the onnx extra)",
        description="Write MODEL as an ONNX graph: batch norm folded, input 'image' (N, C, Z, Y, X) "
        "float32, normalized as the model's description says, output 'logits' (N, K, Z', Y', X'); "
        "batch and spatial sizes are free (any valid tile size). The model's configuration, classes "
        "and normalization are stored in the ONNX metadata under 'unet3d'.",
    )
    parser.add_argument("model", help="a model file written by `unet3d train`")
    parser.add_argument("--onnx", required=True, metavar="OUT.onnx", help="ONNX file to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset version (default {DEFAULT_OPSET})")
    parser.set_defaults(run=run)


def run(args) -> int:
    model, info = load_model(args.model)
    export_onnx(model, args.onnx, info=info, opset=args.opset)
    print(f"wrote {args.onnx}")
    return 0
