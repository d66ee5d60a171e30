"""Which slice to annotate next: rank the slices not yet annotated by what painting them would fix.

Every strategy scores each candidate slice (any axis) from the current network's class
probabilities and the mask of annotated voxels; the highest score is suggested first. A slice
counts as annotated from ANNOTATED_SLICE_SHARE of its voxels on, so strokes leave a slice a
candidate while a fully painted plane does not come back. The strategies (measured against evenly
spaced and random slices in benchmarks/bench_suggest.py, docs/suggest.md):

- "errors": the expected number of wrong voxels in the slice's unannotated part, the sum of
  1 - max probability: what painting the slice corrects directly, larger slices counting more.
- "uncertainty": the mean normalized entropy of the slice's unannotated voxels.
- "spread" (the default): "errors" damped near annotated slices of the same axis, so that
  neighbours of a painted slice, which teach the network little new, wait their turn; the
  volume's outermost slices (index 0 and n-1 of each axis) come after all others (BORDER_LAST).
- "balanced": "errors" with each voxel weighted by 1/sqrt(frequency) of its predicted class, so
  that mistakes on a rare class weigh more than mistakes on the background.
- "sampled": a slice drawn at random with probability proportional to its "errors" score, which
  keeps successive suggestions apart without a distance rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unet3d.errors import UserError
from unet3d.inference.predictor import normalized_entropy

ANNOTATED_SLICE_SHARE = 0.5  # a slice with at least this share of annotated voxels is not suggested again
STRATEGIES = ("errors", "uncertainty", "spread", "balanced", "sampled")
DEFAULT_STRATEGY = "spread"  # chosen on three volumes, checked on five others (docs/suggest.md)
AXIS_NAMES = "zyx"
BORDER_LAST = ("spread",)  # strategies ranking the outermost slices last: painting them helped no more (docs/suggest.md)


@dataclass(frozen=True)
class Suggestion:
    axis: int  # 0 z, 1 y, 2 x
    index: int
    score: float

    def describe(self) -> str:
        return f"{AXIS_NAMES[self.axis]}={self.index} (score {self.score:.4g})"


def rank_slices(probabilities: np.ndarray, annotated: np.ndarray, *, strategy: str = DEFAULT_STRATEGY,
                axes=(0, 1, 2), count: int | None = None, rng: np.random.Generator | None = None,
                border_last: bool | None = None) -> list[Suggestion]:
    """The candidate slices along `axes`, best first (at most `count`), scored by `strategy` from
    the network's probabilities (K, Z, Y, X) and the boolean mask of annotated voxels (Z, Y, X).
    border_last: the outermost slices of each axis after every other one (default: for the
    strategies in BORDER_LAST)."""
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    if probabilities.shape[1:] != annotated.shape:
        raise UserError(f"the probabilities cover {probabilities.shape[1:]} voxels, the annotation {annotated.shape}")
    if not annotated.any():
        raise UserError("no voxel is annotated: annotate at least a few voxels of each class first")
    voxel_scores = _voxel_scores(probabilities, strategy)
    open_slices = candidate_slices(annotated, axes)
    scores = {}
    for axis in {axis for axis, _ in open_slices}:
        scores[axis] = _slice_sums(voxel_scores, annotated, axis, mean=strategy == "uncertainty")
        if strategy == "spread":
            scores[axis] = scores[axis] * _distance_damping(annotated, axis)
    candidates = [Suggestion(axis, index, float(scores[axis][index])) for axis, index in open_slices]
    if not candidates:
        raise UserError("every slice along the chosen axes is already annotated")
    if strategy == "sampled":
        ranked = _draw_in_order(candidates, rng or np.random.default_rng(), count)
    else:
        ranked = sorted(candidates, key=lambda s: -s.score)
    if border_last is None:
        border_last = strategy in BORDER_LAST
    if border_last:
        ranked = sorted(ranked, key=lambda s: is_outermost(s, annotated.shape))  # stable: order kept otherwise
    return ranked[:count]


def is_outermost(suggestion: Suggestion, shape: tuple[int, ...]) -> bool:
    """Whether the slice is the first or last of its axis."""
    return suggestion.index in (0, shape[suggestion.axis] - 1)


def _voxel_scores(probabilities: np.ndarray, strategy: str) -> np.ndarray:
    """Per-voxel score: entropy for "uncertainty", otherwise the chance of a wrong argmax."""
    if strategy == "uncertainty":
        return normalized_entropy(probabilities)
    wrong = 1.0 - probabilities.max(axis=0)
    if strategy != "balanced":
        return wrong
    predicted = probabilities.argmax(axis=0)
    frequency = np.bincount(predicted.ravel(), minlength=probabilities.shape[0]) / predicted.size
    weights = 1.0 / np.sqrt(np.maximum(frequency, 1.0 / predicted.size))
    return wrong * (weights / weights.min())[predicted]


def annotated_share(annotated: np.ndarray, axis: int) -> np.ndarray:
    """Per slice along `axis`: the share of its voxels that are annotated."""
    return annotated.mean(axis=tuple(a for a in range(3) if a != axis))


def candidate_slices(annotated: np.ndarray, axes=(0, 1, 2)) -> list[tuple[int, int]]:
    """(axis, index) of the slices along `axes` that count as not yet annotated."""
    return [(axis, int(i)) for axis in axes
            for i in np.flatnonzero(annotated_share(annotated, axis) < ANNOTATED_SLICE_SHARE)]


def _slice_sums(voxel_scores: np.ndarray, annotated: np.ndarray, axis: int, mean: bool) -> np.ndarray:
    """Per slice along `axis`: the sum (or mean) of the scores of its unannotated voxels."""
    others = tuple(a for a in range(3) if a != axis)
    sums = np.where(annotated, 0, voxel_scores).sum(axis=others)
    return sums / np.maximum((~annotated).sum(axis=others), 1) if mean else sums


def _distance_damping(annotated: np.ndarray, axis: int) -> np.ndarray:
    """Per slice: min(1, distance to the nearest annotated slice of this axis / the spacing that
    evenly spaced slices would have), 1 everywhere when none of this axis is annotated."""
    n = annotated.shape[axis]
    painted = np.flatnonzero(annotated_share(annotated, axis) >= ANNOTATED_SLICE_SHARE)
    if painted.size == 0:
        return np.ones(n)
    distance = np.abs(np.arange(n)[:, None] - painted[None, :]).min(axis=1)
    return np.minimum(1.0, distance / (n / (painted.size + 1)))


def _draw_in_order(candidates: list[Suggestion], rng: np.random.Generator, count: int | None) -> list[Suggestion]:
    """Candidates drawn without replacement with probability proportional to their score."""
    scores = np.array([max(c.score, 0.0) for c in candidates]) + 1e-12
    order = rng.choice(len(candidates), size=min(count or len(candidates), len(candidates)), replace=False,
                       p=scores / scores.sum())
    return [candidates[i] for i in order]
