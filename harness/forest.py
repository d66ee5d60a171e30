"""ilastik's random forest as the peer every benchmark and experiment runs beside unet3d: 100 trees
on the 7-scale filter bank, fitted on a seeded sample of at most 100,000 annotated voxels."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from harness import IGNORE
from harness.volumes import Volume
from unet3d.baselines import random_forest_segment
from unet3d.baselines.forest import make_forest, predict_probabilities
from unet3d.data.features import filter_features
from unet3d.data.labels import decode_labels, encode_labels, present_values
from unet3d.data.normalization import apply_normalization, fit_normalization
from unet3d.workflows.forest import FOREST_TRAIN_VOXELS, FOREST_TREES


@dataclasses.dataclass
class Segmentation:
    labels: list[np.ndarray]  # one (Z, Y, X) class-value volume per test volume
    class_values: list[int]
    iterations: int | None  # training steps (networks only)
    seconds_train: float
    seconds_predict: float


def annotated_classes(sparse: list[np.ndarray]) -> list[int]:
    """The class values painted somewhere: a class nobody painted cannot be learned."""
    values = np.unique(np.concatenate([present_values(s) for s in sparse]))
    return [int(v) for v in values if v != IGNORE]


def segment(train_volumes: list[Volume], sparse: list[np.ndarray], test_volumes: list[Volume],
            seed: int) -> Segmentation:
    """The forest fitted on the annotated voxels of `sparse` (IGNORE elsewhere), segmenting
    `test_volumes`: one volume densified as ilastik does, or unseen volumes."""
    classes = annotated_classes(sparse)
    if len(train_volumes) == 1 and test_volumes == train_volumes:
        volume = train_volumes[0]
        encoded = encode_labels(sparse[0], classes, IGNORE, volume.name)
        result = random_forest_segment(volume.image, encoded, n_trees=FOREST_TREES, seed=seed, spacing=volume.spacing,
                                       max_train_voxels=FOREST_TRAIN_VOXELS)
        return Segmentation([decode_labels(result.labels, classes)], classes, None,
                            result.seconds_features + result.seconds_fit, result.seconds_predict)
    return _across_volumes(train_volumes, sparse, test_volumes, classes, seed)


def _standardized(volume: Volume) -> np.ndarray:
    """The image standardized on its own statistics: scans whose intensity scales differ (MRI) give
    the forest comparable filter responses, as they give the network (`unet3d train`'s plan)."""
    return apply_normalization(volume.image, fit_normalization([volume.image]))


def _across_volumes(train_volumes, sparse, test_volumes, classes, seed) -> Segmentation:
    """ilastik's recipe over several volumes: filter features of each volume standardized on its own,
    a forest fitted on annotated voxels sampled from each volume in proportion to its annotation."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    samples, targets = [], []
    for volume, labels in zip(train_volumes, sparse):
        features = filter_features(_standardized(volume), spacing=volume.spacing).reshape(-1, labels.size)
        encoded = encode_labels(labels, classes, IGNORE, volume.name).reshape(-1)
        annotated = np.flatnonzero(encoded >= 0)
        share = FOREST_TRAIN_VOXELS * annotated.size // sum(int((s != IGNORE).sum()) for s in sparse)
        if annotated.size > share:
            annotated = np.sort(rng.choice(annotated, share, replace=False))
        samples.append(features[:, annotated].T)
        targets.append(encoded[annotated])
    forest = make_forest(FOREST_TREES, seed)
    forest.fit(np.concatenate(samples), np.concatenate(targets))
    seconds_train = time.perf_counter() - start
    start = time.perf_counter()
    labels = [decode_labels(_most_probable(forest, v, len(classes)), classes) for v in test_volumes]
    return Segmentation(labels, classes, None, seconds_train, time.perf_counter() - start)


def _most_probable(forest, volume: Volume, num_classes: int) -> np.ndarray:
    """Most probable class index per voxel of a test volume."""
    features = filter_features(_standardized(volume), spacing=volume.spacing).reshape(-1, volume.truth.size)
    return predict_probabilities(forest, features, num_classes).argmax(0).reshape(volume.truth.shape)
