"""Simulated sparse annotation: keep a few orthogonal slices of a dense ground truth.

This is the paper's protocol for studying learning from sparse annotation: keep A slices
perpendicular to axis 0 (Z: xy-planes), B perpendicular to axis 1 (Y: xz-planes) and C
perpendicular to axis 2 (X: yz-planes), mark every other voxel with the ignore label, train on
that and measure IoU on the voxels not kept.

Slice positions: along an axis of length n, k slices lie at round((i + 1) · n / (k + 1)) for
i = 0 … k−1, evenly spread and away from the borders. Halves are rounded up — floor(x + 0.5),
computed exactly in integers — not to the even neighbour as Python's round() would, so that
k = 1 on an axis of 61 voxels gives 31 (30.5 rounded up) everywhere this rule is quoted.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from unet3d.errors import UserError


def slice_positions(n: int, k: int) -> list[int]:
    """Evenly spread positions floor((i + 1) · n / (k + 1) + 0.5), i = 0 … k−1."""
    if not 0 <= k < n:  # k < n keeps the spacing n/(k+1) ≥ 1: distinct positions in 1..n-1
        raise ValueError(f"cannot spread {k} slices evenly along an axis of {n} voxels (0 to {n - 1} possible)")
    return [(2 * (i + 1) * n + k + 1) // (2 * (k + 1)) for i in range(k)]


def random_positions(n: int, k: int, rng: np.random.Generator) -> list[int]:
    """k distinct positions drawn uniformly from 0 … n−1, sorted."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot choose {k} distinct slices along an axis of length {n}")
    return sorted(rng.choice(n, size=k, replace=False).tolist())


def positions_for(shape: Sequence[int], slices: Sequence[int], rng: np.random.Generator | None = None) -> list[list[int]]:
    """Slice positions per axis: the evenly spread rule, or random distinct positions with `rng`."""
    if len(slices) != len(shape):
        raise ValueError(f"expected {len(shape)} slice counts (one per axis), got {len(slices)}")
    if rng is None:
        return [slice_positions(n, k) for n, k in zip(shape, slices)]
    return [random_positions(n, k, rng) for n, k in zip(shape, slices)]


def sparsify(
    truth: np.ndarray,
    slices: Sequence[int] = (1, 1, 1),
    ignore_label: int = 0,
    positions: Sequence[Sequence[int]] | None = None,
    source: str = "truth",
) -> np.ndarray:
    """Keep the truth on the chosen slices (`positions` per axis, else the rule) and ignore_label elsewhere.

    The result has the smallest integer dtype that holds the truth's values and the ignore label
    (uint8 for a few classes), whatever integer type the truth was read as.
    """
    truth = np.asarray(truth)
    if truth.ndim != 3:
        raise UserError(f"{source}: expected a 3D label volume (Z, Y, X), got shape {truth.shape}")
    if np.any(truth == ignore_label):
        raise UserError(
            f"{source}: the ignore label {ignore_label} is a value of the ground truth, so kept and "
            "unlabeled voxels would be confused; choose an ignore label the truth does not use"
        )
    if positions is None:
        positions = positions_for(truth.shape, slices)
    for axis_positions, n in zip(positions, truth.shape):
        _check_positions(list(axis_positions), n)
    dtype = np.result_type(*(np.min_scalar_type(int(v)) for v in (truth.min(), truth.max(), ignore_label)))
    sparse = np.full(truth.shape, ignore_label, dtype=dtype)
    for axis, axis_positions in enumerate(positions):
        kept = (slice(None),) * axis + (list(axis_positions),)
        sparse[kept] = truth[kept]
    return sparse


def slices_for_fraction(shape: Sequence[int], fraction: float) -> tuple[int, ...]:
    """Slice counts per axis that label about `fraction` of the voxels, at least one per axis.

    Every axis gets about the same share p of its slices (k ≈ p·n, so the annotation is spread
    evenly in voxel space), p chosen so that the grid labels `fraction` once the one-slice minimum
    is accounted for; of the nearest integer counts the one closest to the target wins. Below the
    fraction of one slice per axis that is what you get; `grid_fraction` says what was achieved.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"the labeled fraction must lie strictly between 0 and 1, got {fraction}")
    low, high = 0.0, 1.0
    for _ in range(60):  # bisection: the labeled fraction grows with the share p
        share = (low + high) / 2
        low, high = (share, high) if grid_fraction(shape, _counts(shape, share)) < fraction else (low, share)
    choices = [{_clip(math.floor(k), n), _clip(math.ceil(k), n)} for k, n in zip(_counts(shape, high), shape)]
    return min(
        itertools.product(*choices),
        key=lambda slices: (abs(grid_fraction(shape, slices) - fraction), sum(slices)),
    )


def _counts(shape: Sequence[int], share: float) -> list[float]:
    """Slice counts share·n per axis, not below one slice (continuous, for the search)."""
    return [_clip(share * n, n) for n in shape]


def _clip(k: float, n: int) -> float:
    return min(max(k, min(1, n - 1)), n - 1)


def grid_fraction(shape: Sequence[int], slices: Sequence[int]) -> float:
    """Fraction of voxels on at least one of the kept slices: 1 − Π (1 − k/n), whatever the positions."""
    return 1 - math.prod(1 - k / n for n, k in zip(shape, slices))


def labeled_fraction(sparse: np.ndarray, ignore_label: int) -> float:
    """Fraction of voxels that carry a label other than the ignore label."""
    sparse = np.asarray(sparse)
    return np.count_nonzero(sparse != ignore_label) / sparse.size


def _check_positions(positions: list[int], n: int) -> None:
    if len(set(positions)) != len(positions) or any(not 0 <= p < n for p in positions):
        raise ValueError(f"slice positions {positions} are not distinct positions in 0..{n - 1}")
