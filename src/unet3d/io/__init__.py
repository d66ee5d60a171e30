"""Reading and writing volumes: TIFF, NIfTI, HDF5, Zarr/OME-Zarr, NumPy .npy/.npz.

Conventions
-----------
* Axis order is (Z, Y, X), axis 0 the slowest-varying one. Images are channels-first
  (C, Z, Y, X), C=1 for single-channel files; labels are (Z, Y, X).
* NIfTI stores (x, y, z[, t]); its arrays are reversed on read to (z, y, x) (a 4th axis becomes
  channels) and reversed back on write. Spacing is reported (z, y, x) for every format, while
  `VolumeMeta.affine` stays in nibabel's (x, y, z) convention so it can be written back as is.
* A spec is a path, or `container:key` for files holding several arrays: `file.h5:/raw`,
  `image.zarr:/labels`, `arrays.npz:image`. Without a key the container must hold exactly one
  array (an OME-Zarr image counts as one: its full-resolution level is used).
* Channels: the `channel_axis` argument; else axis metadata ('c' in OME-Zarr axes, 'C' in
  ImageJ/OME-TIFF, ilastik axistags, a NIfTI 4th axis); else, for a 4-D array, the first or last
  axis when it has at most 4 entries and fewer than every other axis. Anything else is an error
  asking for `channel_axis`.
* Spacing: NIfTI zooms, ImageJ 'spacing' + resolution tags, OME-TIFF PhysicalSize, OME-Zarr
  scale, HDF5/Zarr attribute `element_size_um`; None when the file has none.
* Region reads touch only that region on disk for HDF5, Zarr, .npy (memory map) and uncompressed
  TIFF (memory map); compressed TIFF, NIfTI .gz and .npz are decompressed as needed or whole.
* Writers are atomic (temporary name, then rename). Zarr outputs are OME-Zarr images (a group
  with level '0'); HDF5 outputs carry `element_size_um`; TIFF outputs are uncompressed ImageJ
  hyperstacks (plain TIFF for types ImageJ cannot open).
"""

from unet3d.io.meta import VolumeMeta
from unet3d.io.spec import VolumeSpec, parse_spec
from unet3d.io.volume import Volume, channel_layout, open_volume, read_image, read_labels
from unet3d.io.writers import VolumeWriter, volume_writer, write_volume

__all__ = [
    "Volume",
    "VolumeMeta",
    "VolumeSpec",
    "VolumeWriter",
    "channel_layout",
    "open_volume",
    "parse_spec",
    "read_image",
    "read_labels",
    "volume_writer",
    "write_volume",
]
