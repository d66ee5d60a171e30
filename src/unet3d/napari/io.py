"""napari readers, writer and sample data: every format unet3d reads opens in napari through it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unet3d.data.sparse import sparsify
from unet3d.errors import UserError
from unet3d.interactive.large import IN_MEMORY_VOXELS
from unet3d.io import open_volume, read_image, read_labels, write_volume
from unet3d.io.spec import parse_spec

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "nuclei_tiny"
LABEL_WORDS = ("label", "labels", "seg", "segmentation", "mask", "painting")
REGION_FORMATS = ("zarr", "hdf5", "npy")  # formats read region by region from disk: large images open lazily
LAZY_CHUNKS = (16, 256, 256)  # the (Z, Y, X) chunks napari reads of a lazily opened image


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
    volume = open_volume(str(path))
    meta, shape = volume.meta, volume.shape
    if meta.format in REGION_FORMATS and int(np.prod(shape[1:])) > IN_MEMORY_VOXELS:
        image = lazy_image(volume)  # napari reads the planes in view; unet3d's loop runs box by box
    else:
        with volume:
            image = volume.read()
    data = image[0] if shape[0] == 1 else image
    return [(data, {"name": stem, **_scale(meta), **({"channel_axis": 0} if shape[0] > 1 else {})}, "image")]


class _Regions:
    """An opened image as the array Dask reads chunk by chunk: [c, z, y, x] slices → `Volume.read`."""

    def __init__(self, volume):
        self.volume, self.shape, self.dtype, self.ndim = volume, volume.shape, volume.dtype, 4

    def __getitem__(self, index: tuple) -> np.ndarray:
        return self.volume.read(index[1:])[index[0]]


def lazy_image(volume):
    """A (C, Z, Y, X) Dask array over an opened image: nothing is read until napari shows it."""
    import dask.array as da

    chunks = (volume.shape[0], *(min(c, n) for c, n in zip(LAZY_CHUNKS, volume.shape[1:])))
    return da.from_array(_Regions(volume), chunks=chunks, lock=False, fancy=False,
                         meta=np.empty((0, 0, 0, 0), volume.dtype))


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
