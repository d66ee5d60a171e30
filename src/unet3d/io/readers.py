"""One opener per format: each returns the stored array as a lazily sliceable array-like.

An opener does not read voxels. It returns a `Source`: an object that supports `.shape`,
`.dtype` and slicing with a tuple of slices/ints (h5py and zarr arrays, memory maps, or a
deferred full read where the format cannot be sliced on disk), plus whatever the file says about
axes and voxel spacing. Axis order is already the package's: NIfTI is reversed to z-first here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from unet3d.errors import UserError
from unet3d.io.meta import VolumeMeta
from unet3d.io.spec import VolumeSpec

FORMAT_NAMES = {"tiff": "TIFF", "nifti": "NIfTI", "hdf5": "HDF5", "zarr": "Zarr", "npy": "NumPy .npy", "npz": "NumPy .npz"}


@dataclass
class Source:
    array: object  # array-like: shape, dtype, __getitem__(tuple of slices/ints)
    meta: VolumeMeta
    close: Callable[[], None] = field(default=lambda: None)


def short_reason(exc: BaseException) -> str:
    """First line of a library's exception, enough to tell truncated from wrong-format files."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def open_source(spec: VolumeSpec) -> Source:
    if not os.path.exists(spec.path):
        raise UserError(f"{spec.text}: file not found")
    opener = _OPENERS[spec.format]
    try:
        return opener(spec)
    except UserError:
        raise
    except Exception as exc:  # each library raises its own types for corrupt or truncated files
        raise UserError(f"{spec.text}: cannot read {FORMAT_NAMES[spec.format]} file ({short_reason(exc)})") from None


class _Deferred:
    """A whole-file read done on first access, for formats that cannot be sliced on disk."""

    def __init__(self, load: Callable[[], np.ndarray], shape: tuple, dtype: np.dtype):
        self._load, self.shape, self.dtype, self._data = load, tuple(shape), np.dtype(dtype), None

    def __getitem__(self, index):
        if self._data is None:
            self._data = self._load()
        return self._data[index]


class _Reversed:
    """View of an array-like with its axes reversed; slicing reads only the requested region."""

    def __init__(self, array, dtype: np.dtype):
        self._array, self.dtype, self.shape = array, dtype, tuple(array.shape)[::-1]

    def __getitem__(self, index: tuple):
        index = tuple(index) + (slice(None),) * (len(self.shape) - len(index))
        return np.asarray(self._array[index[::-1]]).transpose()


def _open_tiff(spec: VolumeSpec) -> Source:
    import tifffile

    with _quiet("tifffile"):  # its log lines would precede our one-line error
        tif = tifffile.TiffFile(spec.path)
        try:
            series = tif.series[0]
            _check_complete(spec, tif, series)
        except BaseException:
            tif.close()
            raise
    declared = tif.is_imagej or tif.is_ome or tif.is_shaped
    axes = series.axes if declared and "Q" not in series.axes else None
    meta = VolumeMeta(spec.text, "tiff", _tiff_spacing(tif), axes=axes)
    try:
        with _quiet("tifffile"):
            array = tifffile.memmap(spec.path, mode="r")  # uncompressed and contiguous only
        tif.close()
        return Source(array, meta)
    except ValueError:
        return Source(_Deferred(lambda: _quietly_read(series), series.shape, series.dtype), meta, tif.close)


def _quietly_read(series) -> np.ndarray:
    with _quiet("tifffile"):
        return series.asarray()


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_complete(spec: VolumeSpec, tif, series) -> None:
    """tifffile recovers what it can from a truncated file; say so instead of returning part of it."""
    size = os.path.getsize(spec.path)
    for page in series.pages:
        if page is not None and any(o + n > size for o, n in zip(page.dataoffsets, page.databytecounts)):
            raise UserError(f"{spec.text}: truncated TIFF file (image data beyond the end of the file)")
    if tif.is_imagej and tif.imagej_metadata.get("images", 1) > len(series.pages):
        found = len(series.pages)
        raise UserError(f"{spec.text}: truncated TIFF file (ImageJ declares {tif.imagej_metadata['images']} images, found {found})")
    if tif.is_shaped and np.prod(tif.shaped_metadata[0].get("shape", ())) > np.prod(series.shape):
        raise UserError(f"{spec.text}: truncated TIFF file (declares shape {tuple(tif.shaped_metadata[0]['shape'])}, found {series.shape})")


def _tiff_spacing(tif) -> tuple[float, float, float] | None:
    """ImageJ: z from the 'spacing' entry, y/x from the resolution tags; OME: PhysicalSize*."""
    if tif.is_imagej and "spacing" in (tif.imagej_metadata or {}):
        tags = tif.pages[0].tags
        y, x = (_pixel_size(tags.get(name)) for name in ("YResolution", "XResolution"))
        return float(tif.imagej_metadata["spacing"]), y, x
    if tif.is_ome:
        import tifffile

        image = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
        pixels = (image[0] if isinstance(image, list) else image)["Pixels"]
        sizes = [pixels.get(f"PhysicalSize{axis}") for axis in "ZYX"]
        return tuple(float(s) for s in sizes) if None not in sizes else None
    return None


def _pixel_size(tag) -> float:
    if tag is None:
        return 1.0
    numerator, denominator = tag.value
    return float(denominator) / float(numerator) if numerator else 1.0


def _open_nifti(spec: VolumeSpec) -> Source:
    import nibabel

    image = nibabel.load(spec.path)
    proxy = image.dataobj
    # scaling (scl_slope/scl_inter) can change the stored type: ask a one-voxel read
    dtype = np.asarray(proxy[(slice(0, 1),) * len(proxy.shape)]).dtype
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3][::-1])
    axes = "CZYX" if len(proxy.shape) == 4 else None  # NIfTI's 4th axis (time/vector) becomes channels
    meta = VolumeMeta(spec.text, "nifti", spacing, affine=image.affine.copy(), header=image.header.copy(), axes=axes)
    return Source(_Reversed(proxy, dtype), meta)


def _open_hdf5(spec: VolumeSpec) -> Source:
    import h5py

    file = h5py.File(spec.path, "r")
    try:
        names = []
        file.visititems(lambda name, node: names.append(name) if isinstance(node, h5py.Dataset) else None)
        dataset = file[_choose(spec, names, "dataset")]
        meta = VolumeMeta(spec.text, "hdf5", _attribute_spacing(dataset.attrs), axes=_ilastik_axes(dataset.attrs))
    except BaseException:
        file.close()
        raise
    return Source(dataset, meta, file.close)


def _choose(spec: VolumeSpec, names: list[str], what: str) -> str:
    """The key the spec names, or the only array in the file; else say which ones exist."""
    listing = ", ".join(_display(spec, n) for n in names) or "none"
    if spec.key is not None:
        if spec.key not in names:
            raise UserError(f"{spec.text}: no {what} {_display(spec, spec.key)!r} ({what}s: {listing})")
        return spec.key
    if len(names) != 1:
        where = "holds no" if not names else f"holds {len(names)}"
        raise UserError(f"{spec.text}: {where} {what}s, name one as {spec.path}:{_display(spec, 'NAME')} ({what}s: {listing})")
    return names[0]


def _display(spec: VolumeSpec, name: str) -> str:
    return name if spec.format == "npz" else "/" + name


def _attribute_spacing(attrs) -> tuple[float, float, float] | None:
    """`element_size_um` (z, y, x), as written by ilastik and read by pytorch-3dunet."""
    value = attrs.get("element_size_um")
    if value is None or len(np.atleast_1d(value)) < 3:
        return None
    return tuple(float(v) for v in np.atleast_1d(value)[-3:])


def _ilastik_axes(attrs) -> str | None:
    try:
        return "".join(axis["key"] for axis in json.loads(attrs["axistags"])["axes"]).upper()
    except (KeyError, TypeError, ValueError):
        return None


def _open_zarr(spec: VolumeSpec) -> Source:
    import zarr

    root = zarr.open(spec.path, mode="r")
    if isinstance(root, zarr.Array):
        return _plain_zarr_array(spec, root)
    members = dict(root.members(max_depth=None))
    if spec.key is None and _multiscales(root.attrs):
        return _ome_level(spec, root, None)
    if isinstance(members.get(spec.key), zarr.Group):
        return _ome_level(spec, members[spec.key], None)
    key = _choose(spec, sorted(n for n, m in members.items() if isinstance(m, zarr.Array)), "dataset")
    parent, _, name = key.rpartition("/")
    group = members.get(parent, root) if parent else root
    if any(d["path"] == name for d in (_multiscales(group.attrs) or [{}])[0].get("datasets", [])):
        return _ome_level(spec, group, name)  # one level of an OME-Zarr image, with the image's axes
    return _plain_zarr_array(spec, members[key])


def _plain_zarr_array(spec: VolumeSpec, array) -> Source:
    names = getattr(array.metadata, "dimension_names", None)
    axes = "".join(names).upper() if names and all(isinstance(n, str) and len(n) == 1 for n in names) else None
    return Source(array, VolumeMeta(spec.text, "zarr", _attribute_spacing(array.attrs), axes=axes))


def _multiscales(attrs) -> list | None:
    """OME-Zarr multiscales metadata: under 'ome' since 0.5 (Zarr v3), top level before."""
    attrs = dict(attrs)
    return attrs.get("ome", attrs).get("multiscales")


def _ome_level(spec: VolumeSpec, group, path: str | None) -> Source:
    """A level of an OME-Zarr image (default: the first, full-resolution one) with axes and scale."""
    multiscales = _multiscales(group.attrs)
    if not multiscales:
        raise UserError(f"{spec.text}: Zarr group is not an OME-Zarr image; name an array inside it")
    first = multiscales[0]
    level = next(d for d in first["datasets"] if path is None or d["path"] == path)
    axes = "".join((a["name"] if isinstance(a, dict) else a)[0] for a in first.get("axes", [])).upper() or None
    scale = next((t["scale"] for t in level.get("coordinateTransformations", []) if t.get("type") == "scale"), None)
    spacing = None
    if axes and scale and all(a in axes for a in "ZYX"):
        spacing = tuple(float(scale[axes.index(a)]) for a in "ZYX")
    return Source(group[level["path"]], VolumeMeta(spec.text, "zarr", spacing, axes=axes))


def _open_npy(spec: VolumeSpec) -> Source:
    array = np.load(spec.path, mmap_mode="r", allow_pickle=False)
    return Source(array, VolumeMeta(spec.text, "npy", None))


def _open_npz(spec: VolumeSpec) -> Source:
    with np.load(spec.path, allow_pickle=False) as archive:
        array = archive[_choose(spec, list(archive.files), "array")]
    return Source(array, VolumeMeta(spec.text, "npz", None))


_OPENERS = {
    "tiff": _open_tiff,
    "nifti": _open_nifti,
    "hdf5": _open_hdf5,
    "zarr": _open_zarr,
    "npy": _open_npy,
    "npz": _open_npz,
}
