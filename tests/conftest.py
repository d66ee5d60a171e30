"""Shared fixtures: where the real volumes live, and skipping cleanly when they are absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("UNET3D_SHARED_DATA", REPO.parent / "shared" / "data"))
EXAMPLE = REPO / "src" / "unet3d" / "examples" / "nuclei_tiny"


def shared_volume(*parts: str) -> Path:
    """Path to a file under the shared data folder, or skip the test saying what is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} (set UNET3D_SHARED_DATA to the data folder)")
    return path


@pytest.fixture
def nuclei():
    """The bundled nuclei_tiny example: (image uint16 (31, 61, 57), labels uint8 0/1/2)."""
    import tifffile

    return tifffile.imread(EXAMPLE / "image.tif"), tifffile.imread(EXAMPLE / "labels.tif")
