"""Objects of volumes larger than memory, block by block, numbered as the whole-volume method numbers
them; memory follows the block, not the volume.

Three passes over a grid of blocks, each block read with a halo around it:

1. Seeds, exact. The `core` rule needs each voxel's distance to the seed mask's edge only up to
   `seed_distance`, so a block read with ceil(seed_distance) + 1 more voxels on every side decides
   its seeds as the whole volume would. Seed parts are labelled per block, joined where they touch
   across a block face (connected components of the graph of touching labels) and dropped under
   `min_seed` voxels in total: the seeds of the whole volume, whatever the blocks.
2. Flood, exact where it stays near. Each block's watershed runs on the block and `halo` voxels
   around it, seeded with the global seed ids there, and its block is kept. Where a voxel's flood
   path stays inside that halo (objects smaller than the halo, walls that stop the flood) it gets
   the whole volume's label; a voxel reached only from a seed beyond the halo stays 0 or goes to a
   seed the halo holds.
3. Numbers, exact. Each object's first voxel in raster order, collected block by block, orders the
   objects as `compact_labels` orders them, in the same type.

Seed and flood ids of the whole volume wait between passes in memory maps (4 bytes a voxel, 8 past
2^32 voxels) in a temporary folder. Only the `core` seed rule without distance weighting, the rule
of every kind in `KINDS`, has this form: `maxima` smooths the distance over the volume and the
distance weight divides by its maximum, which no block knows.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from itertools import product

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.segmentation import watershed

from unet3d.instances.watershed import (
    InstanceMethod,
    check_boundary,
    core_seeds,
    edge_distance,
    flood_maps,
    raster_numbers,
    seeded_elevation,
)

DEFAULT_BLOCK = (128, 128, 128)  # voxels (Z, Y, X): 2 M voxels, a few hundred MB with the halo's reads
DEFAULT_HALO = 32  # voxels on every side of a block for the flood: objects up to this size flood as in the whole volume
UNREACHED = np.iinfo(np.int64).max  # no voxel yet: the first index of an object not met so far
Box = tuple[slice, slice, slice]


def instances_blockwise(probabilities, class_values: Sequence[int], method: InstanceMethod, interior: int = 1,
                        boundary: int | None = 2, spacing=None, *, out=None, block=DEFAULT_BLOCK,
                        halo: int = DEFAULT_HALO, workdir=None):
    """`instances_from_probabilities` block by block (see the module's docstring for when the two agree).

    probabilities: (K, Z, Y, X), an array sliced box by box (numpy, memmap, Zarr, h5py) or a volume
    with `shape` and `read(region)` (`unet3d.io.open_volume`). out: None (a new array is returned),
    an array with `__setitem__` (numpy, memmap, Zarr) whose type holds the labels, or a function
    given the labels' type that returns one (an output made once the number of objects is known).
    workdir: where the temporary seed and flood ids go (default: the system's temporary folder).
    Returns the array written."""
    check_blockwise(method, halo)
    check_boundary(method, boundary)
    read, shape = box_reader(probabilities)
    block = tuple(max(1, min(int(b), n)) for b, n in zip(block, shape))

    def maps(box: Box):
        return flood_maps(read(box), class_values, method, interior, boundary)

    with tempfile.TemporaryDirectory(prefix=".unet3d-objects.", dir=workdir) as scratch:
        seeds, ids = global_seeds(maps, shape, block, method, spacing, scratch_array(scratch, "seeds", shape))
        flood, first = flood_blocks(maps, shape, block, halo, seeds, ids, scratch_array(scratch, "flood", shape))
        present = np.flatnonzero(first < UNREACHED)
        lookup, dtype = raster_numbers(present, first[present])
        target = out(dtype) if callable(out) else np.zeros(shape, dtype) if out is None else out
        for core in grid(shape, block):
            target[core] = lookup[flood[core]].astype(dtype)
        del seeds, flood  # the memory maps close before their folder goes
    return target


def check_blockwise(method: InstanceMethod, halo: int) -> None:
    """Refuse what the blocks cannot reproduce (the module's docstring says why)."""
    if method.seeds != "core" or method.distance_weight:
        raise ValueError(f"objects block by block need the 'core' seed rule without distance weighting, not "
                         f"{method.seeds!r} with weight {method.distance_weight:g}")
    if halo < seed_halo(method):
        raise ValueError(f"a halo of {halo} voxels is less than the {seed_halo(method)} the seeds need")


def seed_halo(method: InstanceMethod) -> int:
    """Voxels around a block that decide its seeds: every voxel within seed_distance (+1 for the
    rounding of the distances) of the block; in voxels of every axis, as distances count the finest one."""
    return math.ceil(method.seed_distance) + 1


def box_reader(probabilities):
    """(box → the (K, z, y, x) probabilities there, the volume's (Z, Y, X) shape)."""
    if hasattr(probabilities, "read"):
        return probabilities.read, tuple(probabilities.shape[1:])
    return (lambda box: np.asarray(probabilities[(slice(None), *box)])), tuple(probabilities.shape[1:])


def scratch_array(folder: str, name: str, shape) -> np.memmap:
    """A zeroed memory map of ids for the whole volume, in `folder`."""
    dtype = np.uint32 if math.prod(shape) < 2**32 else np.uint64
    return np.memmap(f"{folder}/{name}.ids", dtype=dtype, mode="w+", shape=tuple(shape))


def grid(shape, block) -> list[Box]:
    """The blocks, edge to edge from voxel 0, in raster order."""
    starts = product(*(range(0, n, b) for n, b in zip(shape, block)))
    return [tuple(slice(s, min(s + b, n)) for s, b, n in zip(start, block, shape)) for start in starts]


def grown(core: Box, halo: int, shape) -> tuple[Box, Box]:
    """`core` grown by `halo` inside the volume, and where the core lies in that box."""
    box = tuple(slice(max(0, c.start - halo), min(n, c.stop + halo)) for c, n in zip(core, shape))
    return box, tuple(slice(c.start - b.start, c.stop - b.start) for c, b in zip(core, box))


def global_seeds(maps, shape, block, method: InstanceMethod, spacing, store: np.memmap):
    """Pass 1: every block's seed parts into `store` under ids unique in the volume, and the lookup
    from those ids to global seed ids (0: dropped) after joining parts across block faces."""
    halo, offset, sizes, pairs = seed_halo(method), 0, [np.zeros(1, np.int64)], []
    for core in grid(shape, block):
        box, inner = grown(core, halo, shape)
        _, _, mask = maps(box)
        labels, count = ndimage.label(core_seeds(mask, edge_distance(mask, spacing), method.seed_distance)[inner])
        sizes.append(np.bincount(labels.ravel(), minlength=count + 1)[1:])
        labels = np.where(labels > 0, labels + offset, 0).astype(store.dtype)
        pairs += face_pairs(store, core, labels)
        store[core] = labels
        offset += count
    return store, joined_ids(np.concatenate(sizes), pairs, method.min_seed)


def face_pairs(store: np.memmap, core: Box, labels: np.ndarray) -> list[np.ndarray]:
    """(2, n) id pairs touching across the block's lower faces, whose neighbours are stored already."""
    pairs = []
    for axis in range(3):
        if core[axis].start == 0:
            continue
        face = list(core)
        face[axis] = slice(core[axis].start - 1, core[axis].start)
        before, after = np.asarray(store[tuple(face)]), np.take(labels, [0], axis=axis)
        touching = (before > 0) & (after > 0)
        pairs.append(np.stack([before[touching], after[touching]]).astype(np.int64))
    return pairs


def joined_ids(sizes: np.ndarray, pairs: list[np.ndarray], min_seed: int) -> np.ndarray:
    """Per block-part id (0: none), its global seed id: parts that touch are one seed, kept from
    `min_seed` voxels on."""
    edges = np.concatenate([np.zeros((2, 0), np.int64), *pairs], axis=1)
    graph = coo_matrix((np.ones(edges.shape[1], np.int8), (edges[0], edges[1])), shape=(sizes.size,) * 2)
    _, component = connected_components(graph, directed=False)
    kept = np.bincount(component, weights=sizes)[component] >= min_seed
    kept[0] = False
    return np.where(kept, component + 1, 0)


def flood_blocks(maps, shape, block, halo: int, seeds: np.memmap, ids: np.ndarray, store: np.memmap):
    """Pass 2: every block's watershed (from the global seeds, on the block and its halo) into
    `store`, and each seed id's smallest flat index in the volume (UNREACHED where none)."""
    first = np.full(int(ids.max()) + 1, UNREACHED, np.int64)
    for core in grid(shape, block):
        box, inner = grown(core, halo, shape)
        wall, foreground, _ = maps(box)
        markers = ids[np.asarray(seeds[box])]
        labels = watershed(seeded_elevation(wall, markers, box, shape), markers=markers, mask=foreground)[inner]
        store[core] = labels
        values, index = np.unique(labels, return_index=True)
        where = np.unravel_index(index, labels.shape)
        flat = np.ravel_multi_index(tuple(w + c.start for w, c in zip(where, core)), shape)
        np.minimum.at(first, values, flat)
    first[0] = UNREACHED  # 0 is no object; raster_numbers keeps it 0 anyway
    return store, first
