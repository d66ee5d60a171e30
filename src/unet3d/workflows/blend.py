"""Combining the network's and the forest's probabilities, and choosing how from held-out annotation.

The two models err in different places, and which of them deserves more trust depends on the
volume: on small volumes the network learns shapes the forest cannot see, on volumes of millions
of voxels a network trained for minutes can trail the forest (whose filters give it many scales
of context at almost no cost). A fixed rule cannot know which case it is in. Annotated voxels
that neither model trained on can: densify keeps some annotated blocks out of both models'
training (`hold_out_blocks`) and weighs the two by what scores best there (`choose_network_weight`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unet3d.data.labels import UNLABELED
from unet3d.evaluation.metrics import confusion_matrix, scores

# A model's probability floor in the blend: one model's zero lowers a class, never vetoes it.
BLEND_FLOOR = 1e-4
# The network's weights tried in the weighted geometric mean (0: the forest alone, 1: the network alone).
NETWORK_WEIGHTS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))
# Weights scoring within this of the best on the held-out voxels count as tied; the one closest
# to the plain geometric mean (0.5) wins, so a small validation set does not swing the blend.
WEIGHT_TIE = 0.002


def weighted_geometric_mean(network: np.ndarray, forest: np.ndarray, network_weight: float = 0.5,
                            floor: float = BLEND_FLOOR) -> np.ndarray:
    """Normalized weighted geometric mean of two (K, ...) probability maps: a class wins where both
    models find it likely, and a confident model outvotes an unsure one. Weight 0.5 is the plain
    geometric mean; 0 and 1 give one model alone (up to the floor)."""
    blended = np.power(network + floor, network_weight, dtype=np.float32)
    blended *= np.power(forest + floor, 1.0 - network_weight, dtype=np.float32)
    blended /= blended.sum(axis=0, keepdims=True)
    return blended


def geometric_mean(first: np.ndarray, second: np.ndarray, floor: float = BLEND_FLOOR) -> np.ndarray:
    """The plain (equal-weight) normalized geometric mean of two (K, ...) probability maps."""
    return weighted_geometric_mean(first, second, 0.5, floor)


@dataclass
class HeldOut:
    """Annotated voxels kept out of training, to decide the blend on."""
    voxels: np.ndarray  # flat indices into the (Z, Y, X) volume
    classes: np.ndarray  # their class indices

    def __len__(self) -> int:
        return int(self.voxels.size)


def hold_out_blocks(labels: np.ndarray, share: float, block: tuple[int, int, int], seed: int,
                    max_class_share: float = 0.2) -> HeldOut:
    """Move about `share` of the annotated voxels of (Z, Y, X) class indices `labels` (-1 unlabeled)
    into a held-out set, in whole blocks of `block` voxels, and mark them unlabeled in `labels`.

    Whole blocks, because an annotated voxel's neighbours on the same slice are nearly the same
    sample: scored on them, the forest would look almost perfect. Blocks are drawn in a seeded
    random order and skipped when they would take more than `max_class_share` of a class's
    annotated voxels, so every class keeps most of its training voxels.
    """
    flat = labels.reshape(-1)
    annotated = np.flatnonzero(flat != UNLABELED)
    num_classes = int(flat.max()) + 1 if annotated.size else 0
    blocks, inverse = np.unique(block_ids(annotated, labels.shape, block), return_inverse=True)
    per_block = np.zeros((blocks.size, num_classes), dtype=np.int64)
    np.add.at(per_block, (inverse, flat[annotated]), 1)
    allowance = np.floor(max_class_share * per_block.sum(axis=0)).astype(np.int64)
    target, taken = share * annotated.size, np.zeros(num_classes, dtype=np.int64)
    chosen = np.zeros(blocks.size, dtype=bool)
    for index in np.random.default_rng(seed).permutation(blocks.size):
        if taken.sum() >= target:
            break
        if np.all(taken + per_block[index] <= allowance):
            chosen[index] = True
            taken += per_block[index]
    voxels = annotated[chosen[inverse]]
    held = HeldOut(voxels, flat[voxels].copy())
    flat[voxels] = UNLABELED
    return held


def block_ids(voxels: np.ndarray, shape, block) -> np.ndarray:
    """The block number of each flat voxel index, blocks of `block` voxels tiling `shape`."""
    coordinates = np.unravel_index(voxels, shape)
    counts = [-(-n // b) for n, b in zip(shape, block)]
    return np.ravel_multi_index(tuple(c // b for c, b in zip(coordinates, block)), counts)


def held_out_iou(probabilities: np.ndarray, held: HeldOut) -> float:
    """Mean IoU of a (K, Z, Y, X) probability map over the classes found or predicted on the held-out voxels."""
    return _mean_iou(_at(probabilities, held), held.classes)


def _at(probabilities: np.ndarray, held: HeldOut) -> np.ndarray:
    """(K, N) probabilities of the N held-out voxels."""
    return probabilities.reshape(probabilities.shape[0], -1)[:, held.voxels]


def _mean_iou(probabilities: np.ndarray, classes: np.ndarray) -> float:
    """Mean IoU of the most probable class of (K, N) probabilities against N class indices."""
    confusion = confusion_matrix(probabilities.argmax(axis=0), classes, probabilities.shape[0])
    return scores(confusion, background=None)["mean_iou"]


@dataclass
class BlendChoice:
    network_weight: float
    scores: dict[float, float]  # held-out mean IoU of every weight tried

    def describe(self, voxels: int) -> str:
        at = lambda w: self.scores[w]  # noqa: E731
        return (f"network weight {self.network_weight:.1f} in the geometric mean, chosen on {voxels:,} held-out "
                f"annotated voxels (mean IoU there: forest alone {at(0.0):.3f}, network alone {at(1.0):.3f}, "
                f"equal weights {at(0.5):.3f}, chosen {at(self.network_weight):.3f})")


def choose_network_weight(network: np.ndarray, forest: np.ndarray, held: HeldOut, ties_to: float = 0.5) -> BlendChoice:
    """The network's weight in the geometric mean that scores best on the held-out voxels (ties:
    the one closest to `ties_to`, equal weights unless the caller trusts one model more)."""
    network_held, forest_held = _at(network, held), _at(forest, held)
    tried = {float(w): _mean_iou(weighted_geometric_mean(network_held, forest_held, w), held.classes)
             for w in NETWORK_WEIGHTS}
    best = max(tried.values())
    tied = [w for w, s in tried.items() if s >= best - WEIGHT_TIE]
    return BlendChoice(min(tied, key=lambda w: abs(w - ties_to)), tried)
