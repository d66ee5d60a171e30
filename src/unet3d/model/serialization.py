"""Self-describing model files: safetensors weights plus a JSON description in the metadata.

A model file holds everything prediction needs (architecture, classes, ignore label, intensity
normalization, patch geometry, voxel spacing, versions) and loads without executing any code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch

import unet3d
from unet3d.atomic import atomic_path
from unet3d.errors import UserError
from unet3d.model.unet import UNet, UNetConfig

FORMAT = "unet3d-model/1"


def save_model(path, model: UNet, info: dict | None = None) -> None:
    """Write weights and description atomically; `info` must be JSON-serialisable."""
    description = {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "info": info or {},
        "versions": {"unet3d": unet3d.__version__, "torch": torch.__version__, "numpy": np.__version__},
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(state, str(tmp), metadata={"unet3d": json.dumps(description)})


def read_description(path) -> dict:
    """The JSON description of a model file, without loading its weights."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: model file not found")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise UserError(f"{path}: not a unet3d model file ({exc})") from None
    if "unet3d" not in metadata:
        raise UserError(f"{path}: safetensors file without a unet3d description")
    description = json.loads(metadata["unet3d"])
    if description.get("format") != FORMAT:
        raise UserError(f"{path}: unsupported model format {description.get('format')!r}")
    return description


def load_model(path, device: str | torch.device = "cpu") -> tuple[UNet, dict]:
    """Rebuild the network from a model file; returns (model in eval mode, info)."""
    description = read_description(path)
    model = UNet(UNetConfig.from_dict(description["config"]))
    try:
        state = safetensors.torch.load_file(str(path), device=str(device))
        model.load_state_dict(state)
    except Exception as exc:
        raise UserError(f"{path}: weights do not match the described network ({exc})") from None
    return model.to(device).eval(), description["info"]
