"""Synthetic cell-wall volumes: a prior for densify on tissue imaged by its cell walls, free of any licence.

Usage: .venv/bin/python -m experiments.ablation.synthetic_walls show FOLDER [COUNT] [SEED]
  writes COUNT volumes (default 2) as FOLDER/synthetic_NN_{image,labels}.tif to look at

Cells are the Voronoi regions of random seeds (the cell size varies per volume); a wall is a
thin bright sheet where two regions meet, blurred by an elongated point-spread function and
recorded with shot noise at low photon counts, as in a confocal stack of stained cell walls. The
labels follow the convention of the ovule data: 0 outside the tissue, 1 cell interior, 2 cell
wall, the wall being the voxels whose in-plane neighbour (along Y or X) lies in another cell.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.spatial import cKDTree

SHAPE = (64, 160, 160)


def cells(shape, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(cell id per voxel, 0 outside the tissue; distance to the nearest wall, in voxels)."""
    diameter = rng.uniform(22, 50)
    count = max(8, int(np.prod(shape) / (np.pi / 6 * diameter**3)))
    # Cells elongated or flattened along z, as tissue cut and imaged at another pitch.
    stretch = np.array([rng.uniform(0.7, 1.4), 1.0, 1.0])
    seeds = rng.uniform(0, 1, (count, 3)) * np.array(shape) * stretch
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    distance, nearest = cKDTree(seeds).query(grid * stretch, k=2)
    ids = nearest[:, 0].reshape(shape) + 1
    wall_distance = ((distance[:, 1] - distance[:, 0]) / 2).reshape(shape)
    inside = _tissue(shape, rng)
    ids[~inside] = 0
    return ids, wall_distance


def _tissue(shape, rng: np.random.Generator) -> np.ndarray:
    """A random smooth tissue outline: an ellipsoid that covers most of the volume."""
    centre = np.array(shape) * rng.uniform(0.35, 0.65, 3)
    radii = np.array(shape) * rng.uniform(0.55, 0.9, 3)
    axes = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((a - c) / r) ** 2 for a, c, r in zip(axes, centre, radii)) <= 1


def wall_labels(ids: np.ndarray) -> np.ndarray:
    """0 outside, 1 cell interior, 2 where an in-plane (Y or X) neighbour has another id."""
    wall = np.zeros(ids.shape, bool)
    for axis in (1, 2):
        differs = np.diff(ids, axis=axis) != 0
        wall[tuple(slice(1, None) if a == axis else slice(None) for a in range(3))] |= differs
        wall[tuple(slice(0, -1) if a == axis else slice(None) for a in range(3))] |= differs
    labels = np.where(ids > 0, 1, 0).astype(np.uint8)
    labels[wall] = 2
    return labels


def image_of(ids: np.ndarray, wall_distance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A confocal-like image: bright walls of uneven stain, dim textured interiors, blur, shot noise."""
    shape = ids.shape
    thickness = rng.uniform(0.5, 1.0)
    stain = np.exp(-0.5 * (wall_distance / thickness) ** 2)
    stain *= 0.4 + 1.2 * _smooth_noise(shape, rng.uniform(4, 12), rng)  # patchy staining along the walls
    interior = rng.uniform(0.1, 0.5) * (0.5 + _smooth_noise(shape, rng.uniform(2, 6), rng))
    signal = np.where(ids > 0, stain + interior, rng.uniform(0.0, 0.1))
    sigma = (rng.uniform(1.0, 2.5), rng.uniform(0.6, 1.2), rng.uniform(0.6, 1.2))
    signal = gaussian_filter(signal.astype(np.float32), sigma)
    signal *= 0.5 + _smooth_noise(shape, 40, rng)  # illumination falling off across the field
    photons = rng.uniform(20, 150)
    return (rng.poisson(np.clip(signal, 0, None) * photons) + rng.normal(2, 1, shape)).astype(np.float32)


def _smooth_noise(shape, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth random field in [0, 1] varying over about `scale` voxels."""
    field = gaussian_filter(rng.standard_normal(shape).astype(np.float32), scale)
    return (field - field.min()) / max(float(np.ptp(field)), 1e-6)


def synthetic_volume(seed: int, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """(image (1, Z, Y, X) float32, labels (Z, Y, X) uint8) of one synthetic stack."""
    rng = np.random.default_rng(seed)
    ids, wall_distance = cells(shape, rng)
    return image_of(ids, wall_distance, rng)[None], wall_labels(ids)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "show":
        sys.exit(__doc__)
    import tifffile

    folder = Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    first = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    for seed in range(first, first + (int(sys.argv[3]) if len(sys.argv) > 3 else 2)):
        image, labels = synthetic_volume(seed)
        tifffile.imwrite(folder / f"synthetic_{seed:02d}_image.tif", image[0])
        tifffile.imwrite(folder / f"synthetic_{seed:02d}_labels.tif", labels)
        print(seed, "walls", round(float((labels == 2).mean()), 3), "outside", round(float((labels == 0).mean()), 3),
              "image mean", round(float(image.mean()), 1))
