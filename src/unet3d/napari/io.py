"""napari readers, writer and sample data: every format unet3d reads opens in napari through it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unet3d.data.sparse import sparsify
from unet3d.errors import UserError
from unet3d.io import read_image, read_labels, write_volume
from unet3d.io.spec import parse_spec

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "nuclei_tiny"
LABEL_WORDS = ("label", "labels", "seg", "segmentation", "mask", "painting")


def get_reader(path):
    """A reader for `path` when unet3d can read it (NIfTI, HDF5, Zarr/OME-Zarr, TIFF, NumPy), else None."""
    if isinstance(path, list):
        return None
    try:
        parse_spec(str(path))
    except UserError:
        return None
    return read_layer


def read_layer(path) -> list[tuple]:
    """One layer: labels when the file name says so (…labels…, …seg…, …mask…), else an image,
    scaled by the voxel spacing the file records."""
    name = Path(str(path).rstrip("/")).name
    stem = name.split(".")[0].lower()
    if any(word in stem.replace("-", "_").split("_") for word in LABEL_WORDS):
        labels, meta = read_labels(str(path))
        return [(labels, {"name": stem, **_scale(meta)}, "labels")]
    image, meta = read_image(str(path))
    data = image[0] if image.shape[0] == 1 else image
    return [(data, {"name": stem, **_scale(meta), **({"channel_axis": 0} if image.shape[0] > 1 else {})}, "image")]


def _scale(meta) -> dict:
    spacing = getattr(meta, "spacing", None)
    return {"scale": tuple(float(s) for s in spacing)} if spacing else {}


def write_labels(path: str, data: np.ndarray, attributes: dict) -> list[str]:
    """A Labels layer to any format unet3d writes (the format follows the extension)."""
    write_volume(str(path), np.asarray(data))
    return [str(path)]


def nuclei_sample() -> list[tuple]:
    """The bundled confocal nuclei crop, and a painting of 3, 3 and 2 slices of its ground truth in
    napari's convention (0 unpainted; 1 background, 2 nucleus, 3 boundary), ready to Train."""
    image, _ = read_image(str(EXAMPLE / "image.tif"))
    truth, _ = read_labels(str(EXAMPLE / "labels.tif"))
    sparse = sparsify(truth.astype(np.int64), (3, 3, 2), -1)
    painting = np.where(sparse >= 0, sparse + 1, 0).astype(np.uint8)
    return [(image[0], {"name": "nuclei"}, "image"), (painting, {"name": "painting"}, "labels")]
