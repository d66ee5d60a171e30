"""The one place a device name given by a user becomes a torch device."""

from __future__ import annotations

import torch

from unet3d.errors import UserError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """'auto' → the GPU when PyTorch sees one, else the CPU; 'cuda', 'cuda:N', 'cpu' as given.
    Asking for CUDA where there is none is a one-line error, not a crash inside training."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device available to PyTorch {torch.__version__}")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (cpu, cuda, cuda:N or auto)") from None
