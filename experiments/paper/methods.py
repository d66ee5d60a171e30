"""The compared methods, each trained on sparse labels of some volumes and segmenting others.

unet3d        the densify recipe (unet3d.workflows.densify.default_config): 3D U-Net with batch norm
unet3d_nobn   the same network without normalization (the paper's "3D w/o BN")
unet2d        the same recipe with 2D convolutions, applied to every z-slice independently (the
              paper's "2D with BN"); it learns from every annotated voxel, i.e. from whole annotated
              xy-planes and from the lines where annotated xz- and yz-planes cross each z-slice
forest        random forest on ilastik's filter bank (unet3d.baselines), the tool biologists use
unet3d_dense  unet3d trained with every voxel of the training volumes labeled: the upper bound

Class values are those present in the annotation: a class nobody painted cannot be learned (the
ovule's few background voxels are often on no annotated slice).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from experiments.paper.data import Volume
from unet3d.baselines import random_forest_segment
from unet3d.data.features import filter_features
from unet3d.baselines.forest import make_forest, predict_probabilities
from unet3d.data.labels import decode_labels, encode_labels, present_values
from unet3d.data.normalization import apply_normalization
from unet3d.inference import predict_array
from unet3d.training import train
from unet3d.training.dataset import prepare_training_set
from unet3d.workflows.densify import default_config

IGNORE = 255
UNET_METHODS = ("unet3d", "unet3d_nobn", "unet2d", "unet3d_dense")
METHODS = ("unet3d", "unet3d_nobn", "unet2d", "forest", "unet3d_dense")
FOREST_TREES = 100
FOREST_TRAIN_VOXELS = 100_000  # random sample of the annotated voxels (fit time grows fast with it)


@dataclasses.dataclass
class Segmentation:
    labels: list[np.ndarray]  # one (Z, Y, X) class-value volume per test volume
    class_values: list[int]
    iterations: int | None  # training steps (networks only)
    seconds_train: float
    seconds_predict: float


def annotated_classes(sparse: list[np.ndarray]) -> list[int]:
    values = np.unique(np.concatenate([present_values(s) for s in sparse]))
    return [int(v) for v in values if v != IGNORE]


def segment(method: str, train_volumes: list[Volume], sparse: list[np.ndarray], test_volumes: list[Volume],
            budget: float, seed: int, workdir: Path) -> Segmentation:
    """Train `method` on the annotated voxels of `sparse` (IGNORE elsewhere), segment `test_volumes`."""
    if method == "forest":
        return _forest(train_volumes, sparse, test_volumes, seed)
    if method in UNET_METHODS:
        return _unet(method, train_volumes, sparse, test_volumes, budget, seed, workdir)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _network_variant(config, method: str):
    """The densify recipe, with the normalization or the convolutions the method compares."""
    if method == "unet3d_nobn":
        return dataclasses.replace(config, network=dataclasses.replace(config.network, norm="none"))
    if method == "unet2d":
        network = dataclasses.replace(config.network, dims=2)
        # Same output patch; a 2D net needs no context along z, so its input is only grown in-plane.
        geometry = config.network.geometry  # patches of small volumes are cut to the volume, maybe to no valid size
        output = geometry.output_shape(geometry.valid_input_shape(config.patch_shape))
        return dataclasses.replace(config, network=network, patch_shape=network.geometry.input_shape_for_output(output))
    return config


def _unet(method, train_volumes, sparse, test_volumes, budget, seed, workdir) -> Segmentation:
    classes = annotated_classes(sparse)
    data = prepare_training_set([v.image for v in train_volumes], sparse, IGNORE, sources=[v.name for v in train_volumes],
                                class_values=classes, spacing=train_volumes[0].spacing)
    config = _network_variant(default_config(data, max_time=budget, seed=seed), method)
    result = train(config, data, Path(workdir) / "model.safetensors", progress=False)
    start = time.perf_counter()
    labels = []
    for volume in test_volumes:
        image = apply_normalization(volume.image, data.normalization)
        labels.append(decode_labels(predict_array(result.model, image).argmax(0), classes))
    return Segmentation(labels, classes, result.iterations, result.seconds, time.perf_counter() - start)


def _forest(train_volumes, sparse, test_volumes, seed) -> Segmentation:
    classes = annotated_classes(sparse)
    if len(train_volumes) == 1 and test_volumes == train_volumes:
        volume = train_volumes[0]
        encoded = encode_labels(sparse[0], classes, IGNORE, volume.name)
        result = random_forest_segment(volume.image, encoded, n_trees=FOREST_TREES, seed=seed, spacing=volume.spacing,
                                       max_train_voxels=FOREST_TRAIN_VOXELS)
        return Segmentation([decode_labels(result.labels, classes)], classes, None,
                            result.seconds_features + result.seconds_fit, result.seconds_predict)
    return _forest_across_volumes(train_volumes, sparse, test_volumes, classes, seed)


def _forest_across_volumes(train_volumes, sparse, test_volumes, classes, seed) -> Segmentation:
    """ilastik's recipe over several volumes: filter features, a forest fitted on sampled annotated voxels."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    samples, targets = [], []
    for volume, labels in zip(train_volumes, sparse):
        features = filter_features(volume.image, spacing=volume.spacing).reshape(-1, labels.size)
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
    labels = [decode_labels(_forest_predict(forest, v, len(classes)), classes) for v in test_volumes]
    return Segmentation(labels, classes, None, seconds_train, time.perf_counter() - start)


def _forest_predict(forest, volume: Volume, num_classes: int) -> np.ndarray:
    """Most probable class index per voxel of a test volume."""
    features = filter_features(volume.image, spacing=volume.spacing).reshape(-1, volume.truth.size)
    return predict_probabilities(forest, features, num_classes).argmax(0).reshape(volume.truth.shape)
