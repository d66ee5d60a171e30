"""The compared methods, each trained on sparse labels of some volumes and segmenting others.

unet3d        what `unet3d train` plans for these volumes and this budget (unet3d.workflows.plan:
              normalization, inputs, held-out validation volumes, densify's recipe): 3D U-Net with
              batch norm
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

from harness import IGNORE
from harness.volumes import Volume
from unet3d.baselines import random_forest_segment
from unet3d.data.features import filter_features
from unet3d.baselines.forest import make_forest, predict_probabilities
from unet3d.data.labels import decode_labels, encode_labels, present_values
from unet3d.data.normalization import apply_normalization, fit_normalization
from unet3d.inference.predictor import predict_image
from unet3d.model.serialization import load_model
from unet3d.training import train
from unet3d.workflows.plan import Fingerprint, plan_training, training_sets

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
            seconds: float | None, steps: int | None, seed: int, workdir: Path) -> Segmentation:
    """Train `method` on the annotated voxels of `sparse` (IGNORE elsewhere) for `steps` steps or
    `seconds` (networks), segment `test_volumes`."""
    if method == "forest":
        return _forest(train_volumes, sparse, test_volumes, seed)
    if method in UNET_METHODS:
        return _unet(method, train_volumes, sparse, test_volumes, seconds, steps, seed, Path(workdir))
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


def _unet(method, train_volumes, sparse, test_volumes, seconds, steps, seed, workdir: Path) -> Segmentation:
    """`unet3d train`'s plan for these volumes (the variant's network), its best model on the held-out
    volumes where the plan holds some out, predicting as `unet3d predict` does."""
    images, names, spacing = [v.image for v in train_volumes], [v.name for v in train_volumes], train_volumes[0].spacing
    plan = plan_training(Fingerprint.of(images, sparse, IGNORE, spacing, names), max_time=seconds, iterations=steps,
                         validation_given=False, seed=seed, source=names[0])
    data, validation = training_sets(images, sparse, IGNORE, names, held_out=plan.validation_volumes,
                                     features=plan.input_features, per_volume=plan.per_volume, spacing=spacing,
                                     class_values=annotated_classes(sparse))
    config = _network_variant(plan.config(data, seed), method)
    output = workdir / "model.safetensors"
    result = train(config, data, output, validation=validation, progress=False)
    best = output.with_name("model.best.safetensors")
    model, info = load_model(best if best.exists() else output)
    start = time.perf_counter()
    labels = [decode_labels(predict_image(model, info, volume.image).argmax(0), data.class_values) for volume in test_volumes]
    return Segmentation(labels, data.class_values, result.iterations, result.seconds, time.perf_counter() - start)


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


def _standardized(volume: Volume) -> np.ndarray:
    """The image standardized on its own statistics: scans whose intensity scales differ (MRI) give
    the forest comparable filter responses, as they give the network (`unet3d train`'s plan)."""
    return apply_normalization(volume.image, fit_normalization([volume.image]))


def _forest_across_volumes(train_volumes, sparse, test_volumes, classes, seed) -> Segmentation:
    """ilastik's recipe over several volumes: filter features of each volume standardized on its own,
    a forest fitted on sampled annotated voxels."""
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
    labels = [decode_labels(_forest_predict(forest, v, len(classes)), classes) for v in test_volumes]
    return Segmentation(labels, classes, None, seconds_train, time.perf_counter() - start)


def _forest_predict(forest, volume: Volume, num_classes: int) -> np.ndarray:
    """Most probable class index per voxel of a test volume."""
    features = filter_features(_standardized(volume), spacing=volume.spacing).reshape(-1, volume.truth.size)
    return predict_probabilities(forest, features, num_classes).argmax(0).reshape(volume.truth.shape)
