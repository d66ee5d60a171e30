"""The loop on volumes larger than memory: what a round reads, and where its layers live.

A napari user can open an OME-Zarr of 10⁹ voxels lazily; the loop must then never hold the image
(4 bytes a voxel as float32, twice with its normalized copy), never predict the whole volume
after a round, and never make a whole-volume layer in memory. Such a session reads the image
through `LayerSource` box by box, fits its normalization once on spread z-planes, trains each
round on blocks around the painted voxels (densify's blockwise machinery, `workflows.blocks`,
the forest's sample taken from the same blocks), previews a bounded box around the view, and
writes the whole-volume segmentation tile by tile into a Zarr array behind a Labels layer.
"""

from __future__ import annotations

import numpy as np

from unet3d.data.normalization import for_volume
from unet3d.errors import UserError

# Volumes above this many voxels run the loop box by box, as do lazily opened ones (Dask, Zarr):
# at 64 M voxels the image and its normalized copy take 512 MB and a whole-volume preview after
# every round minutes on a CPU, more than the round itself.
IN_MEMORY_VOXELS = 64_000_000
# The preview box around the view, in memory too: the slab's depth and at most this many voxels
# along Y and X (the network, and the forest's bank where not made already, every few seconds
# between training steps).
PREVIEW_PLANE = 192
LAYER_CHUNKS = (16, 256, 256)  # the chunks of the Zarr arrays behind the preview and segmentation layers


class LayerSource:
    """A napari layer's image (numpy, Dask or Zarr; (Z, Y, X) or (C, Z, Y, X)) read box by box as
    a (C, Z, Y, X) float32 volume, without reading anything until asked."""

    def __init__(self, data):
        if data.ndim not in (3, 4):
            raise UserError(f"the image layer has {data.ndim} dimensions: a 3D volume (Z, Y, X) or (C, Z, Y, X) "
                            "is needed")
        self.data, self.meta = data, None
        self.shape = tuple(data.shape) if data.ndim == 4 else (1, *data.shape)

    def read(self, box=None) -> np.ndarray:
        box = tuple(box) if box is not None else (slice(None),) * 3
        part = self.data[(slice(None),) + box] if self.data.ndim == 4 else self.data[box][None]
        return np.asarray(part, dtype=np.float32)


def is_large(data) -> bool:
    """Whether a layer's image runs the loop box by box: lazily opened, or above IN_MEMORY_VOXELS."""
    return not isinstance(data, np.ndarray) or int(np.prod(data.shape[-3:])) > IN_MEMORY_VOXELS


def plane_normalization(source: LayerSource) -> dict:
    """The z-score of the image fitted on z-planes spread over it (a bounded read at any depth)."""
    return for_volume({"method": "zscore", "channels": source.shape[0], "per_volume": True}, source.read,
                      source.shape[1:])


def view_box(shape, center, depth: int) -> tuple[slice, ...]:
    """The preview box: `depth` z-slices and at most PREVIEW_PLANE voxels along Y and X around
    `center` (z, y, x; None for y and x: the middle), inside `shape`."""
    sizes = (depth, PREVIEW_PLANE, PREVIEW_PLANE)
    box = []
    for at, size, n in zip(center, sizes, shape):
        size = min(size, n)
        at = n // 2 if at is None else int(at)
        start = max(0, min(at - size // 2, n - size))
        box.append(slice(start, start + size))
    return tuple(box)


def largest_label(labels) -> int:
    """The largest value of a Labels array (numpy or Zarr), read slab by slab (LAYER_CHUNKS deep):
    the number of objects numbered 1..N, without holding a large volume's labels."""
    depth = LAYER_CHUNKS[0]
    return max((int(np.max(labels[z:z + depth])) for z in range(0, labels.shape[0], depth)), default=0)


def zarr_labels(path, shape, dtype):
    """A Zarr array of zeros at `path` for a Labels layer of a large volume (filled chunk by chunk)."""
    import zarr

    chunks = tuple(min(c, n) for c, n in zip(LAYER_CHUNKS, shape))
    return zarr.open_array(str(path), mode="w", shape=tuple(shape), chunks=chunks, dtype=dtype, fill_value=0)
