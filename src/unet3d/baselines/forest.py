"""The ilastik-style pixel classifier: a random forest on the filter bank, trained on sparse voxels.

This is what biologists use to densify a few painted slices, so it is the baseline unet3d's
densification has to beat. Like ilastik it trains only on the annotated voxels and predicts every
voxel; prediction runs in chunks so that memory stays at the feature stack plus one chunk.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from unet3d.data.features import DEFAULT_SCALES, filter_features
from unet3d.data.labels import UNLABELED

if TYPE_CHECKING:
    from sklearn.ensemble import RandomForestClassifier

_PREDICT_CHUNK = 1 << 18  # voxels per predict_proba call
_TREES_PER_ROUND = 10  # trees added at a time when the forest grows within a time limit


@dataclass
class ForestResult:
    labels: np.ndarray  # (Z, Y, X) int64 class indices, the most probable class per voxel
    probabilities: np.ndarray  # (K, Z, Y, X) float32; classes absent from the annotation get 0
    seconds_features: float  # 0 when the features came precomputed
    seconds_fit: float
    seconds_predict: float
    trees: int
    forest: RandomForestClassifier | None = None  # the fitted forest, to store beside a network


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
    start = time.perf_counter()
    features = filter_features(image, scales, spacing)
    seconds_features = time.perf_counter() - start
    result = segment_features(features, sparse, n_trees=n_trees, seed=seed, max_train_voxels=max_train_voxels)
    return replace(result, seconds_features=seconds_features)


def segment_features(features: np.ndarray, sparse: np.ndarray, *, n_trees: int = 100, seed: int = 0,
                     max_train_voxels: int | None = None, n_jobs: int = -1, num_classes: int | None = None,
                     seconds: float | None = None, clock=time.monotonic) -> ForestResult:
    """The forest's segmentation from an (F, Z, Y, X) feature stack already computed (the filter bank
    densify also gives its network) and sparse (Z, Y, X) class indices, -1 unlabeled.

    `num_classes` (default: the largest annotated index + 1) sets the probabilities' rows;
    `seconds` limits the fit and the prediction together (`fit_forest`)."""
    num_classes = num_classes or int(sparse.max()) + 1
    flat = features.reshape(features.shape[0], -1)
    labels = sparse.reshape(-1)

    start = time.perf_counter()
    forest = fit_forest(flat, labels, np.flatnonzero(labels != UNLABELED), n_trees, seed, max_train_voxels, n_jobs,
                        seconds, clock)
    seconds_fit = time.perf_counter() - start

    start = time.perf_counter()
    probabilities = predict_probabilities(forest, flat, num_classes).reshape((num_classes,) + sparse.shape)
    seconds_predict = time.perf_counter() - start

    labels = probabilities.argmax(axis=0).astype(np.int64)
    return ForestResult(labels, probabilities, 0.0, seconds_fit, seconds_predict, forest.n_estimators, forest)


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
               max_train_voxels: int | None = None, n_jobs: int = -1, seconds: float | None = None,
               clock=time.monotonic, predict_voxels: int | None = None) -> RandomForestClassifier:
    """A forest fitted on (F, N) features at the flat indices `voxels` of (N,) labels, at most
    `max_train_voxels` of them (a seeded sample).

    With `seconds` (of `clock`), trees are added 10 at a time, up to `n_trees`, while the fit and the
    prediction of `predict_voxels` voxels (default all N; extrapolated from one chunk) stay within
    it; 10 trees at least. The trees are those a forest of their number fitted at once would have
    (same seed).
    """
    voxels = training_sample(voxels, max_train_voxels, seed)
    x, y = features[:, voxels].T, labels[voxels]
    if seconds is None:
        return make_forest(n_trees, seed, n_jobs).fit(x, y)
    start = clock()
    forest = make_forest(min(_TREES_PER_ROUND, n_trees), seed, n_jobs).set_params(warm_start=True).fit(x, y)
    predict_per_tree = (_prediction_seconds(forest, features, clock, predict_voxels or features.shape[1])
                        / forest.n_estimators)
    while forest.n_estimators < n_trees:
        fit_per_tree = (clock() - start) / forest.n_estimators
        grown = min(forest.n_estimators + _TREES_PER_ROUND, n_trees)
        if grown * (fit_per_tree + predict_per_tree) > seconds:
            break
        forest.set_params(n_estimators=grown).fit(x, y)
    return forest


def training_sample(voxels: np.ndarray, max_voxels: int | None, seed: int) -> np.ndarray:
    """The flat indices a forest is fitted on: all of `voxels`, or a seeded sample of max_voxels."""
    if max_voxels is None or voxels.size <= max_voxels:
        return voxels
    return np.sort(np.random.default_rng(seed).choice(voxels, max_voxels, replace=False))


def _prediction_seconds(forest: RandomForestClassifier, features: np.ndarray, clock, voxels: int) -> float:
    """Seconds `predict_probabilities` would take on `voxels` voxels, timed on one chunk of (F, N) `features`."""
    chunk = np.ascontiguousarray(features[:, :_PREDICT_CHUNK].T)
    start = clock()
    forest.predict_proba(chunk)
    return (clock() - start) * voxels / chunk.shape[0]


def make_forest(n_trees: int = 100, seed: int = 0, n_jobs: int = -1) -> RandomForestClassifier:
    """ilastik's classifier: a random forest of `n_trees` trees on `n_jobs` cores (-1: all).
    scikit-learn is imported here, not with the module: prediction alone never needs its second
    of import time and 75 MiB."""
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=n_trees, n_jobs=n_jobs, random_state=seed)


def predict_probabilities(forest: RandomForestClassifier, features: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, N) probabilities, chunk by chunk; rows of classes the forest never saw stay 0."""
    probabilities = np.zeros((num_classes, features.shape[1]), dtype=np.float32)
    for start in range(0, features.shape[1], _PREDICT_CHUNK):
        chunk = np.ascontiguousarray(features[:, start : start + _PREDICT_CHUNK].T)
        probabilities[forest.classes_, start : start + chunk.shape[0]] = forest.predict_proba(chunk).T
    return probabilities
