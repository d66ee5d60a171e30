"""Weighing the network against the forest on annotated voxels that neither model trained on."""

from __future__ import annotations

import numpy as np

from unet3d.workflows.blend import (
    HeldOut,
    choose_network_weight,
    geometric_mean,
    held_out_iou,
    hold_out_blocks,
    weighted_geometric_mean,
)


def painted_slices(shape=(20, 64, 64), classes=3, seed=0) -> np.ndarray:
    """Class indices on two z-slices and one y-slice, -1 elsewhere."""
    rng = np.random.default_rng(seed)
    labels = np.full(shape, -1, np.int64)
    for z in (5, 14):
        labels[z] = rng.integers(0, classes, shape[1:])
    labels[:, 30] = rng.integers(0, classes, (shape[0], shape[2]))
    return labels


def test_held_out_blocks_are_whole_blocks_of_annotated_voxels_removed_from_training():
    labels = painted_slices()
    before = labels.copy()
    held = hold_out_blocks(labels, share=0.1, block=(4, 16, 16), seed=3)
    annotated = np.count_nonzero(before >= 0)
    assert 0.1 * annotated <= len(held) <= 0.2 * annotated
    assert np.all(labels.reshape(-1)[held.voxels] == -1)  # out of training
    assert np.array_equal(before.reshape(-1)[held.voxels], held.classes)  # with their true classes
    assert np.count_nonzero(labels >= 0) == annotated - len(held)
    # Whole blocks: every annotated voxel of a block that lost one is held out.
    z, y, x = np.unravel_index(held.voxels, labels.shape)
    for block in {(a // 4, b // 16, c // 16) for a, b, c in zip(z, y, x)}:
        region = tuple(slice(i * n, (i + 1) * n) for i, n in zip(block, (4, 16, 16)))
        assert np.all(labels[region] == -1)
    # Seeded: the same seed holds out the same voxels.
    again = hold_out_blocks(before.copy(), share=0.1, block=(4, 16, 16), seed=3)
    assert np.array_equal(again.voxels, held.voxels)


def test_no_class_loses_more_than_its_allowance():
    labels = painted_slices(classes=2)
    labels[labels == 1] = 0
    labels[5, :8, :8] = 1  # a rare class in a single block
    held = hold_out_blocks(labels, share=0.5, block=(4, 16, 16), seed=0, max_class_share=0.2)
    assert np.count_nonzero(held.classes == 1) == 0 and np.count_nonzero(labels == 1) == 64


def test_weighted_geometric_mean_spans_the_forest_the_blend_and_the_network():
    rng = np.random.default_rng(0)
    network, forest = (p / p.sum(0) for p in rng.random((2, 3, 50)).astype(np.float32))
    assert np.allclose(weighted_geometric_mean(network, forest, 0.5), geometric_mean(network, forest), atol=1e-6)
    assert np.array_equal(weighted_geometric_mean(network, forest, 1.0).argmax(0), network.argmax(0))
    assert np.array_equal(weighted_geometric_mean(network, forest, 0.0).argmax(0), forest.argmax(0))
    assert np.allclose(weighted_geometric_mean(network, forest, 0.3).sum(0), 1)


def one_hot(classes: np.ndarray, k: int, sure: float) -> np.ndarray:
    return np.where(np.eye(k, dtype=bool)[:, classes], sure, (1 - sure) / (k - 1)).astype(np.float32)


def test_the_weight_follows_the_model_that_is_right_on_the_held_out_voxels():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 3, (1, 40, 40))
    wrong = (truth + 1) % 3
    noisy = np.where(rng.random(truth.shape) < 0.3, wrong, truth)
    held = HeldOut(np.arange(truth.size), truth.reshape(-1))
    good, poor = one_hot(truth, 3, 0.6), one_hot(noisy, 3, 0.9)
    assert held_out_iou(good, held) == 1.0
    # The forest right, the network confidently wrong on 30 %: the forest gets the weight.
    choice = choose_network_weight(poor, good, held)
    assert choice.network_weight < 0.5 and choice.scores[0.0] == 1.0 and choice.scores[1.0] < 0.7
    assert choose_network_weight(good, poor, held).network_weight > 0.5
    # Both equally right: every weight ties and the plain geometric mean is kept.
    assert choose_network_weight(good, good, held).network_weight == 0.5
    assert "held-out annotated voxels" in choice.describe(len(held))
