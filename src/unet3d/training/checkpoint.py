"""Resumable training state, written atomically so a kill at any moment leaves a loadable file.

Only tensors and plain Python values are stored, so loading uses torch.load(weights_only=True)
and never executes pickled code.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from unet3d.errors import UserError
from unet3d.io.writers import write_bytes


def save_checkpoint(path, state: dict) -> None:
    """Serialized in memory first: torch.save reports a full disk as an opaque RuntimeError, a plain
    write as the OSError that names the problem."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getbuffer())


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
