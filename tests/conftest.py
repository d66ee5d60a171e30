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


DEMO_ITERATIONS = 200  # the demo's training steps in the tests: its result is the same on any machine


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`unet3d demo --iterations 200` run once for the session (test_demo checks its files and
    report, test_densify the densify result behind them): (output folder, printed report,
    DensifyResult). The result is recorded on its way from densify to the demo's writing."""
    import contextlib
    import io

    from unet3d.cli.main import main
    from unet3d.workflows import densify_files

    folder = tmp_path_factory.mktemp("demo")
    results, densify = [], densify_files.densify

    def recorded(*args, **kwargs):
        results.append(densify(*args, **kwargs))
        return results[-1]

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(densify_files, "densify", recorded)
        assert main(["demo", "-o", str(folder), "--iterations", str(DEMO_ITERATIONS), "--quiet"]) == 0
    assert len(results) == 1
    return folder, printed.getvalue(), results[0]
