"""Reading a BioImage.IO package that unet3d exported: its network and description, as a model file gives them."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch

from unet3d.errors import UserError
from unet3d.model.info import ModelInfo
from unet3d.model.unet import UNet, UNetConfig


def bioimageio_spec():
    """bioimageio.spec's v0.5 model format, or one line saying how to install it."""
    try:
        from bioimageio.spec.model import v0_5
    except ImportError:
        raise UserError("BioImage.IO packages need bioimageio.spec (pip install 'unet3d[bioimageio]')") from None
    return v0_5


def is_package(path) -> bool:
    """Whether `path` names a BioImage.IO package (a .zip, a folder or its rdf/bioimageio.yaml)."""
    path = Path(path)
    return path.suffix.lower() in (".zip", ".yaml", ".yml") or path.is_dir()


def load_package(path, device: str | torch.device = "cpu") -> tuple[UNet, ModelInfo]:
    """(network in eval mode, its description) from a package written by `unet3d export
    --bioimageio`; every file's hash is checked against the package's description first."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: model package not found")
    bioimageio_spec()
    from bioimageio.spec import load_model_description

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            description = load_model_description(path, perform_io_checks=True)  # checks every file's SHA-256
    except ValueError as exc:
        reason = [line.strip() for line in str(exc).splitlines() if line.strip()][-1]
        raise UserError(f"{path}: not a valid BioImage.IO model package ({reason})") from None
    unet3d_description = (description.config.model_extra or {}).get("unet3d")
    weights = description.weights.pytorch_state_dict
    if not unet3d_description or weights is None:
        raise UserError(f"{path}: a BioImage.IO package not made by unet3d (no unet3d description); "
                        "run it with bioimageio.core")
    model = UNet(UNetConfig.from_dict(unet3d_description["config"]))
    try:
        state = torch.load(io.BytesIO(weights.get_reader().read()), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:
        raise UserError(f"{path}: weights do not match the described network ({exc})") from None
    return model.to(device).eval(), ModelInfo.of(dict(unet3d_description["info"]), model.config)
