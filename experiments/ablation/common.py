"""Shared protocol of the densify ablation: volumes, the paper's slice rule, forest and U-Net runs.

Every run is scored the same way: keep k orthogonal slices per axis of the ground truth, train on
those voxels only, report IoU per class on all other voxels (mean over foreground classes).
Budgets and costs are CPU seconds of this process (all its threads), because the cores are
shared: wall seconds would mostly measure whoever else is running.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from harness import IGNORE, volumes
from unet3d.baselines import random_forest_segment
from unet3d.data.labels import decode_labels, encode_labels
from unet3d.data.sparse import sparsify
from unet3d.evaluation import evaluate_volumes
from unet3d.inference import predict_array
from unet3d.training import train
from unet3d.training.dataset import prepare_training_set
from unet3d.workflows.densify import default_config, densify

FOREST_TRAIN_VOXELS = 100_000  # as benchmarks/bench_forest.py


def load_volume(name: str) -> tuple[np.ndarray, np.ndarray, tuple | None]:
    """(image (1, Z, Y, X) float32, truth (Z, Y, X) int64, spacing or None) of a volume
    `harness.volumes.load` names; "em_vnc" is its first quarter (em_vnc_q0), as in the
    ablation's tables."""
    volume = volumes.load("em_vnc_q0" if name == "em_vnc" else name)
    return volume.image.astype(np.float32), volume.truth, volume.spacing


def hippocampus_cases(count: int) -> list[str]:
    """The first `count` hippocampus cases by file name."""
    images = sorted((volumes.shared_data() / "hippocampus" / "images").glob("*.nii.gz"))
    return [p.name.removesuffix(".nii.gz") for p in images[:count]]


def training_set(image, truth, slices, spacing, normalization: str = "zscore"):
    """(TrainingSet of the kept slices, sparse label volume with IGNORE elsewhere)."""
    sparse = sparsify(truth, slices, IGNORE)
    classes = sorted(int(v) for v in np.unique(truth))
    data = prepare_training_set([image], [sparse], IGNORE, class_values=classes, spacing=spacing,
                                normalization=normalization)
    return data, sparse


def score(prediction, truth, sparse) -> dict:
    scores = evaluate_volumes(prediction, truth, exclude=sparse, ignore_label=IGNORE)
    return {"foreground": scores["mean_iou_foreground"], "iou": {c["value"]: c["iou"] for c in scores["classes"]}}


class Cost:
    """CPU and wall seconds spent between construction and `stop()`."""

    def __init__(self):
        self.cpu, self.wall = time.process_time(), time.perf_counter()

    def stop(self) -> dict:
        return {"cpu": time.process_time() - self.cpu, "wall": time.perf_counter() - self.wall}


def run_forest(image, truth, slices, spacing, seed: int = 0) -> dict:
    """The ilastik-style random forest on the same slices: scores and CPU/wall cost."""
    sparse = sparsify(truth, slices, IGNORE)
    classes = sorted(int(v) for v in np.unique(truth))
    cost = Cost()
    result = random_forest_segment(image, encode_labels(sparse, classes, IGNORE), spacing=spacing, seed=seed,
                                   max_train_voxels=FOREST_TRAIN_VOXELS)
    spent = cost.stop()
    return {**score(decode_labels(result.labels, classes), truth, sparse), **spent}


def cpu_budget_config(data, cpu_budget: float, seed: int, **changes):
    """Densify's recipe stopping after `cpu_budget` CPU seconds of this process, without checkpoints."""
    return dataclasses.replace(default_config(data, max_time=cpu_budget, seed=seed), clock="cpu",
                               checkpoint_every=1e9, **changes)


def run_unet(image, truth, slices, spacing, cpu_budget: float, seed: int = 0, recipe=None, tta: bool = False,
             normalization: str = "zscore") -> dict:
    """Densify's recipe (changed by `recipe(config) -> config`) trained for `cpu_budget` CPU seconds."""
    data, sparse = training_set(image, truth, slices, spacing, normalization)
    config = cpu_budget_config(data, cpu_budget, seed)
    if recipe is not None:
        config = recipe(config)
    cost = Cost()
    with tempfile.TemporaryDirectory() as folder:
        result = train(config, data, Path(folder) / "model.safetensors", progress=False)
    probabilities = predict_array(result.model, data.images[0].numpy(), tta=tta)
    spent = cost.stop()
    return {**score_probabilities(probabilities, data, truth, sparse), **spent, "iterations": result.iterations}


def score_probabilities(probabilities, data, truth, sparse) -> dict:
    """`score` of the most probable class of a network's (K, Z, Y, X) probabilities."""
    return score(decode_labels(probabilities.argmax(0), data.class_values), truth, sparse)


def run_densify(image, truth, slices, spacing, cpu_budget: float, seed: int = 0, **options) -> dict:
    """`unet3d densify` with its defaults on `cpu_budget` CPU seconds (one thread): scores of its
    result and of its network alone, and the CPU/wall cost including prediction. `options` go to
    `densify` (`init`, a model to fine-tune; `iterations`; `forest`)."""
    sparse = sparsify(truth, slices, IGNORE)
    cost = Cost()
    with tempfile.TemporaryDirectory() as folder:
        result = densify(image, sparse, IGNORE, Path(folder) / "model.safetensors", max_time=cpu_budget, seed=seed,
                         spacing=spacing, progress=False, threads=1, clock="cpu", **options)
    spent = cost.stop()
    network = result.components.get("network", result.segmentation)
    return {**score(result.segmentation, truth, sparse), **spent, "iterations": result.iterations,
            "network": score(network, truth, sparse)["foreground"], "trees": result.forest_trees, "tta": result.tta}
