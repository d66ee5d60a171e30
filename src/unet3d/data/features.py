"""ilastik's default pixel features: a fixed filter bank evaluated at several Gaussian scales.

The bank is what a biologist's random forest sees in ilastik's pixel classification: Gaussian
smoothing, Laplacian of Gaussian, Gaussian gradient magnitude, difference of Gaussians, and the
eigenvalues of the structure tensor and of the Hessian of Gaussian. ilastik offers only smoothing
at its smallest scale (0.3), because derivative kernels that narrow are dominated by the voxel
grid; this module does the same.

Filters follow vigra's conventions (kernel window (3 + order/2)·σ, derivative kernels exact on
polynomials, DoG = G(σ) − G(0.66σ), structure tensor with inner scale σ and outer scale σ/2,
eigenvalues in descending order). Everything is float32; the scales are made on all cores at once
(`in_threads`), so memory stays at the output plus a few volumes per core.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage


ILASTIK_SCALES = (0.3, 0.7, 1.0, 1.6, 3.5, 5.0, 10.0)
DEFAULT_SCALES = ILASTIK_SCALES  # the forest, not the filter bank, dominates the run time
SMOOTHING_ONLY_BELOW = 0.7  # scales under this get Gaussian smoothing only, as in ilastik
FEATURES_PER_SCALE = (
    "gaussian_smoothing",
    "laplacian_of_gaussian",
    "gaussian_gradient_magnitude",
    "difference_of_gaussians",
    "structure_tensor_eigenvalue_0",
    "structure_tensor_eigenvalue_1",
    "structure_tensor_eigenvalue_2",
    "hessian_of_gaussian_eigenvalue_0",
    "hessian_of_gaussian_eigenvalue_1",
    "hessian_of_gaussian_eigenvalue_2",
)
_WINDOW = 3.0  # vigra's kernel window, in standard deviations (smoothing)
_DOG_RATIO = 0.66  # ilastik: G(σ) − G(0.66 σ)
_OUTER_RATIO = 0.5  # ilastik: structure tensor of inner scale σ, outer scale σ/2
_EIGEN_CHUNK = 1 << 18  # voxels per eigenvalue call: bounds the float64 temporaries
_PAIRS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))  # the 6 entries of a symmetric 3×3
BANK_GRID = (32, 256, 256)  # bank_at's boxes: voxels in one cell of this grid share one box (and its halo)
BANK_THREADS = os.cpu_count() or 1  # scales made at once (each holds its own few volumes of temporaries)


def features_at(scale: float) -> tuple[str, ...]:
    """Feature kinds computed at one scale."""
    return FEATURES_PER_SCALE[:1] if scale < SMOOTHING_ONLY_BELOW else FEATURES_PER_SCALE


def feature_names(channels: int, scales: Sequence[float] = DEFAULT_SCALES) -> list[str]:
    """Names of the rows of `filter_features`, in order (channel-major, then scale, then kind)."""
    return [
        f"{kind}(sigma={scale:g}, channel={channel})"
        for channel in range(channels)
        for scale in scales
        for kind in features_at(scale)
    ]


def filter_features(
    image: np.ndarray, scales: Sequence[float] = DEFAULT_SCALES, spacing: Sequence[float] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Filter bank of a (C, Z, Y, X) image → (F, Z, Y, X) float32 (in `out` if given), rows named by `feature_names`.

    `spacing` is the voxel size per axis (Z, Y, X) in any unit. A scale σ is in voxels of the finest
    axis; coarser axes get σ divided by their spacing ratio and derivatives are taken per finest
    voxel, so filters are round and eigenvalues rotation-invariant in physical space. Where σ falls
    far under one voxel the derivative kernels become central finite differences.
    """
    if image.ndim != 4:
        raise ValueError(f"image must be (C, Z, Y, X), got shape {image.shape}")
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be positive, got {tuple(scales)}")
    ratios = _spacing_ratios(spacing)
    shape = (len(feature_names(image.shape[0], scales)),) + image.shape[1:]
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {shape}, got {out.dtype} {out.shape}")
    jobs, row = [], 0
    for channel in image:
        volume = np.asarray(channel, dtype=np.float32)
        for scale in scales:
            count = len(features_at(scale))
            jobs.append((_Filter(volume, scale, ratios), out[row : row + count]))
            row += count
    in_threads(lambda job: _scale_features(*job), jobs)
    return out


def in_threads(work, jobs: list) -> None:
    """`work(job)` for every job, on up to BANK_THREADS threads: SciPy's filters and NumPy's
    eigenvalues release the GIL, so the scales of a bank are made on all cores at once (each
    writes its own rows; the values are those of one thread)."""
    if len(jobs) < 2 or BANK_THREADS < 2:
        for job in jobs:
            work(job)
        return
    with ThreadPoolExecutor(min(BANK_THREADS, len(jobs))) as pool:
        for _ in pool.map(work, jobs):
            pass


def input_feature_spec(spacing: Sequence[float] | None, scales: Sequence[float] = DEFAULT_SCALES) -> dict:
    """How a network's extra input channels are made; stored in the model so prediction redoes it."""
    return {"bank": "ilastik", "scales": [float(s) for s in scales],
            "spacing": None if spacing is None else [float(s) for s in spacing]}


def with_input_features(image: np.ndarray, spec: dict) -> np.ndarray:
    """(C, Z, Y, X) image → the image followed by its filter bank, as `spec` describes (one allocation)."""
    channels = image.shape[0]
    joined = np.empty((channels * (1 + _bank_size(spec)),) + image.shape[1:], dtype=np.float32)
    joined[:channels] = image
    filter_features(image, spec["scales"], spec["spacing"], out=joined[channels:])
    return joined


def bank_halo(spec: dict) -> tuple[int, int, int]:
    """Voxels beyond a region, per axis (Z, Y, X), that its filter bank reads: the widest kernel
    chain (a second derivative, or a gradient smoothed again for the structure tensor)."""
    ratios = _spacing_ratios(spec["spacing"])
    return tuple(max(axis) for axis in zip(*(scale_halo(scale, ratios) for scale in spec["scales"])))


def region_with_input_features(read, volume_shape, box: tuple[slice, ...], spec: dict) -> np.ndarray:
    """with_input_features of the whole volume, cropped to `box`, without computing the whole volume:
    the bank is made from the box grown by each scale's reach (`region_bank`; clipped at the volume's faces, where the
    filters mirror as they do for the whole volume), so the values are the same."""
    widest = grown_box(box, bank_halo(spec), volume_shape)
    region = np.asarray(read(widest), dtype=np.float32)  # the one read; region_bank takes its boxes from it
    local = lambda b: region[(slice(None),) + tuple(slice(x.start - w.start, x.stop - w.start)  # noqa: E731
                                                    for x, w in zip(b, widest))]
    return np.concatenate([local(box), region_bank(local, volume_shape, box, spec)])


def scale_halo(scale: float, ratios) -> tuple[int, int, int]:
    """Voxels beyond a region, per axis (Z, Y, X), that the features of one scale read."""
    smoothing_only = scale < SMOOTHING_ONLY_BELOW

    def reach(sigma: float) -> int:
        if smoothing_only:
            return _radius(sigma, 0)
        return max(_radius(sigma, 2), _radius(sigma, 1) + _radius(_OUTER_RATIO * sigma, 0))

    return tuple(reach(scale / ratio) for ratio in ratios)


def grown_box(box: tuple[slice, ...], halo, volume_shape) -> tuple[slice, ...]:
    """`box` grown by `halo` voxels per axis, clipped at the volume's faces."""
    return tuple(slice(max(b.start - h, 0), min(b.stop + h, n)) for b, h, n in zip(box, halo, volume_shape))


def region_bank(read, volume_shape, box: tuple[slice, ...], spec: dict) -> np.ndarray:
    """The filter bank (F, z, y, x) of the whole volume, cropped to `box`, computed from `read`
    (box → (C, z, y, x) image) scale by scale, each from the box grown by that scale's own reach:
    the same values as `filter_features` of the whole volume, for the work of a few boxes (a small
    scale reads a few voxels around the box, the widest tens)."""
    ratios = _spacing_ratios(spec["spacing"])
    inner = tuple(b.stop - b.start for b in box)
    widest = grown_box(box, bank_halo(spec), volume_shape)
    region = np.asarray(read(widest), dtype=np.float32)  # read once; each scale takes what it reaches
    channels = region.shape[0]
    out = np.empty((channels * _bank_size(spec),) + inner, dtype=np.float32)
    jobs, row = [], 0
    for scale in spec["scales"]:
        grown = grown_box(box, scale_halo(scale, ratios), volume_shape)
        inside = tuple(slice(b.start - g.start, b.stop - g.start) for b, g in zip(box, grown))
        image = region[(slice(None),) + tuple(slice(g.start - w.start, g.stop - w.start) for g, w in zip(grown, widest))]
        count = len(features_at(scale))
        jobs += [(_Filter(image[channel], scale, ratios), inside, out[channel * _bank_size(spec) + row:][:count])
                 for channel in range(channels)]
        row += count
    in_threads(_cropped_scale_features, jobs)
    return out


def _cropped_scale_features(job) -> None:
    """One scale's features of a grown region, cropped to the box into the job's rows."""
    filters, inside, rows = job
    scratch = np.empty((len(rows),) + filters.volume.shape, dtype=np.float32)
    _scale_features(filters, scratch)
    rows[...] = scratch[(slice(None),) + inside]


def bank_at(read, volume_shape, spec: dict, voxels: np.ndarray, block=None) -> np.ndarray:
    """(F, N) filter bank at the flat indices `voxels` of a (Z, Y, X) volume (`read`: box →
    (C, z, y, x) image), made on the bounding box of the voxels in each `block` of a grid (None:
    BANK_GRID): the bank of the whole volume is never held, only of the regions the voxels lie in."""
    block = block or BANK_GRID
    coordinates = np.stack(np.unravel_index(voxels, volume_shape))
    counts = [-(-n // b) for n, b in zip(volume_shape, block)]
    ids = np.ravel_multi_index(tuple(c // b for c, b in zip(coordinates, block)), counts)
    order = np.argsort(ids, kind="stable")
    boundaries = np.flatnonzero(np.diff(ids[order])) + 1
    out = None
    for members in np.split(order, boundaries):
        local = coordinates[:, members]
        box = tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(local.min(axis=1), local.max(axis=1)))
        bank = region_bank(read, volume_shape, box, spec)
        if out is None:
            out = np.empty((bank.shape[0], voxels.size), dtype=np.float32)
        out[:, members] = bank[(slice(None),) + tuple(c - b.start for c, b in zip(local, box))]
    return out


def feature_memory_shortfall(name: str, shape, spec: dict | None, budget: int | None = None) -> str | None:
    """Why a (C, Z, Y, X) volume's filter-bank inputs cannot fit in the free memory, or in `budget`
    bytes when that is less (the image joined to its bank and the normalized copy live at once), in
    one line naming `name`; None if they fit."""
    free = free_memory()
    if spec is None or (free is None and budget is None):
        return None
    available = min(b for b in (free, budget) if b is not None)
    channels, *spatial = shape
    needed = 2 * 4 * channels * (1 + _bank_size(spec)) * math.prod(spatial)
    if needed <= available:
        return None
    where = "are free" if available == free else "are allowed (--max-memory)"
    return (f"{name}: filter-bank inputs for {'×'.join(map(str, spatial))} voxels need about "
            f"{needed / 2**30:.1f} GiB of memory, {available / 2**30:.1f} GiB {where}")


def free_memory() -> int | None:
    """Bytes of physical memory free now (None where the system does not say)."""
    if not hasattr(os, "sysconf"):
        return None
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def bank_bytes(shape, spec: dict) -> int:
    """Bytes of the float32 filter bank of a (C, Z, Y, X) volume."""
    return 4 * shape[0] * _bank_size(spec) * math.prod(shape[1:])


def raw_channels(network_channels: int, spec: dict | None) -> int:
    """Image channels a network expects before its filter-bank channels are added."""
    return network_channels if spec is None else network_channels // (1 + _bank_size(spec))


def _bank_size(spec: dict) -> int:
    """Filters per image channel."""
    return len(feature_names(1, spec["scales"]))


def _spacing_ratios(spacing: Sequence[float] | None) -> tuple[float, float, float]:
    if spacing is None:
        return (1.0, 1.0, 1.0)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers (Z, Y, X), got {tuple(spacing)}")
    finest = min(spacing)
    return tuple(float(s) / finest for s in spacing)


def _scale_features(filters: _Filter, out: np.ndarray) -> None:
    """Write the features of one scale into `out` (rows in FEATURES_PER_SCALE order)."""
    out[0] = filters.smooth()
    if len(out) == 1:
        return
    hessian = [filters.derivative(i, j) for i, j in _PAIRS]
    np.add(hessian[0], hessian[1], out=out[1])
    out[1] += hessian[2]
    _symmetric_eigenvalues(hessian, out[7:10])
    del hessian
    gradient = [filters.derivative(axis) for axis in range(3)]
    np.sqrt(gradient[0] ** 2 + gradient[1] ** 2 + gradient[2] ** 2, out=out[2])
    np.subtract(out[0], filters.smooth(_DOG_RATIO), out=out[3])
    tensor = [filters.smooth(_OUTER_RATIO, gradient[i] * gradient[j]) for i, j in _PAIRS]
    _symmetric_eigenvalues(tensor, out[4:7])


class _Filter:
    """Separable Gaussian smoothing and derivatives of one volume at one scale, vigra's way."""

    def __init__(self, volume: np.ndarray, scale: float, ratios: tuple[float, ...]):
        self.volume, self.scale, self.ratios = volume, scale, ratios

    def smooth(self, factor: float = 1.0, volume: np.ndarray | None = None) -> np.ndarray:
        """Gaussian of σ = factor · scale (of `volume`, by default the filter's own)."""
        return self._apply(self.volume if volume is None else volume, (0, 0, 0), factor)

    def derivative(self, *axes: int) -> np.ndarray:
        """First or second Gaussian derivative along `axes`, per finest voxel."""
        order = [0, 0, 0]
        for axis in axes:
            order[axis] += 1
        return self._apply(self.volume, tuple(order), 1.0)

    def _apply(self, volume: np.ndarray, order: tuple[int, ...], factor: float) -> np.ndarray:
        result = volume
        for axis, (n, ratio) in enumerate(zip(order, self.ratios)):
            weights = gaussian_kernel(factor * self.scale / ratio, n) / ratio**n
            result = ndimage.correlate1d(result, weights, axis=axis, output=np.float32, mode="mirror")
        return result


def gaussian_kernel(sigma: float, order: int) -> np.ndarray:
    """vigra's 1D Gaussian (derivative) kernel, for correlation.

    Window (3 + order/2)·σ, at least one voxel. Derivative kernels lose their DC part and are scaled
    so that they are exact on polynomials of their order (x for the first, x²/2 for the second):
    truncated Gaussian derivatives are neither, badly so when σ is near or under one voxel.
    """
    radius = _radius(sigma, order)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    if order == 0:
        return kernel / kernel.sum()
    kernel *= x if order == 1 else x**2 / sigma**2 - 1
    kernel -= kernel.mean()
    return kernel / (np.sum(kernel * x**order) / math.factorial(order))


def _radius(sigma: float, order: int) -> int:
    """Half-width of gaussian_kernel(sigma, order) in voxels."""
    return max(int((_WINDOW + 0.5 * order) * sigma + 0.5), 1)


def _symmetric_eigenvalues(entries: list[np.ndarray], out: np.ndarray) -> None:
    """Eigenvalues (descending) of the symmetric 3×3 field given by its 6 entries (_PAIRS order).

    Closed form (trigonometric solution of the characteristic cubic, Smith 1961) in float64, chunk
    by chunk: about 8× faster than LAPACK's eigvalsh on millions of tiny matrices, which would
    otherwise dominate the whole filter bank.
    """
    flat_entries = [e.reshape(-1) for e in entries]
    flat_out = out.reshape(3, -1)
    for start in range(0, flat_out.shape[1], _EIGEN_CHUNK):
        chunk = slice(start, start + _EIGEN_CHUNK)
        flat_out[:, chunk] = symmetric_eigenvalues_3x3(*(e[chunk] for e in flat_entries))


def symmetric_eigenvalues_3x3(a00, a11, a22, a01, a02, a12) -> np.ndarray:
    """(3, N) eigenvalues, largest first, of symmetric matrices given entry-wise as (N,) arrays."""
    a00, a11, a22, a01, a02, a12 = (np.asarray(a, dtype=np.float64) for a in (a00, a11, a22, a01, a02, a12))
    mean = (a00 + a11 + a22) / 3
    d00, d11, d22 = a00 - mean, a11 - mean, a22 - mean
    spread = np.sqrt((d00**2 + d11**2 + d22**2 + 2 * (a01**2 + a02**2 + a12**2)) / 6)
    # det((A - mean·I) / spread) / 2 is the cosine of 3φ; a multiple of I has spread 0 and any φ works.
    det = d00 * (d11 * d22 - a12**2) - a01 * (a01 * d22 - a12 * a02) + a02 * (a01 * a12 - d11 * a02)
    safe = np.where(spread > 0, spread, 1.0)
    phi = np.arccos(np.clip(det / (2 * safe**3), -1.0, 1.0)) / 3
    largest = mean + 2 * spread * np.cos(phi)
    smallest = mean + 2 * spread * np.cos(phi + 2 * np.pi / 3)
    return np.stack([largest, 3 * mean - largest - smallest, smallest])
