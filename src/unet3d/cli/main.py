"""`unet3d` command line: one subcommand per module, bad input reported in one line."""

from __future__ import annotations

import argparse
import importlib
import sys

from unet3d import __version__
from unet3d.cli.options import one_line_errors
from unet3d.errors import UserError

# Each module defines register(subparsers), which adds its parser and sets `run`.
COMMANDS = ["summary", "sparsify", "train", "predict", "densify", "instances", "suggest", "evaluate", "export", "napari", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unet3d",
        description="Dense 3D segmentation learned from a few annotated slices (3D U-Net).",
    )
    parser.add_argument("--version", action="version", version=f"unet3d {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"unet3d.cli.{name}").register(subparsers)
    for command in [parser, *subparsers.choices.values()]:
        one_line_errors(command)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except UserError as exc:
        print(f"unet3d {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permissions, vanished files: still one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"unet3d {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"unet3d {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
