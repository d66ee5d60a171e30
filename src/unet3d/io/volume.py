"""Lazy volumes: which stored axis is what, region reads, and the checks every read passes."""

from __future__ import annotations

import numpy as np

from unet3d.errors import UserError
from unet3d.io.meta import VolumeMeta
from unet3d.io.readers import FORMAT_NAMES, Source, open_source, short_reason
from unet3d.io.spec import parse_spec

KINDS = ("image", "labels")
MAX_DETECTED_CHANNELS = 4
Region = tuple[slice, slice, slice]


class Volume:
    """A volume on disk, read region by region: (C, Z, Y, X) images, (Z, Y, X) labels.

    `read(region)` slices the stored array, so HDF5, Zarr, .npy and uncompressed TIFF read only
    that region from disk. Every read is checked: images must be finite, labels integral.
    """

    def __init__(self, source: Source, kind: str, channel: int | None, dropped: tuple[int, ...]):
        self._source, self.kind, self._channel, self._dropped = source, kind, channel, dropped
        stored = tuple(source.array.shape)
        self._spatial = [i for i in range(len(stored)) if i != channel and i not in dropped]
        spatial_shape = tuple(stored[i] for i in self._spatial)
        channels = stored[channel] if channel is not None else 1
        self.shape = (channels, *spatial_shape) if kind == "image" else spatial_shape
        self.dtype = _result_dtype(np.dtype(source.array.dtype), kind)
        self.meta: VolumeMeta = source.meta

    def read(self, region: Region | None = None) -> np.ndarray:
        """The voxels of `region` (slices over Z, Y, X; all channels), or the whole volume."""
        region = tuple(region) if region is not None else (slice(None),) * 3
        if len(region) != 3 or not all(isinstance(s, slice) for s in region):
            raise ValueError(f"region must be three slices (Z, Y, X), got {region!r}")
        index = [slice(None)] * len(self._source.array.shape)
        for axis in self._dropped:
            index[axis] = 0
        for axis, part in zip(self._spatial, region):
            index[axis] = part
        try:
            data = self._source.array[tuple(index)]
        except Exception as exc:  # truncated chunks or pages surface only when read
            raise UserError(f"{self.meta.path}: cannot read {FORMAT_NAMES[self.meta.format]} file ({short_reason(exc)})") from None
        data = _owned(data)
        if self._channel is not None:
            data = np.moveaxis(data, self._channel - sum(d < self._channel for d in self._dropped), 0)
        elif self.kind == "image":
            data = data[np.newaxis]
        return _checked(self.meta.path, data, self.kind).astype(self.dtype, copy=False)

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_volume(spec: str, kind: str = "image", channel_axis: int | None = None) -> Volume:
    """Open `spec` for region reads without reading voxels.

    channel_axis: the stored axis holding channels (NIfTI: counted after the reversal to z-first).
    Without it, file metadata decides (OME axes 'c', ImageJ/OME-TIFF 'C'), else the detection
    rule of `channel_layout`. Labels have no channel axis.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "labels" and channel_axis is not None:
        raise ValueError("labels have no channel axis")
    parsed = parse_spec(spec)
    source = open_source(parsed)
    try:
        channel, dropped = channel_layout(parsed.text, tuple(source.array.shape), source.meta.axes, kind, channel_axis)
        _check_dtype(parsed.text, np.dtype(source.array.dtype))
    except BaseException:
        source.close()
        raise
    return Volume(source, kind, channel, dropped)


def read_image(spec: str, channel_axis: int | None = None) -> tuple[np.ndarray, VolumeMeta]:
    """(C, Z, Y, X) in the file's dtype, checked finite; a 3-D file gives C=1."""
    with open_volume(spec, "image", channel_axis) as volume:
        return volume.read(), volume.meta


def read_labels(spec: str) -> tuple[np.ndarray, VolumeMeta]:
    """(Z, Y, X) integers: the file's integer dtype, or int64 for floats holding integers."""
    with open_volume(spec, "labels") as volume:
        return volume.read(), volume.meta


def channel_layout(spec: str, shape: tuple, axes: str | None, kind: str, channel_axis: int | None):
    """(stored channel axis or None, stored singleton axes to drop) leaving exactly (Z, Y, X).

    Channels come from, in order: the explicit `channel_axis`; axis letters the file declares
    ('C' or 'S'); for a 4-D array without axis metadata, the first or the last axis when it has
    at most 4 entries and fewer than every other axis (only one of the two may qualify).
    Singleton axes beyond the three spatial ones (a time point, a batch axis) are dropped.
    """
    ndim = len(shape)
    channel = None
    if kind == "image" and channel_axis is not None:
        if not -ndim <= channel_axis < ndim:
            raise UserError(f"{spec}: channel_axis {channel_axis} is out of range for shape {shape}")
        channel = channel_axis % ndim
    elif kind == "image" and axes:
        channel = next((i for i, a in enumerate(axes) if a in "CS" and shape[i] > 1), None)
    elif kind == "image":
        channel = _detected_channel_axis(shape)
    rest = [i for i in range(ndim) if i != channel]
    dropped = _surplus_singletons(rest, shape, axes)
    if len(rest) - len(dropped) != 3:
        expected = "(Z, Y, X)" if kind == "labels" else "(Z, Y, X), or 4-D with a channel axis"
        hint = "; name the channel axis (channel_axis)" if kind == "image" and ndim == 4 and channel is None else ""
        raise UserError(f"{spec}: expected a 3-D volume {expected}, got shape {shape}{hint}")
    return channel, tuple(dropped)


def _detected_channel_axis(shape: tuple) -> int | None:
    if len(shape) != 4:
        return None
    first = shape[0] <= MAX_DETECTED_CHANNELS and shape[0] < min(shape[1:])
    last = shape[-1] <= MAX_DETECTED_CHANNELS and shape[-1] < min(shape[:-1])
    if first == last:
        return None
    return 0 if first else 3


def _surplus_singletons(rest: list[int], shape: tuple, axes: str | None) -> list[int]:
    """Size-1 axes that cannot be spatial (declared non-ZYX), then outer ones while more than 3 remain."""
    dropped = [i for i in rest if axes and shape[i] == 1 and axes[i] not in "ZYX"]
    kept = [i for i in rest if i not in dropped]
    while len(kept) > 3 and (shape[kept[0]] == 1 or shape[kept[-1]] == 1):
        dropped.append(kept.pop(0) if shape[kept[0]] == 1 else kept.pop())
    return sorted(dropped)


def _check_dtype(spec: str, dtype: np.dtype) -> None:
    if dtype.kind not in "biuf":
        raise UserError(f"{spec}: unsupported data type {dtype} (expected integers, floats or booleans)")


def _result_dtype(stored: np.dtype, kind: str) -> np.dtype:
    if stored.kind == "b":
        return np.dtype(np.uint8)
    if kind == "labels" and stored.kind == "f":
        return np.dtype(np.int64)
    return stored.newbyteorder("=")


def _owned(data) -> np.ndarray:
    """A private in-memory copy: callers may modify it without touching caches or memory maps."""
    if isinstance(data, np.ndarray) and data.flags.owndata and not isinstance(data, np.memmap):
        return data
    return np.array(data)


def _checked(spec: str, data: np.ndarray, kind: str) -> np.ndarray:
    """Reject NaN/Inf images (they poison normalization and training) and non-integral labels."""
    if data.dtype.kind != "f":
        return data
    if kind == "image" and not np.isfinite(data).all():
        raise UserError(f"{spec}: image contains NaN or infinite values")
    if kind == "labels":
        bad = ~np.isfinite(data) | (data != np.floor(data))
        if bad.any():
            raise UserError(f"{spec}: label values must be integers (found {data[bad].flat[0]:g})")
    return data
