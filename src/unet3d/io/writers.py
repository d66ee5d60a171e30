"""Writers that never leave a half-written output.

Files are written under a temporary name and renamed into place. Writing a named dataset
(`file.h5:/pred`, `out.zarr:/pred`, `arrays.npz:pred`) into an existing container copies it first
and renames the copy, so the other datasets survive and a crash leaves the old container intact;
a spec without a key replaces the whole file. HDF5 and Zarr receive regions
straight on disk (memory independent of the volume size); TIFF, NIfTI, .npy and .npz are
assembled in a buffer (memory-mapped beside the output when large) and saved on success.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from unet3d.atomic import atomic_path
from unet3d.errors import UserError
from unet3d.io.meta import VolumeMeta
from unet3d.io.readers import short_reason
from unet3d.io.spec import VolumeSpec, parse_spec

DEFAULT_KEY = {"hdf5": "data", "npz": "arr_0"}  # dataset name when the spec names none
IMAGEJ_DTYPES = (np.uint8, np.uint16, np.float32)  # the types ImageJ opens without conversion
CHUNK = 64  # default chunk edge for HDF5/Zarr: tiles of prediction map onto few chunks
MEMMAP_BYTES = 1 << 30  # buffers larger than this live in a temporary file, not in RAM


def write_volume(spec: str, array: np.ndarray, like: VolumeMeta | None = None) -> None:
    """Write a (Z, Y, X) or (C, Z, Y, X) array; the format follows the extension."""
    array = np.asarray(array)
    array = array.astype(np.uint8) if array.dtype == bool else array  # no format stores 1-bit voxels alike
    parsed = parse_spec(spec)
    if parsed.format in _SAVERS:
        _check_shape(array.shape)
        with atomic_path(parsed.path) as tmp, reported(parsed.text, tmp.parent):
            _SAVERS[parsed.format](tmp, parsed, array, like)
        return
    with volume_writer(spec, array.shape, array.dtype, like) as writer:
        writer.write((slice(None),) * 3, array)


def volume_writer(spec: str, shape: tuple, dtype, like: VolumeMeta | None = None, chunks=None) -> VolumeWriter:
    """Context manager receiving blocks with `write(region, data)`; the output appears on clean exit.

    chunks: (Z, Y, X) chunk shape for HDF5/Zarr (default up to 64 per axis, one channel each).
    """
    parsed = parse_spec(spec)
    shape = _check_shape(tuple(int(n) for n in shape))
    dtype = np.dtype(np.uint8) if np.dtype(dtype) == bool else np.dtype(dtype)
    writer = {"hdf5": _HDF5Writer, "zarr": _ZarrWriter}.get(parsed.format, _BufferedWriter)
    return writer(parsed, shape, dtype, like, _chunks(shape, chunks))


@contextlib.contextmanager
def reported(target: str, folder: Path):
    """A failed write (a full disk, a quota, an I/O error) as one line naming `target`, not the
    temporary file it was going to. Entered inside the temporary file's context, so that a short
    write without an error number (numpy's) is recognised by `folder` having no space left."""
    try:
        yield
    except OSError as exc:
        full = exc.errno is None and os.statvfs(folder).f_bavail == 0
        reason = os.strerror(errno.ENOSPC) if full else exc.strerror or short_reason(exc)
        raise UserError(f"{target}: cannot be written ({reason})") from None


def write_bytes(path, data: bytes) -> None:
    """`data` as the file `path`, atomically; a failure is one line naming `path`."""
    with atomic_path(path) as tmp, reported(str(path), tmp.parent):
        tmp.write_bytes(data)


class VolumeWriter:
    """Blocks go to `self._target` (an array-like); the temporary output is committed on clean exit."""

    def __init__(self, spec: VolumeSpec, shape: tuple, dtype: np.dtype, like: VolumeMeta | None, chunks: tuple):
        self.spec, self.shape, self.dtype = spec, shape, dtype
        self._like, self._chunks = like, chunks
        self._cleanup = contextlib.ExitStack()  # unwinds temporary outputs: commit or discard
        self._target = None

    def write(self, region: tuple[slice, slice, slice], data: np.ndarray) -> None:
        """Store `data`, (Z, Y, X) or (C, Z, Y, X) like the volume, at `region` over (Z, Y, X)."""
        index = ((slice(None),) if len(self.shape) == 4 else ()) + tuple(region)
        expected = tuple(len(range(*s.indices(n))) for s, n in zip(index, self.shape))
        if tuple(np.shape(data)) != expected:
            raise ValueError(f"{self.spec.text}: block of shape {np.shape(data)} does not fit region {region} (needs {expected})")
        with self._reported():
            self._target[index] = data

    def __enter__(self) -> VolumeWriter:
        try:
            with self._reported():
                self._target = self._open()
        except BaseException:
            self._cleanup.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                with self._reported():
                    self._commit()
            except BaseException:
                self._cleanup.__exit__(*sys.exc_info())  # the temporary output goes too
                raise
        with self._reported():
            return self._cleanup.__exit__(exc_type, exc, tb)

    def _reported(self):
        folder = Path(self.spec.path).parent
        while not folder.exists():
            folder = folder.parent
        return reported(self.spec.text, folder)

    def _open(self):
        """Create the temporary output; return the array-like that receives the blocks."""
        raise NotImplementedError

    def _commit(self) -> None:
        """Hook for writers that save their buffer before the temporary output is renamed."""


class _BufferedWriter(VolumeWriter):
    def _open(self) -> np.ndarray:
        target = Path(self.spec.path)
        if int(np.prod(self.shape)) * self.dtype.itemsize <= MEMMAP_BYTES:
            return np.zeros(self.shape, self.dtype)
        target.parent.mkdir(parents=True, exist_ok=True)
        file = self._cleanup.enter_context(tempfile.NamedTemporaryFile(prefix=f".{target.name}.", suffix=".buffer", dir=target.parent))
        return np.memmap(file, dtype=self.dtype, mode="w+", shape=self.shape)

    def _commit(self) -> None:
        with atomic_path(self.spec.path) as tmp, reported(self.spec.text, tmp.parent):
            _SAVERS[self.spec.format](tmp, self.spec, self._target, self._like)


class _HDF5Writer(VolumeWriter):
    def _open(self):
        import h5py

        tmp = self._cleanup.enter_context(atomic_path(self.spec.path))
        keep_existing = self.spec.key is not None and os.path.isfile(self.spec.path)
        if keep_existing:
            shutil.copyfile(self.spec.path, tmp)  # keep the other datasets of the file
        try:
            file = self._cleanup.enter_context(h5py.File(tmp, "a" if keep_existing else "w"))
        except OSError as exc:
            raise UserError(f"{self.spec.text}: cannot add a dataset to this HDF5 file ({short_reason(exc)})") from None
        key = self.spec.key or DEFAULT_KEY["hdf5"]
        if key in file:
            del file[key]
        dataset = file.create_dataset(key, shape=self.shape, dtype=self.dtype, chunks=self._chunks, compression="gzip", fillvalue=0)
        if self._like is not None and self._like.spacing is not None:
            dataset.attrs["element_size_um"] = np.asarray(self._like.spacing, dtype=np.float64)
        return dataset


class _ZarrWriter(VolumeWriter):
    """Writes an OME-Zarr image (group with one full-resolution level '0') at the spec's key."""

    def _open(self):
        import zarr

        tmp = self._cleanup.enter_context(atomic_directory(self.spec.path, keep_existing=self.spec.key is not None))
        try:
            root = zarr.open_group(tmp, mode="a")
        except Exception as exc:  # an existing store that is not a readable Zarr group
            raise UserError(f"{self.spec.text}: cannot add a dataset to this Zarr store ({short_reason(exc)})") from None
        group = root.create_group(self.spec.key, overwrite=True) if self.spec.key else root
        axes = "czyx"[4 - len(self.shape):]
        group.attrs["ome"] = _ome_metadata(axes, self._like.spacing if self._like else None)
        return group.create_array("0", shape=self.shape, dtype=self.dtype, chunks=self._chunks, fill_value=0, dimension_names=list(axes))


def _ome_metadata(axes: str, spacing: tuple | None) -> dict:
    kinds = {"c": "channel", "z": "space", "y": "space", "x": "space"}
    scale = [1.0] * (len(axes) - 3) + [float(s) for s in (spacing or (1.0, 1.0, 1.0))]
    return {
        "version": "0.5",
        "multiscales": [{
            "axes": [{"name": a, "type": kinds[a]} for a in axes],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
        }],
    }


@contextlib.contextmanager
def atomic_directory(path: str, keep_existing: bool):
    """Like atomic_path for a directory: build beside `path`, then swap it in on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        if keep_existing and target.is_dir():
            shutil.copytree(target, tmp, dirs_exist_ok=True)
        yield tmp
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(new: Path, target: Path) -> None:
    """Rename `new` onto `target`; an old directory is moved aside first and removed afterwards."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.replace(target, old / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / target.name, target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _check_shape(shape: tuple) -> tuple:
    if len(shape) not in (3, 4):
        raise ValueError(f"volumes are (Z, Y, X) or (C, Z, Y, X), got shape {shape}")
    return shape


def _chunks(shape: tuple, chunks) -> tuple:
    spatial = tuple(chunks)[-3:] if chunks is not None else tuple(min(n, CHUNK) for n in shape[-3:])
    spatial = tuple(max(1, min(c, n)) for c, n in zip(spatial, shape[-3:]))
    return (1, *spatial) if len(shape) == 4 else spatial


def _save_tiff(path: Path, spec: VolumeSpec, array: np.ndarray, like: VolumeMeta | None) -> None:
    """Uncompressed (memory-mappable) TIFF; ImageJ hyperstack with calibration where ImageJ can open the type."""
    import tifffile

    spacing = like.spacing if like is not None else None
    resolution = (1.0 / spacing[2], 1.0 / spacing[1]) if spacing else None
    if array.dtype in IMAGEJ_DTYPES:
        data = array.transpose(1, 0, 2, 3) if array.ndim == 4 else array  # ImageJ order is ZCYX
        metadata = {"axes": "ZCYX" if array.ndim == 4 else "ZYX"}
        if spacing:
            metadata["spacing"] = float(spacing[0])
        tifffile.imwrite(path, data, imagej=True, metadata=metadata, resolution=resolution)
    else:
        tifffile.imwrite(path, array, metadata={"axes": "CZYX" if array.ndim == 4 else "ZYX"}, resolution=resolution)


def _save_nifti(path: Path, spec: VolumeSpec, array: np.ndarray, like: VolumeMeta | None) -> None:
    """NIfTI stores (x, y, z[, c]): reverse the axes; keep the source's affine and header."""
    import nibabel

    if like is not None and like.affine is not None:
        affine, header = like.affine, like.header
    else:
        spacing = like.spacing if like is not None and like.spacing else (1.0, 1.0, 1.0)
        affine, header = np.diag([*reversed(spacing), 1.0]), None
    image = nibabel.Nifti1Image(np.asarray(array).transpose(), affine, header=header, dtype=array.dtype)
    with open(path, "wb") as raw:
        packed = gzip.GzipFile(fileobj=raw, mode="wb") if spec.path.lower().endswith(".gz") else contextlib.nullcontext(raw)
        with packed as stream:
            image.to_file_map({"image": nibabel.FileHolder(fileobj=stream)})


def _save_npy(path: Path, spec: VolumeSpec, array: np.ndarray, like: VolumeMeta | None) -> None:
    with open(path, "wb") as file:
        np.save(file, array, allow_pickle=False)


def _save_npz(path: Path, spec: VolumeSpec, array: np.ndarray, like: VolumeMeta | None) -> None:
    """With a key, the other arrays of an existing file are kept; without one, the file holds only this."""
    arrays = {}
    if spec.key is not None and os.path.isfile(spec.path):
        with np.load(spec.path, allow_pickle=False) as existing:
            arrays = {name: existing[name] for name in existing.files}
    arrays[spec.key or DEFAULT_KEY["npz"]] = np.asarray(array)
    with open(path, "wb") as file:
        np.savez_compressed(file, **arrays)


_SAVERS = {"tiff": _save_tiff, "nifti": _save_nifti, "npy": _save_npy, "npz": _save_npz}
