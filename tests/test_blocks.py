"""The blockwise route's training set: blocks around the annotation, with the whole volume's bank."""

import numpy as np

from unet3d.data.features import filter_features, input_feature_spec
from unet3d.data.labels import UNLABELED
from unet3d.data.normalization import apply_normalization
from unet3d.workflows import blocks as module
from unet3d.workflows.blocks import make_training_blocks


def volume(shape=(24, 64, 64), seed=0):
    rng = np.random.default_rng(seed)
    truth = (rng.random(shape) < 0.3).astype(np.int8)
    image = (100 + 50 * truth + rng.normal(0, 10, shape)).astype(np.float32)[None]
    labels = np.full(shape, UNLABELED, np.int8)
    labels[12], labels[:, 30] = truth[12], truth[:, 30]  # one z and one y slice annotated
    return image, labels


def test_blocks_hold_the_whole_volumes_bank_and_labels_only_around_their_centre():
    image, labels = volume()
    spec = input_feature_spec(None, scales=(0.7, 1.6))
    patch = (8, 16, 16)
    whole = np.concatenate([image, filter_features(image, spec["scales"], spec["spacing"])])
    block_bytes = 2 * whole.shape[0] * 16 * 32 * 32  # float16, twice the patch
    made = make_training_blocks(image, labels, [0, 1], 255, patch, features=spec, forest_bank=spec, spacing=None,
                                max_memory=12 * block_bytes / module.MEMORY_SHARE, seed=0)
    assert len(made.boxes) == 12  # what the memory budget allows
    for box, block, target in zip(made.boxes, made.data.images, made.data.labels):
        assert all(b.stop - b.start <= 2 * p for b, p in zip(box, patch)) and block.dtype.is_floating_point
        expected = apply_normalization(whole[(slice(None),) + box], made.data.normalization)
        np.testing.assert_allclose(block.float().numpy(), expected, atol=0.01, rtol=0.002)  # float16 storage
        kept = target.numpy() != UNLABELED
        assert kept.any() and np.array_equal(target.numpy()[kept], labels[box][kept])
        extent = [np.flatnonzero(kept.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
        assert all(e.max() - e.min() < p for e, p in zip(extent, patch))  # only a patch-sized box keeps labels
    # The forest's sample is the whole volume's bank at annotated voxels of the blocks.
    assert made.forest_features.shape[0] == whole.shape[0] - 1 and made.forest_classes.size > 100
    columns = whole[1:].reshape(whole.shape[0] - 1, -1).T
    for feature in made.forest_features.T[:20]:
        assert np.isclose(columns, feature, rtol=1e-5, atol=1e-4).all(axis=1).any()
    assert made.data.class_values == [0, 1] and made.annotated > 1000


def test_a_small_budget_still_makes_enough_blocks_and_the_draw_is_seeded():
    image, labels = volume()
    kwargs = dict(features=None, forest_bank=None, spacing=None, max_memory=1, seed=3)
    first = make_training_blocks(image, labels, [0, 1], 255, (8, 16, 16), **kwargs)
    again = make_training_blocks(image, labels, [0, 1], 255, (8, 16, 16), **kwargs)
    assert len(first.boxes) == module.MIN_BLOCKS and first.boxes == again.boxes
    assert first.data.channels == 1 and first.forest_classes.size == 0


def test_the_forests_sample_without_bank_inputs_equals_the_one_taken_from_them():
    """The loop's network takes no bank: its blocks' forest sample is made on the box the sampled
    voxels span, and must be the same voxels and values as when the blocks hold the bank."""
    image, labels = volume()
    spec = input_feature_spec(None, scales=(0.7, 1.6))
    kwargs = dict(forest_bank=spec, spacing=None, max_memory=1, seed=5)
    with_bank = make_training_blocks(image, labels, [0, 1], 255, (8, 16, 16), features=spec, **kwargs)
    without = make_training_blocks(image, labels, [0, 1], 255, (8, 16, 16), features=None, **kwargs)
    assert with_bank.boxes == without.boxes and without.forest_classes.size > 100
    np.testing.assert_array_equal(without.forest_classes, with_bank.forest_classes)
    np.testing.assert_allclose(without.forest_features, with_bank.forest_features, rtol=1e-5, atol=1e-5)
