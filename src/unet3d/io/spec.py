"""Volume specs: a path, optionally followed by `:key` naming a dataset inside a container file.

`ovule.h5:/raw`, `image.zarr:/0`, `arrays.npz:image`: the key selects one array of a file that can
hold several. The split happens after the first container extension that is followed by `:` or
the end of the string, so colons elsewhere in a path survive.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from unet3d.errors import UserError

# extension (lower case) → format name; longest first so '.nii.gz' wins over '.gz'
EXTENSIONS = {
    ".nii.gz": "nifti",
    ".tiff": "tiff",
    ".hdf5": "hdf5",
    ".zarr": "zarr",
    ".tif": "tiff",
    ".nii": "nifti",
    ".npy": "npy",
    ".npz": "npz",
    ".h5": "hdf5",
}
CONTAINERS = ("hdf5", "zarr", "npz")  # formats whose files can hold several arrays
SUPPORTED = ".tif .tiff .nii .nii.gz .h5 .hdf5 .zarr .npy .npz"

_CONTAINER_SPEC = re.compile(r"^(.*?\.(?:h5|hdf5|zarr|npz))/?(?::(.*))?$", re.IGNORECASE)


@dataclass(frozen=True)
class VolumeSpec:
    text: str  # the spec as the user wrote it, for messages
    path: str
    format: str
    key: str | None = None  # dataset inside a container, without leading '/'


def parse_spec(text: str) -> VolumeSpec:
    """Split `text` into path, format and optional key; unknown extensions are a UserError."""
    text = str(text)
    match = _CONTAINER_SPEC.match(text)
    path, key = (match.group(1), match.group(2)) if match else (text, None)
    key = (key or "").strip("/") or None
    path = os.path.expanduser(path)
    return VolumeSpec(text=text, path=path, format=_format_of(text, path), key=key)


def _format_of(text: str, path: str) -> str:
    lower = path.lower()
    for extension, name in EXTENSIONS.items():
        if lower.endswith(extension):
            return name
    suffix = os.path.splitext(path)[1] or "(none)"
    raise UserError(f"{text}: unknown file extension '{suffix}' (supported: {SUPPORTED})")
