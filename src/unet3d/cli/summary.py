"""`unet3d summary`: the layer table of a configuration or of a saved model."""

from __future__ import annotations

from unet3d.cli.options import add_network_options, int_triple, network_config
from unet3d.errors import UserError
from unet3d.model import UNetConfig, read_description
from unet3d.model.summary import summary_text


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "summary",
        help="print a network's layers, tile sizes, margin and parameter count",
        description="Print the layer table of a network configuration (or of a saved MODEL): output "
        "shapes, input/output tile sizes, the context margin per side and the parameter count.",
    )
    parser.add_argument("model", nargs="?", help="a saved model file (otherwise the configuration from the options)")
    parser.add_argument("--in-channels", type=int, help="image channels (paper: 3)")
    parser.add_argument("--num-classes", type=int, help="output classes (paper: 3)")
    add_network_options(parser)
    parser.add_argument("--input", type=int_triple, metavar="Z,Y,X",
                        help="input tile size; rounded up to the nearest valid size (default: the paper's 116,132,132)")
    parser.set_defaults(run=run)


def run(args) -> int:
    config = UNetConfig.from_dict(read_description(args.model)["config"]) if args.model else _config(args)
    shape = config.geometry.valid_input_shape(args.input) if args.input else None
    print(summary_text(config, shape))
    return 0


def _config(args) -> UNetConfig:
    try:
        return network_config(args, in_channels=1, num_classes=2)
    except ValueError as exc:
        raise UserError(str(exc)) from None
