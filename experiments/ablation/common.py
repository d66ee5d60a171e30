"""Shared protocol of the densify ablation: its volumes, its clock, and the U-Net runs of its variants.

Every run is scored as `harness.runs` scores: keep k orthogonal slices per axis of the ground truth,
train on those voxels only, report IoU per class on all other voxels and the mean over the classes
but 0 (on em_vnc too, whose class 0 is membrane: the ablation's tables have always left it out).
Budgets and costs are CPU seconds of this process in one thread, because the cores are shared:
wall seconds would mostly measure whoever else is running.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np

from harness import IGNORE, volumes
from harness.runs import Cost, score
from unet3d.data.labels import decode_labels
from unet3d.data.sparse import sparsify
from unet3d.inference import predict_array
from unet3d.training import train
from unet3d.training.dataset import prepare_training_set
from unet3d.workflows.densify import default_config

CPU_CLOCK = {"clock": "cpu", "threads": 1}  # densify's budget in CPU seconds of one thread


def load_volume(name: str) -> volumes.Volume:
    """A volume `harness.volumes.load` names, its image float32 and class 0 its background; "em_vnc"
    is its first quarter (em_vnc_q0), as in the ablation's tables."""
    volume = volumes.load("em_vnc_q0" if name == "em_vnc" else name)
    return dataclasses.replace(volume, image=volume.image.astype(np.float32), background=0)


def training_set(volume: volumes.Volume, sparse: np.ndarray, normalization: str = "zscore"):
    """The TrainingSet of the volume's annotated voxels, every class of its truth a class."""
    classes = sorted(int(v) for v in np.unique(volume.truth))
    return prepare_training_set([volume.image], [sparse], IGNORE, class_values=classes, spacing=volume.spacing,
                                normalization=normalization)


def cpu_budget_config(data, cpu_budget: float, seed: int, **changes):
    """Densify's recipe stopping after `cpu_budget` CPU seconds of this process, without checkpoints."""
    return dataclasses.replace(default_config(data, max_time=cpu_budget, seed=seed), clock="cpu",
                               checkpoint_every=1e9, **changes)


def run_unet(volume: volumes.Volume, slices, cpu_budget: float, seed: int = 0, recipe=None, tta: bool = False,
             normalization: str = "zscore") -> dict:
    """Densify's recipe (changed by `recipe(config) -> config`) trained for `cpu_budget` CPU seconds."""
    sparse = sparsify(volume.truth, slices, IGNORE)
    data = training_set(volume, sparse, normalization)
    config = cpu_budget_config(data, cpu_budget, seed)
    if recipe is not None:
        config = recipe(config)
    cost = Cost()
    with tempfile.TemporaryDirectory() as folder:
        result = train(config, data, Path(folder) / "model.safetensors", progress=False)
    probabilities = predict_array(result.model, data.images[0].numpy(), tta=tta)
    spent = cost.stop()
    labels = decode_labels(probabilities.argmax(0), data.class_values)
    return {**score(volume, labels, sparse), **spent, "iterations": result.iterations}
