"""Self-describing model files: safetensors weights plus a JSON description in the metadata.

A model file holds everything prediction needs (architecture, classes, ignore label, intensity
normalization, patch geometry, voxel spacing, versions, and the random forest blended with the
network when it has one: `model.forest`) and loads without executing any code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch

import unet3d
from unet3d.errors import UserError
from unet3d.io.writers import write_bytes
from unet3d.model.forest import TENSOR as FOREST_TENSOR, ForestModel
from unet3d.model.info import ModelInfo
from unet3d.model.package import is_package, load_package
from unet3d.model.unet import UNet, UNetConfig

FORMAT = "unet3d-model/1"


def save_model(path, model: UNet, info: ModelInfo | dict | None = None, forest: ForestModel | None = None) -> None:
    """Write weights (and `forest`, blended with the network at prediction) and description
    atomically."""
    info = ModelInfo.of(info or {}, model.config).without_forest().to_dict()
    if forest is not None:
        info["forest"] = forest.describe()
    description = {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "info": info,
        "versions": {"unet3d": unet3d.__version__, "torch": torch.__version__, "numpy": np.__version__},
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if forest is not None:
        state[FOREST_TENSOR] = torch.frombuffer(bytearray(forest.to_bytes()), dtype=torch.uint8)
    write_bytes(path, safetensors.torch.save(state, metadata={"unet3d": json.dumps(description)}))


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
        raise UserError(f"{path}: {_unknown_format(description)}")
    return description


def _unknown_format(description: dict) -> str:
    """Why a model file's format cannot be read: most often a newer unet3d wrote it."""
    found = str(description.get("format"))
    writer = (description.get("versions") or {}).get("unet3d", "an unknown version")
    name, _, number = found.rpartition("/")
    if name == FORMAT.rpartition("/")[0] and number.isdigit() and int(number) > int(FORMAT.rpartition("/")[2]):
        return (f"written by a newer unet3d ({writer}) in model format {found}; this unet3d {unet3d.__version__} "
                f"reads {FORMAT}: upgrade unet3d")
    return f"unsupported model format {found!r} (written by unet3d {writer}; this one reads {FORMAT})"


def load_model(path, device: str | torch.device = "cpu") -> tuple[UNet, ModelInfo]:
    """Rebuild the network from a model file; returns (model in eval mode, info)."""
    description = read_description(path)
    model = UNet(UNetConfig.from_dict(description["config"]))
    try:
        state = safetensors.torch.load_file(str(path), device=str(device))
        state.pop(FOREST_TENSOR, None)
        model.load_state_dict(state)
    except Exception as exc:
        raise UserError(f"{path}: weights do not match the described network ({exc})") from None
    return model.to(device).eval(), ModelInfo.of(description["info"], model.config)


def load_forest(path, info: ModelInfo | None = None) -> ForestModel | None:
    """The forest a model file blends with its network (None: the network alone)."""
    forest = read_description(path)["info"].get("forest") if info is None else info.forest
    if forest is None:
        return None
    with safetensors.safe_open(str(path), framework="np") as f:
        if FOREST_TENSOR not in f.keys():
            raise UserError(f"{path}: the description names a forest the file does not hold")
        data = f.get_tensor(FOREST_TENSOR).tobytes()
    return ForestModel.from_parts(forest, data, str(path))


def load_predictor(path, device: str | torch.device = "cpu") -> tuple[UNet, ModelInfo, ForestModel | None]:
    """(network in eval mode, its description, the forest it blends with or None) from a model
    file or a BioImage.IO package exported from one (which holds the network alone)."""
    if is_package(path):
        return *load_package(path, device), None
    model, info = load_model(path, device)
    return model, info, load_forest(path, info)
