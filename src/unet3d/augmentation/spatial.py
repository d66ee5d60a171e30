"""Random spatial transforms of a patch: flips, rotation, zoom and a smooth elastic deformation.

A transform maps every voxel of the output patch to a (fractional) position in the input volume:

    q(p) = pivot + A · (p - shape//2) + d(p)

with A the linear part (flips, rotation, zoom; rotation in physical space) and d the elastic
displacement, an interpolating cubic B-spline through normal random vectors on a coarse grid.
The image is then sampled trilinearly with mirrored borders and the labels by nearest neighbour
with -1 outside, so one set of parameters moves both identically. Only the bounding box of the
visited positions is read from the volume, so the cost depends on the patch, not the volume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from unet3d.augmentation.config import AugmentationConfig
from unet3d.data.labels import UNLABELED


def patch_start(center, shape) -> np.ndarray:
    """First voxel of a window of `shape` around `center`: voxel round(center) lands at index shape//2."""
    return np.floor(np.asarray(center, dtype=np.float64) + 0.5).astype(np.int64) - np.asarray(shape) // 2


def deformable_axes(spacing, config: AugmentationConfig) -> np.ndarray:
    """Axes fine enough to rotate, zoom and deform along (see AugmentationConfig.anisotropy_threshold)."""
    spacing = np.asarray(spacing, dtype=np.float64)
    return spacing <= config.anisotropy_threshold * spacing.min()


def random_linear_map(rng: np.random.Generator, config: AugmentationConfig, spacing) -> np.ndarray:
    """3×3 map from output-patch voxel offsets to input voxel offsets: flips, rotation, zoom."""
    spacing = np.asarray(spacing, dtype=np.float64)
    free = deformable_axes(spacing, config)
    flips = np.where(rng.random(3) < 0.5, -1.0, 1.0) if config.flip else np.ones(3)
    angles = np.deg2rad(rng.uniform(-config.rotation_deg, config.rotation_deg, size=3))
    zoom = rng.uniform(*config.scale)
    rotation = np.eye(3)
    for axis in range(3):
        plane = [a for a in range(3) if a != axis]
        if free[plane].all():  # a rotation about `axis` moves voxels only within `plane`
            rotation = rotation @ _plane_rotation(plane, angles[axis])
    physical = np.diag(spacing)
    per_axis = flips * np.where(free, 1.0 / zoom, 1.0)
    return np.linalg.inv(physical) @ rotation @ physical @ np.diag(per_axis)


def _plane_rotation(plane: list[int], angle: float) -> np.ndarray:
    a, b = plane
    matrix = np.eye(3)
    matrix[a, a] = matrix[b, b] = math.cos(angle)
    matrix[a, b], matrix[b, a] = -math.sin(angle), math.sin(angle)
    return matrix


def cubic_bspline(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    return np.where(t < 1, (4 - 6 * t**2 + 3 * t**3) / 6, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


def control_point_count(length: int, spacing: float) -> int:
    """Control points, `spacing` apart, needed to span `length` voxels (at least 2)."""
    return max(2, math.ceil((length - 1) / spacing) + 1)


def spline_interpolation_matrix(length: int, spacing: float) -> np.ndarray:
    """(length × points) matrix: values at the control points → interpolating cubic B-spline per voxel.

    The control grid is centred on the voxels. Mirrored boundary coefficients give a unique
    interpolating spline, which passes exactly through the random vectors, so the displacement
    at the control points has the configured std (a smoothing spline would shrink it ~3-fold).
    Separable per axis, so the dense 3-D field costs three small matrix products.
    """
    points = control_point_count(length, spacing)
    coefficients = np.arange(-1, points + 1)  # one mirrored coefficient beyond each end
    mirror = np.zeros((points + 2, points))
    mirror[np.arange(1, points + 1), np.arange(points)] = 1.0
    mirror[0, 1] = mirror[-1, points - 2] = 1.0
    positions = (np.arange(length) - (length - 1) / 2) / spacing + (points - 1) / 2
    basis = cubic_bspline(positions[:, None] - coefficients[None, :]) @ mirror
    collocation = cubic_bspline(np.arange(points)[:, None] - coefficients[None, :]) @ mirror
    return np.linalg.solve(collocation.T, basis.T).T


def random_elastic_field(rng: np.random.Generator, config: AugmentationConfig, shape, spacing,
                         device=None) -> torch.Tensor | None:
    """(Z, Y, X, 3) displacement in voxels, or None when elastic_sigma is 0.

    The layout is grid_sample's: components in (x, y, z) order, so sampling needs no copy.
    """
    control = random_elastic_control(rng, config, shape, spacing)
    return None if control is None else control.to(device).field()


def random_elastic_control(rng: np.random.Generator, config: AugmentationConfig, shape,
                           spacing) -> "ElasticControl | None":
    """The random part of an elastic deformation of a `shape` patch, or None when elastic_sigma is 0.

    Spacing and sigma are given in voxels of the finest axis and converted per axis, so the
    deformation is the same in physical units on anisotropic data; undeformable axes get none.
    """
    if config.elastic_sigma == 0:
        return None
    spacing = np.asarray(spacing, dtype=np.float64)
    voxels_per_unit = spacing.min() / spacing
    free = deformable_axes(spacing, config)
    grid_spacing = config.elastic_spacing * voxels_per_unit
    matrices = tuple(torch.as_tensor(spline_interpolation_matrix(n, s), dtype=torch.float32)
                     for n, s in zip(shape, grid_spacing))
    sigma = config.elastic_sigma * voxels_per_unit * free
    control = rng.normal(size=(3, *(m.shape[1] for m in matrices))) * sigma[:, None, None, None]
    return ElasticControl(torch.as_tensor(control[::-1].copy(), dtype=torch.float32), matrices)


@dataclass
class ElasticControl:
    """Control-point displacements (3, i, j, k), components (x, y, z), and the spline matrices
    (Z×i, Y×j, X×k) that spread them over the patch: a few kilobytes that make the dense field
    wherever the patch is resampled (on a GPU: without sending the field over the bus)."""

    vectors: torch.Tensor
    matrices: tuple[torch.Tensor, torch.Tensor, torch.Tensor]

    def to(self, device, non_blocking: bool = False) -> "ElasticControl":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return ElasticControl(move(self.vectors), tuple(move(m) for m in self.matrices))

    def pin_memory(self) -> "ElasticControl":
        return ElasticControl(self.vectors.pin_memory(), tuple(m.pin_memory() for m in self.matrices))

    def field(self) -> torch.Tensor:
        """(Z, Y, X, 3) displacement in voxels, grid_sample's component order."""
        mz, my, mx = self.matrices
        field = self.vectors @ mx.T  # (3, i, j, X)
        field = (my @ field).permute(1, 2, 3, 0).reshape(mz.shape[1], -1)  # (i, Y·X·3), small
        return (mz @ field).reshape(mz.shape[0], my.shape[0], mx.shape[0], 3)  # the only dense step

    def bound(self) -> np.ndarray:
        """Per axis (z, y, x), a bound on |displacement| read off the control points alone.

        Every displacement is a sum of control vectors weighted by products of the matrices'
        entries, so it is at most the largest control vector times the largest absolute row
        sum of each matrix: enough to cut the region a patch reads before its field exists.
        """
        spread = math.prod(float(m.abs().sum(1).max()) for m in self.matrices)
        return self.vectors.abs().amax(dim=(1, 2, 3)).double().numpy()[::-1] * spread


def sample_transformed(image: torch.Tensor, labels: torch.Tensor, center, shape, linear: np.ndarray,
                       displacement: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (trilinear, mirrored) and labels (nearest, -1 outside) at q(p) for every output voxel p."""
    reach = None
    if displacement is not None:
        smallest, largest = (v.cpu().numpy()[::-1] for v in torch.aminmax(displacement.reshape(-1, 3), dim=0))
        reach = (smallest, largest)
    image_region, label_region, warp = cut_transformed(image, labels, center, shape, linear, reach)
    return resample(image_region, label_region, warp, displacement)


@dataclass
class Warp:
    """Where each voxel of a patch reads its cut region, in grid_sample's normalized coordinates:
    matrix·u + offset + scale·displacement(p), u ∈ [-1, 1]³ (float32 tensors, components (x, y, z))."""

    matrix: torch.Tensor  # (3, 3): row k, the effect of u_k
    offset: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, int, int]

    def to(self, device, non_blocking: bool = False) -> "Warp":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Warp(move(self.matrix), move(self.offset), move(self.scale), self.shape)


def cut_transformed(image: torch.Tensor, labels: torch.Tensor, center, shape, linear: np.ndarray,
                    reach: tuple[np.ndarray, np.ndarray] | None) -> tuple[torch.Tensor, torch.Tensor, Warp]:
    """The region of the volume that q reaches, directly or mirrored, and how to resample it.

    `reach` bounds the displacement per axis (z, y, x) as (smallest, largest); None: no
    displacement. Any bound containing the true one gives the same patch (up to float rounding
    of the normalized coordinates): a wider region only costs reading more. The region's border
    along any axis where q leaves the volume is the volume's own border, so grid_sample's
    reflection is the volume's mirroring. Labels come back as float class + 1 (0: outside).
    """
    shape = np.asarray(shape)
    pivot = patch_start(center, shape) + shape // 2
    half, shift = (shape - 1) / 2, (shape - 1) / 2 - shape // 2  # offset o = half·u + shift, u ∈ [-1, 1]
    corners = np.stack(np.meshgrid(*[[-1.0, 1.0]] * 3, indexing="ij"), -1).reshape(-1, 3)
    extent = (corners * half + shift) @ linear.T
    low, high = pivot + extent.min(0), pivot + extent.max(0)
    if reach is not None:
        low, high = low + reach[0], high + reach[1]
    start, stop = region_reached(np.floor(low).astype(np.int64), np.ceil(high).astype(np.int64), labels.shape)
    size = np.maximum(stop - start + 1, 2)  # see _widen_single_voxel_axes
    scale = 2.0 / (size - 1)  # region voxel → normalized coordinate
    box = tuple(slice(a, b + 1) for a, b in zip(start, stop))
    image_region, label_region = _widen_single_voxel_axes(image[(slice(None), *box)].float(),
                                                          labels[box].to(torch.float32).add_(1))  # 0: outside
    reverse = [2, 1, 0]  # grid_sample orders components (x, y, z)
    as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32, device=image.device)  # noqa: E731
    matrix, offset = scale[:, None] * linear * half[None, :], scale * (pivot - start + linear @ shift) - 1
    warp = Warp(as_tensor(matrix[reverse].T), as_tensor(offset[reverse]), as_tensor(scale[reverse]),
                tuple(int(n) for n in shape))
    return image_region, label_region, warp


def resample(image_region: torch.Tensor, label_region: torch.Tensor, warp: Warp,
             displacement: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The patch from its cut region: image trilinear (mirrored), labels nearest (-1 outside)."""
    grid = normalized_grid(warp, displacement)
    image_patch = F.grid_sample(image_region[None], grid, mode="bilinear", padding_mode="reflection",
                                align_corners=True)
    label_patch = F.grid_sample(label_region[None, None], grid, mode="nearest", padding_mode="zeros",
                                align_corners=True)
    return image_patch[0], label_patch[0, 0].long().sub_(1)


def normalized_grid(warp: Warp, displacement: torch.Tensor | None) -> torch.Tensor:
    """grid_sample's (1, Z, Y, X, 3) grid: matrix·u + offset + scale·displacement, u ∈ [-1, 1]³.

    Built by broadcasting three per-axis terms into the (scaled) displacement in place, which
    is several times faster on a CPU than F.affine_grid's batched product.
    """
    shape, device = warp.shape, warp.matrix.device
    axes = [torch.linspace(-1, 1, n, device=device) if n > 1 else torch.zeros(1, device=device) for n in shape]
    terms = [axes[k].reshape([-1 if a == k else 1 for a in range(3)] + [1]) * warp.matrix[k] for k in range(3)]
    terms[0] = terms[0] + warp.offset
    grid = torch.zeros(*shape, 3, device=device) if displacement is None else displacement * warp.scale
    for term in terms:
        grid += term
    return grid[None]


def region_reached(low: np.ndarray, high: np.ndarray, size) -> tuple[np.ndarray, np.ndarray]:
    """First and last voxel per axis of the volume that positions in [low, high] read, mirrored or not.

    Positions below 0 read their mirror image [1, -low], positions beyond the last voxel n-1
    read [2(n-1) - high, n-2]; a region ending at the volume border lets grid_sample do the
    mirroring, even repeatedly.
    """
    last = np.asarray(size) - 1
    start = np.clip(np.minimum(low, 2 * last - high), 0, last)
    stop = np.clip(np.maximum(high, -low), 0, last)
    return start, stop


def _widen_single_voxel_axes(image_region: torch.Tensor, label_region: torch.Tensor):
    """Give every axis a second voxel: image its mirror copy, labels 0 (outside).

    grid_sample sends every position along a one-voxel axis to that voxel, so without this
    positions beyond a one-voxel-thick volume would not read as outside. The region spans all
    positions reached, so inside the volume the added voxel is never read.
    """
    for axis in range(3):
        if label_region.shape[axis] == 1:
            image_region = torch.cat([image_region, image_region], dim=axis + 1)
            label_region = torch.cat([label_region, torch.zeros_like(label_region)], dim=axis)
    return image_region, label_region


def mirror_index(q: torch.Tensor, size: int) -> torch.Tensor:
    """Fold positions into [0, size-1] by mirroring about the first and last voxel centres.

    Mirroring about voxel centres maps the grid onto itself, so linear interpolation of folded
    positions equals interpolation of the mirror-padded image (numpy's 'reflect').
    """
    if size == 1:
        return torch.zeros_like(q)
    period = 2 * (size - 1)
    folded = torch.remainder(q, period)
    return torch.where(folded > size - 1, period - folded, folded)


def flips_of(linear: np.ndarray) -> np.ndarray | None:
    """The flipped axes when the linear map only mirrors axes (no rotation or zoom), else None."""
    signs = np.sign(np.diag(linear))
    return signs < 0 if np.allclose(linear, np.diag(signs), atol=1e-9) else None


def flipped_crop(image: torch.Tensor, labels: torch.Tensor, center, shape,
                 flipped: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """What sample_transformed gives for a pure flip, copied instead of interpolated.

    The mirror image of the window about the pivot voxel: along a flipped axis of even length the
    offsets -n/2 … n/2-1 become n/2 … -n/2+1, one voxel further than the unflipped window.
    """
    shape = np.asarray(shape)
    start = patch_start(center, shape) + (flipped & (shape % 2 == 0))
    image_patch, label_patch = window(image, labels, start, shape)
    axes = [int(a) for a in np.flatnonzero(flipped)]
    if not axes:
        return image_patch, label_patch
    return image_patch.flip([1 + a for a in axes]), label_patch.flip(axes)


def crop(image: torch.Tensor, labels: torch.Tensor, center, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact window around `center` (image values copied bit for bit)."""
    return window(image, labels, patch_start(center, shape), shape)


def window(image: torch.Tensor, labels: torch.Tensor, start, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of image[:, start:start+shape] mirrored and labels[start:start+shape] -1 outside the volume."""
    image_index, label_index = [], []
    inside = torch.ones(tuple(int(n) for n in shape), dtype=torch.bool, device=labels.device)
    for axis, (first, n, size) in enumerate(zip(start, shape, labels.shape)):
        wanted = torch.arange(int(first), int(first) + int(n), device=labels.device)
        image_index.append(mirror_index(wanted, size))
        label_index.append(wanted.clamp(0, size - 1))
        view = [1, 1, 1]
        view[axis] = int(n)
        inside &= ((wanted >= 0) & (wanted < size)).reshape(view)
    image_patch = _gather_box(image, image_index, first_axis=1)
    label_patch = _gather_box(labels, label_index, first_axis=0).long()  # -1 must fit, also for uint8 labels
    return image_patch, label_patch.masked_fill_(~inside, UNLABELED)


def _gather_box(volume: torch.Tensor, index: list[torch.Tensor], first_axis: int) -> torch.Tensor:
    """A new tensor volume[..., index_z, index_y, index_x] (outer product), reading only the indices' bounding box."""
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in index)
    out = volume[(slice(None),) * first_axis + box]
    copied = False
    for axis, (i, window) in enumerate(zip(index, box)):
        local = i - window.start
        if not torch.equal(local, torch.arange(len(i), device=i.device)):  # mirrored or clamped
            out = out.index_select(first_axis + axis, local)
            copied = True
    return out if copied else out.clone(memory_format=torch.contiguous_format)
