"""The ilastik-style pixel classifier: a random forest on the filter bank, trained on sparse voxels.

This is what biologists use to densify a few painted slices, so it is the baseline unet3d's
densification has to beat. Like ilastik it trains only on the annotated voxels and predicts every
voxel; prediction runs in chunks so that memory stays at the feature stack plus one chunk.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.ensemble import RandomForestClassifier

from unet3d.baselines.features import DEFAULT_SCALES, filter_features

UNLABELED = -1
_PREDICT_CHUNK = 1 << 18  # voxels per predict_proba call


@dataclass
class ForestResult:
    labels: np.ndarray  # (Z, Y, X) int64 class indices, the most probable class per voxel
    probabilities: np.ndarray  # (K, Z, Y, X) float32; classes absent from the annotation get 0
    seconds_features: float
    seconds_fit: float
    seconds_predict: float


def random_forest_segment(
    image: np.ndarray,
    sparse: np.ndarray,
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
    n_trees: int = 100,
    seed: int = 0,
    spacing: Sequence[float] | None = None,
    max_train_voxels: int | None = None,
) -> ForestResult:
    """Segment a (C, Z, Y, X) image from sparse (Z, Y, X) labels: class indices 0..K-1, -1 unlabeled.

    `max_train_voxels` caps the training set with a seeded random sample of the annotated voxels
    (fit time grows faster than linearly with it); None trains on all of them, as ilastik does.
    """
    _check_inputs(image, sparse)
    num_classes = int(sparse.max()) + 1

    start = time.perf_counter()
    features = filter_features(image, scales, spacing).reshape(-1, sparse.size)
    seconds_features = time.perf_counter() - start

    start = time.perf_counter()
    labels = sparse.reshape(-1)
    forest = fit_forest(features, labels, np.flatnonzero(labels != UNLABELED), n_trees, seed, max_train_voxels)
    seconds_fit = time.perf_counter() - start

    start = time.perf_counter()
    probabilities = predict_probabilities(forest, features, num_classes).reshape((num_classes,) + sparse.shape)
    seconds_predict = time.perf_counter() - start

    labels = probabilities.argmax(axis=0).astype(np.int64)
    return ForestResult(labels, probabilities, seconds_features, seconds_fit, seconds_predict)


def _check_inputs(image: np.ndarray, sparse: np.ndarray) -> None:
    if image.ndim != 4:
        raise ValueError(f"image must be (C, Z, Y, X), got shape {image.shape}")
    if sparse.shape != image.shape[1:]:
        raise ValueError(f"sparse labels have shape {sparse.shape}, the image's volume is {image.shape[1:]}")
    if not np.issubdtype(sparse.dtype, np.integer) or sparse.min() < UNLABELED:
        raise ValueError(f"sparse labels must be integer class indices ≥ 0 or {UNLABELED} (unlabeled)")
    if sparse.max() < 0:
        raise ValueError("sparse labels annotate no voxel: nothing to train on")


def fit_forest(features: np.ndarray, labels: np.ndarray, voxels: np.ndarray, n_trees: int = 100, seed: int = 0,
               max_train_voxels: int | None = None) -> RandomForestClassifier:
    """A forest fitted on (F, N) features at the flat indices `voxels` of (N,) labels, at most
    `max_train_voxels` of them (a seeded sample)."""
    if max_train_voxels is not None and voxels.size > max_train_voxels:
        rng = np.random.default_rng(seed)
        voxels = np.sort(rng.choice(voxels, max_train_voxels, replace=False))
    forest = make_forest(n_trees, seed)
    forest.fit(features[:, voxels].T, labels[voxels])
    return forest


def make_forest(n_trees: int = 100, seed: int = 0) -> RandomForestClassifier:
    """ilastik's classifier: a random forest of `n_trees` trees on every core."""
    return RandomForestClassifier(n_estimators=n_trees, n_jobs=-1, random_state=seed)


def predict_probabilities(forest: RandomForestClassifier, features: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, N) probabilities, chunk by chunk; rows of classes the forest never saw stay 0."""
    probabilities = np.zeros((num_classes, features.shape[1]), dtype=np.float32)
    for start in range(0, features.shape[1], _PREDICT_CHUNK):
        chunk = np.ascontiguousarray(features[:, start : start + _PREDICT_CHUNK].T)
        probabilities[forest.classes_, start : start + chunk.shape[0]] = forest.predict_proba(chunk).T
    return probabilities
