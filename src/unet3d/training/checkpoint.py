"""Resumable training state, written atomically so a kill at any moment leaves a loadable file.

Only tensors and plain Python values are stored, so loading uses torch.load(weights_only=True)
and never executes pickled code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from unet3d.atomic import atomic_path
from unet3d.errors import UserError


def save_checkpoint(path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: unreadable checkpoint ({exc.__class__.__name__})") from None


def run_files(model_path) -> dict[str, Path]:
    """The files a run writes next to its model file `name.safetensors`."""
    model_path = Path(model_path)
    stem = model_path.name.removesuffix(".safetensors")
    base = model_path.with_name(stem)
    return {
        "model": model_path,
        "best": base.with_name(stem + ".best.safetensors"),
        "checkpoint": base.with_name(stem + ".checkpoint.pt"),
        "log": base.with_name(stem + ".log.jsonl"),
        "curve": base.with_name(stem + ".curve.png"),
    }
