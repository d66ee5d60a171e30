"""Where the tiles of a volume go, what each one reads, and how big they may be.

Valid-padding networks: output tiles are laid edge to edge on a grid that starts at voxel 0 with
a step that is a multiple of 2^(levels-1), so every tile sees its input with the same pooling
phase as one whole-volume forward pass would; each input tile carries the context margin its
output needs, mirrored beyond the volume's border. The result then does not depend on the tile
size (the paper's seamless tiling).

Same-padding networks, by default: their output near a tile border would see the network's zero
padding instead of context, so each output tile is predicted from its box grown by the network's
reach (`Geometry.reach`: everything an output voxel depends on, rounded up to the pooling grid),
on the same grid from voxel 0; at the volume's faces the box stops where a whole-volume pass would
pad too (the volume rounded up to a valid size, mirrored beyond its end). Every output voxel then
sees exactly what it sees in one whole-volume pass: the result does not depend on the tile size
or the memory budget, as for valid padding. With an explicit `overlap`, windows instead overlap
and are blended with a Gaussian weight that trusts each window's centre most (no margin to pay,
but the result depends on the windows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from unet3d.inference.memory import estimate_tile_bytes
from unet3d.model import Geometry, UNetConfig

MAX_TILE_CHECKS = 64  # exact memory estimates tried on the best-ranked tiles before the near-cubic one wins


def reflect_index(indices: np.ndarray, n: int) -> np.ndarray:
    """Map any integer positions into [0, n) by mirroring at the borders without repeating the
    edge voxel (numpy's pad mode 'reflect', repeated as often as needed for tiny volumes)."""
    if n == 1:
        return np.zeros_like(indices)
    period = 2 * (n - 1)
    folded = np.mod(indices, period)
    return np.where(folded > n - 1, period - folded, folded)


def mirrored_box(read, shape, start, size) -> tuple[np.ndarray, list]:
    """The (C, *size) input at `start` (may be negative or reach past the volume's end), as the
    bounding box of the voxels it needs, read once, and per axis the positions in that box to take
    (None where the box already is the tile along the axis): the gather can then run where the
    tile goes (on a GPU it is free; on the host it was a third of a second for a 348³ tile).

    `read(region)` returns the (C, z, y, x) data of a (Z, Y, X) tuple of slices inside the volume.
    """
    indices = [reflect_index(np.arange(s, s + k), n) for s, k, n in zip(start, size, shape)]
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in indices)
    positions = [None if s >= 0 and s + k <= n else i - b.start for i, b, s, k, n in zip(indices, box, start, size, shape)]
    return read(box), positions


def grid_step(geometry: Geometry, axis: int) -> int:
    """Shift along an axis that moves the network's output by exactly as much: the spacing of
    valid input sizes, 2^(levels-1) (1 along z for the 2D network)."""
    first = geometry.valid_input_size_1d(1, axis, "up")
    return geometry.valid_input_size_1d(first + 1, axis, "up") - first


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


@dataclass(frozen=True)
class TilePlan:
    """Every tile's output start (Z, Y, X); all tiles share one input size.

    A tile's input starts at output start − `margin` and spans `input_shape`; of its network
    output (`output_shape`, starting at the output start) the part inside the volume is used.
    """

    volume_shape: tuple[int, int, int]
    input_shape: tuple[int, int, int]
    output_shape: tuple[int, int, int]
    margin: tuple[int, int, int]
    starts: list[tuple[int, int, int]]
    blended: bool
    # Same padding, seamless: the extent a whole-volume pass pads to; inputs are clipped to it, so
    # tiles at the faces are smaller than `input_shape` (None: every input is `input_shape`).
    extent: tuple[int, int, int] | None = None

    def input_box(self, start) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(start, shape) of the input of the output tile at `start`."""
        first = tuple(s - m for s, m in zip(start, self.margin))
        if self.extent is None:
            return first, self.input_shape
        first = tuple(max(f, 0) for f in first)
        last = tuple(min(s + k + m, e) for s, k, m, e in zip(start, self.output_shape, self.margin, self.extent))
        return first, tuple(l - f for f, l in zip(first, last))

    def output_offset(self, start) -> tuple[int, ...]:
        """Where the output tile at `start` begins in its network output (same padding: the
        output covers the whole input box)."""
        if self.extent is None:
            return (0, 0, 0)
        return tuple(s - f for s, f in zip(start, self.input_box(start)[0]))

    def output_region(self, start) -> tuple[slice, ...]:
        """The part of a tile's output that lies inside the volume."""
        return tuple(slice(s, min(s + k, n)) for s, k, n in zip(start, self.output_shape, self.volume_shape))


def _grid(starts_per_axis) -> list[tuple[int, int, int]]:
    return [(z, y, x) for z in starts_per_axis[0] for y in starts_per_axis[1] for x in starts_per_axis[2]]


def _grid_steps(geometry: Geometry, volume_shape, output_tile) -> tuple[int, ...]:
    """`output_tile` rounded down to the grid step (at least one step, at most the volume rounded up)."""
    steps = []
    for axis, (n, t) in enumerate(zip(volume_shape, output_tile)):
        g = grid_step(geometry, axis)
        steps.append(min(max(g, t // g * g), _round_up(n, g)))
    return tuple(steps)


def edge_to_edge_plan(geometry: Geometry, volume_shape, output_tile) -> TilePlan:
    """Valid padding: output tiles of `output_tile` (rounded down to the grid step) edge to edge.

    A network output of that size is not always possible (for 4 levels outputs are 4 more than a
    multiple of 8), so each tile runs the smallest valid input covering it and drops the excess
    (the last tile's excess beyond the volume is dropped the same way).
    """
    steps = _grid_steps(geometry, volume_shape, output_tile)
    input_shape = geometry.input_shape_for_output(steps)
    starts = _grid([range(0, n, step) for n, step in zip(volume_shape, steps)])
    return TilePlan(tuple(volume_shape), input_shape, steps, geometry.margin(), starts, blended=False)


def context_plan(geometry: Geometry, volume_shape, output_tile) -> TilePlan:
    """Same padding, seamless: output tiles of `output_tile` (rounded down to the grid step) edge
    to edge, each read with the network's reach around it, clipped to the extent a whole-volume
    pass pads to (both multiples of the grid step, so every input is a valid size)."""
    steps = _grid_steps(geometry, volume_shape, output_tile)
    extent = geometry.valid_input_shape(volume_shape)
    reach = geometry.reach()
    input_shape = tuple(min(k + 2 * r, e) for k, r, e in zip(steps, reach, extent))
    starts = _grid([range(0, n, step) for n, step in zip(volume_shape, steps)])
    return TilePlan(tuple(volume_shape), input_shape, steps, reach, starts, blended=False, extent=extent)


def _window_starts(n: int, window: int, overlap: float) -> list[int]:
    """Evenly spread window starts covering [0, n), neighbours overlapping by ≥ `overlap`·window."""
    if n <= window:
        return [0]
    stride = max(1, int(window * (1 - overlap)))
    count = math.ceil((n - window) / stride) + 1
    return sorted({round(i * (n - window) / (count - 1)) for i in range(count)})


def overlapping_plan(geometry: Geometry, volume_shape, window, overlap: float = 0.25) -> TilePlan:
    """Same padding: windows of `window` (rounded up to a valid size) overlapping by `overlap`."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    window = geometry.valid_input_shape(window)
    starts = _grid([_window_starts(n, w, overlap) for n, w in zip(volume_shape, window)])
    return TilePlan(tuple(volume_shape), window, window, (0, 0, 0), starts, blended=True)


def gaussian_weight(shape, device: torch.device | str = "cpu", sigma_fraction: float = 1 / 8) -> torch.Tensor:
    """Blending weight of a window on `device`: a Gaussian with σ = shape/8 per axis, peak 1,
    floored so the border voxels of a window that is alone there still count. Built as the product
    of its per-axis factors where it is used (the whole window in NumPy took 0.45 s for 256³, more
    than a GPU takes to predict it)."""
    weight = torch.ones((1,) * len(shape), device=device)
    for axis, n in enumerate(shape):
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        factor = torch.exp(-0.5 * (x / max(n * sigma_fraction, 1e-6)) ** 2)
        view = [1] * len(shape)
        view[axis] = n
        weight = weight * (factor / factor.max()).to(device, torch.float32).view(view)
    return weight.clamp_(min=1e-3)


def plan_tiles(config: UNetConfig, volume_shape, output_tile, overlap: float | None = None) -> TilePlan:
    """The tiles for `config`: edge to edge with their context (valid padding; same padding
    without `overlap`), or same-padding windows overlapping by `overlap` and blended."""
    if config.padding == "valid":
        return edge_to_edge_plan(config.geometry, volume_shape, output_tile)
    if overlap is None:
        return context_plan(config.geometry, volume_shape, output_tile)
    return overlapping_plan(config.geometry, volume_shape, output_tile, overlap)


def blends(config: UNetConfig, overlap: float | None) -> bool:
    """Whether windows are blended: same padding with an `overlap` asked for."""
    return config.padding == "same" and overlap is not None


def choose_output_tile(config: UNetConfig, volume_shape, max_memory: int, batch_size: int = 1,
                       overlap: float | None = None, device_type: str = "cpu") -> tuple[int, int, int]:
    """The output tile (the window, for blended windows) for a volume whose batch fits
    `max_memory` bytes, shaped by the volume so the network does the least work: tiles each pay
    the context margin again, blended windows their overlap.

    Same-padding windows stay as thick as the near-cubic window or `thick_window` (a thin window
    sees zero padding almost everywhere), and their blending accumulators count against the
    budget; where no window fits with them (very large Y × X planes), the window that exceeds
    the budget least is returned and blend_bytes says by about how much. ValueError if even the
    smallest tile does not fit. `device_type` is where the network runs (the memory it takes differs).
    """
    blended = blends(config, overlap)

    def tile_bytes(tile):
        return estimate_tile_bytes(config, _input_shape(config, tile, overlap, volume_shape), batch_size, device_type)

    def accumulators(candidate):
        return blend_bytes(config, volume_shape, candidate) if blended else 0

    tile = near_cubic_tile(config, volume_shape, max_memory, tile_bytes)
    per_voxel = tile_bytes(tile) / math.prod(_input_shape(config, tile, overlap, volume_shape))

    thinnest = min(min(tile), thick_window(config)) if blended else 0

    def total_bytes(candidate):
        return tile_bytes(candidate) + accumulators(candidate)

    def roughly_fits(candidate, input_voxels):
        return per_voxel * input_voxels + accumulators(candidate) <= max_memory

    ranked = _tiles_by_work(config, volume_shape, overlap, roughly_fits, thinnest)[:MAX_TILE_CHECKS]
    best = next((c for c in ranked if total_bytes(c) <= max_memory), None)
    if best or not blended:
        return best or tile
    # No window fits with its accumulators: of those whose pass fits, the one that exceeds the budget least.
    ranked = _tiles_by_work(config, volume_shape, overlap, lambda _, voxels: per_voxel * voxels <= max_memory, thinnest)
    passing = [c for c in ranked[:MAX_TILE_CHECKS] if tile_bytes(c) <= max_memory]
    return min(passing, key=total_bytes, default=tile)


def thick_window(config: UNetConfig) -> int:
    """A same-padding window this thick along an axis gives half of it the network's whole context
    (four times the context a valid-padding twin loses per side: 176 for 4 levels); a thicker floor
    would only force larger windows and more overlap on volumes a little larger than one window."""
    return 4 * Geometry(config.levels, "valid").margin_1d()


def blend_bytes(config: UNetConfig, volume_shape, window) -> int:
    """Accumulators of blended windows: weighted class sums and weights over one window depth of
    the volume's Y × X, twice while a new row of windows extends them (0 for valid padding)."""
    if config.padding == "valid":
        return 0
    _, height, width = volume_shape
    return 2 * 4 * (config.num_classes + 1) * min(window[0], volume_shape[0]) * height * width


def near_cubic_tile(config: UNetConfig, volume_shape, max_memory: int, need) -> tuple[int, int, int]:
    """Largest tile with need(tile) ≤ max_memory grown along its smallest axis, never beyond the volume.

    Each call of `need` replays a forward pass (tens of milliseconds, more for long tiles), so the
    axes still growing are raised together to the largest level that fits by bisection, and only
    then one grid step at a time: about 20 estimates instead of one per step (up to 140).
    """
    steps = [grid_step(config.geometry, a) for a in range(3)]
    caps = [_round_up(n, s) for n, s in zip(volume_shape, steps)]
    tile = list(steps)
    if need(tile) > max_memory:
        raise ValueError(f"the smallest tile needs about {need(tile) / 2**20:.0f} MiB, more than the memory budget")
    growing = [a for a in range(3) if tile[a] < caps[a]]
    while growing:
        tile = _raise_together(tile, growing, steps, caps, lambda t: need(t) <= max_memory)
        growing = [a for a in growing if tile[a] < caps[a]]
        if not growing:
            break
        axis = min(growing, key=lambda a: tile[a])
        candidate = list(tile)
        candidate[axis] += steps[axis]
        if candidate[axis] <= caps[axis] and need(candidate) <= max_memory:
            tile = candidate
        else:
            growing.remove(axis)
    return tuple(tile)


def _raise_together(tile, axes, steps, caps, fits) -> list[int]:
    """`tile` with each of `axes` raised to the largest common level (rounded down to its grid
    step, at most its cap, never below its size now) for which fits(tile) holds."""
    def at_level(level):
        raised = list(tile)
        for a in axes:
            raised[a] = min(caps[a], max(tile[a], level // steps[a] * steps[a]))
        return raised

    floor = min(tile[a] for a in axes)
    levels = sorted({size for a in axes for size in range(steps[a], caps[a] + 1, steps[a]) if size >= floor})
    low, high = 0, len(levels) - 1
    while low < high:
        middle = (low + high + 1) // 2
        if fits(at_level(levels[middle])):
            low = middle
        else:
            high = middle - 1
    return at_level(levels[low])


def tiles_work(config: UNetConfig, volume_shape, tile, overlap: float | None = None) -> int:
    """Input voxels the network reads to predict the volume with this tile size: its work."""
    axes = [_axis_cost(config, n, a, size, overlap) for a, (n, size) in enumerate(zip(volume_shape, tile))]
    return math.prod(count for count, _ in axes) * math.prod(size for _, size in axes)


def _axis_cost(config: UNetConfig, n: int, axis: int, size: int, overlap: float | None) -> tuple[int, int]:
    """(tiles along the axis, input size of each) for an output tile or window of `size`."""
    if config.padding == "valid":
        return -(-n // size), size + 2 * config.geometry.margin()[axis]
    if overlap is None:
        extent = _round_up(n, grid_step(config.geometry, axis))
        return -(-n // size), min(size + 2 * config.geometry.reach()[axis], extent)
    return len(_window_starts(n, size, overlap)), size


def _axis_options(config: UNetConfig, n: int, axis: int, overlap: float | None, thinnest: int) -> list[tuple[int, int, int]]:
    """(size, tiles along the axis, input size) for the smallest size giving each tile count;
    sizes below `thinnest` are left out unless the axis is shorter."""
    step = grid_step(config.geometry, axis)
    cap = _round_up(n, step)
    smallest = {}
    for size in range(min(_round_up(thinnest, step), cap) or step, cap + 1, step):
        count, input_size = _axis_cost(config, n, axis, size, overlap)
        smallest.setdefault(count, (size, count, input_size))
    return sorted(smallest.values())


def _tiles_by_work(config: UNetConfig, volume_shape, overlap: float | None, roughly_fits, thinnest: int) -> list[tuple[int, int, int]]:
    """Tiles for which roughly_fits(tile, input voxels) holds, least work first (then larger first)."""
    axes = [_axis_options(config, n, a, overlap, thinnest) for a, n in enumerate(volume_shape)]
    ranked = []
    for z in axes[0]:
        for y in axes[1]:
            fitting = [x for x in axes[2] if roughly_fits((z[0], y[0], x[0]), z[2] * y[2] * x[2])]
            if fitting:
                x = min(fitting, key=lambda o: (o[1] * o[2], -o[0]))
                tile = (z[0], y[0], x[0])
                ranked.append((z[1] * y[1] * x[1] * z[2] * y[2] * x[2], -math.prod(tile), tile))
    return [tile for *_, tile in sorted(ranked)]


def _input_shape(config: UNetConfig, output_tile, overlap: float | None = None, volume_shape=None) -> tuple[int, ...]:
    """The (largest) input of an output tile: with its context margin (same padding: at most the
    padded `volume_shape`, when given), or the window itself when blended."""
    geometry = config.geometry
    if config.padding == "valid":
        return geometry.input_shape_for_output(output_tile)
    if overlap is not None:
        return geometry.valid_input_shape(output_tile)
    grown = tuple(t + 2 * r for t, r in zip(geometry.valid_input_shape(output_tile), geometry.reach()))
    return grown if volume_shape is None else tuple(min(g, e) for g, e in zip(grown, geometry.valid_input_shape(volume_shape)))
