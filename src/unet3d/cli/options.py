"""Argument types and option groups shared by several subcommands."""

from __future__ import annotations

import argparse

from unet3d.model.unet import NORMS, PADDINGS, PRESETS, UNetConfig
from unet3d.workflows.densify import THREADS as DENSIFY_THREADS


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: …)" only where there is a default and the help does not already state one."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Refuse a bad option in one line, like every other bad input, instead of argparse's usage block
    followed by the error (`--help` shows the usage)."""

    def error(message: str):
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    parser.error = error
    return parser


def positive_seconds(text: str) -> float:
    """A time budget: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def int_triple(text: str) -> tuple[int, int, int]:
    """'Z,Y,X' or a single 'N' (meaning N,N,N) → three positive ints."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected Z,Y,X integers, got {text!r}") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers Z,Y,X, got {text!r}")
    return values


def float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_network_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("network")
    group.add_argument("--preset", choices=sorted(PRESETS), help="start from a named configuration (paper: the 2016 network)")
    group.add_argument("--width", type=int, help="channels of the first convolution (paper: 32)")
    group.add_argument("--levels", type=int, help="resolution levels, i.e. poolings + 1 (paper: 4)")
    group.add_argument("--padding", choices=PADDINGS, help="valid: unpadded convolutions, seamless tiling (paper); same: zero-padded")
    group.add_argument("--norm", choices=NORMS, help="normalization after each convolution (paper: batch)")
    group.add_argument("--dims", type=int, choices=(2, 3), help="3: 3D U-Net; 2: 2D U-Net applied to every z-slice")
    group.add_argument("--norm-at-test", choices=("running", "batch"),
                       help="batch norm at prediction: running statistics (usual) or the batch's own (the paper)")


def network_config(args, **defaults) -> UNetConfig:
    """Preset (or `defaults`), overridden by whichever network options the user gave."""
    base = PRESETS[args.preset].to_dict() if getattr(args, "preset", None) else UNetConfig(**defaults).to_dict()
    for key in ("width", "levels", "padding", "norm", "dims", "norm_at_test", "in_channels", "num_classes"):
        value = getattr(args, key, None)
        if value is not None:
            base[key] = value
    return UNetConfig(**base)


def add_run_options(parser) -> None:
    """Device, threads and progress options shared by densify and demo."""
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=DENSIFY_THREADS,
                        help="torch CPU threads (default: all cores); 1 costs least CPU on a machine busy with "
                        "other work")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
