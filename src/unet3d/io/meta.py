"""What a writer needs to reproduce the geometry of the volume it came from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class VolumeMeta:
    path: str  # the spec the volume was read from
    format: str  # 'tiff' | 'nifti' | 'hdf5' | 'zarr' | 'npy' | 'npz'
    spacing: tuple[float, float, float] | None  # voxel size (z, y, x), in the file's unit
    affine: np.ndarray | None = None  # NIfTI 4x4, nibabel's (x, y, z) convention
    header: object | None = None  # nibabel header, reused when writing NIfTI
    axes: str | None = None  # axis letters of the stored array when the file declares them, e.g. 'ZCYX'
