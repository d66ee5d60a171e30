"""The shared volumes that benchmarks and experiments run on, loaded as (image (C, Z, Y, X),
dense truth (Z, Y, X)) through `unet3d.io`, as a user's files are read.

nuclei_tiny is the example bundled with the package, so the quick run needs nothing else; the
others come from the shared data folder (UNET3D_SHARED_DATA, else ../shared/data beside the
repository) and are never copied into the repository.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unet3d.errors import UserError
from unet3d.io import read_image

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "src" / "unet3d" / "examples" / "nuclei_tiny"
EM_VNC_SPACING = (50.0, 4.6, 4.6)  # nm (Z, Y, X): serial sections are 10× thicker than the pixels
QUARTER = 512
# Fixed hippocampus cases (the first ones by file name) for the per-volume experiments, and a
# fixed split for the fully automatic one: train on TRAIN_CASES, segment the unseen TEST_CASES.
HIPPOCAMPUS_CASES = ("001", "003", "004", "006", "007")
HIPPOCAMPUS_TRAIN = ("001", "003", "004", "006", "007", "008", "011", "014", "015", "017")
HIPPOCAMPUS_TEST = ("019", "020", "023", "024", "025")


@dataclass
class Volume:
    name: str  # dataset/case, used in run ids and file names
    image: np.ndarray  # (C, Z, Y, X)
    truth: np.ndarray  # (Z, Y, X) int64 class values 0..K-1
    spacing: tuple[float, float, float] | None
    background: int | None  # class left out of the foreground mean (None: all classes count)

    @property
    def num_classes(self) -> int:
        return int(self.truth.max()) + 1


def shared_data() -> Path:
    return Path(os.environ.get("UNET3D_SHARED_DATA", REPO.parent / "shared" / "data"))


def _require(path: Path) -> Path:
    if not path.exists():
        raise UserError(f"{path}: real data not found (set UNET3D_SHARED_DATA to the shared data folder)")
    return path


def nuclei_tiny() -> Volume:
    import tifffile

    image = tifffile.imread(EXAMPLE / "image.tif")[None]
    truth = tifffile.imread(EXAMPLE / "labels.tif").astype(np.int64)
    return Volume("nuclei_tiny", image, truth, None, 0)


def ovule() -> Volume:
    import h5py

    with h5py.File(_require(shared_data() / "ovule" / "ovule.h5"), "r") as f:
        image, truth = f["raw"][:][None], f["labels"][:].astype(np.int64)
    return Volume("ovule", image, truth, None, 0)


def em_vnc() -> Volume:
    """The whole 20×1024×1024 stack (21 M voxels); every class counts in the mean."""
    import tifffile

    folder = shared_data() / "em_vnc"
    image = tifffile.imread(_require(folder / "image.tif"))
    truth = tifffile.imread(_require(folder / "labels.tif")).astype(np.int64)
    return Volume("em_vnc", image[None], truth, EM_VNC_SPACING, None)


def em_vnc_quarter(index: int) -> Volume:
    """Quarter 0..3 of the 20×1024×1024 stack: rows then columns of 512×512 tiles.

    Class 0 is membrane, not background, so every class counts in the mean.
    """
    import tifffile

    folder = shared_data() / "em_vnc"
    row, column = divmod(index, 2)
    region = (slice(None), slice(row * QUARTER, (row + 1) * QUARTER), slice(column * QUARTER, (column + 1) * QUARTER))
    image = tifffile.imread(_require(folder / "image.tif"))[region]
    truth = tifffile.imread(_require(folder / "labels.tif"))[region].astype(np.int64)
    return Volume(f"em_vnc_q{index}", image[None], truth, EM_VNC_SPACING, None)


HALF_AXIS = {"em_vnc": 1}  # (Z, Y, X) axis each volume is halved across; others: x


def half(name: str, index: int) -> Volume:
    """Half 0 or 1 of a volume, cut across its longest in-plane axis (ovule: x, em_vnc: y,
    colin27: the left and right hemispheres): train on one half's slices, segment the other."""
    volume = load(name)
    axis = HALF_AXIS.get(name, 2)
    middle = volume.truth.shape[axis] // 2
    region = [slice(None)] * 3
    region[axis] = slice(0, middle) if index == 0 else slice(middle, None)
    region = tuple(region)
    return Volume(f"{name}_h{index}", volume.image[(slice(None),) + region], volume.truth[region],
                  volume.spacing, volume.background)


def _nifti_zyx(path: Path) -> np.ndarray:
    """A NIfTI volume as (Z, Y, X), read as `unet3d` reads it (its (x, y, z) axes reversed)."""
    return read_image(str(_require(path)))[0][0]


def hippocampus(case: str) -> Volume:
    """One MRI case; images and labels cast on load."""
    folder = shared_data() / "hippocampus"
    name = f"hippocampus_{case}.nii.gz"
    image = _nifti_zyx(folder / "images" / name).astype(np.float32)[None]
    truth = np.rint(_nifti_zyx(folder / "labels" / name)).astype(np.int64)
    return Volume(f"hippocampus_{case}", image, truth, None, 0)


def hippocampus_names() -> list[str]:
    """Every shared hippocampus case's volume name (`load`), by file name."""
    images = sorted((_require(shared_data() / "hippocampus" / "images")).glob("hippocampus_*.nii.gz"))
    return [p.name.removesuffix(".nii.gz") for p in images]


def colin27() -> Volume:
    """The 181×217×181 T1 brain (7.1 M voxels): cortex, deep grey matter and cerebellum on background."""
    folder = shared_data() / "colin27"
    image = _nifti_zyx(folder / "t1.nii.gz").astype(np.float32)[None]
    truth = _nifti_zyx(folder / "labels.nii.gz").astype(np.int64)
    return Volume("colin27", image, truth, (1.0, 1.0, 1.0), 0)


def load(name: str) -> Volume:
    """A volume by its run-id name: nuclei_tiny, ovule, em_vnc, em_vnc_q0..3, hippocampus_NNN, colin27,
    and any of them but the hippocampus cases with _h0 or _h1, its halves."""
    if name == "nuclei_tiny":
        return nuclei_tiny()
    if name == "ovule":
        return ovule()
    if name == "em_vnc":
        return em_vnc()
    if name == "colin27":
        return colin27()
    if name[-3:] in ("_h0", "_h1"):
        return half(name[:-3], int(name[-1]))
    if name.startswith("em_vnc_q"):
        return em_vnc_quarter(int(name.removeprefix("em_vnc_q")))
    if name.startswith("hippocampus_"):
        return hippocampus(name.removeprefix("hippocampus_"))
    raise UserError(f"{name}: unknown volume (nuclei_tiny, ovule, em_vnc, em_vnc_q0..3, hippocampus_NNN, colin27)")


def instance_truth(name: str) -> np.ndarray:
    """The shared instance ground truth of a volume (object ids, 0 = none); em_vnc's mitochondria are
    the connected components of its class 2."""
    if name.startswith("em_vnc"):
        from scipy import ndimage

        return ndimage.label(load(name).truth == 2)[0]
    if name == "nuclei_tiny":
        import tifffile

        return tifffile.imread(_require(shared_data() / "nuclei_tiny" / "instances.tif"))
    import h5py

    with h5py.File(_require(shared_data() / "ovule" / "ovule.h5"), "r") as file:
        return file["instances"][:]
