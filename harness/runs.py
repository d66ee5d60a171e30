"""One volume densified from its sparse slices, scored and timed the same way wherever it is
recorded: by the forest peer (`harness.forest`) or by `densify`, IoU on the voxels nobody annotated."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from harness import IGNORE, forest
from harness.volumes import Volume
from unet3d.data.labels import decode_labels
from unet3d.evaluation import evaluate_volumes
from unet3d.workflows.blend import geometric_mean
from unet3d.workflows.densify import densify


class Cost:
    """CPU seconds of this process (all its threads) and wall seconds between construction and `stop()`:
    on shared cores the wall clock mostly measures whoever else is running."""

    def __init__(self):
        self.cpu, self.wall = time.process_time(), time.perf_counter()

    def stop(self) -> dict:
        return {"cpu": time.process_time() - self.cpu, "wall": time.perf_counter() - self.wall}


def score(volume: Volume, labels: np.ndarray, sparse: np.ndarray) -> dict:
    """IoU per class value on the voxels `sparse` leaves unannotated (None: a class absent there from
    truth and prediction alike), and their mean over the volume's foreground classes."""
    result = evaluate_volumes(labels, volume.truth, exclude=sparse, ignore_label=IGNORE, background=volume.background)
    return {"foreground": result["mean_iou_foreground"], "iou": {c["value"]: c["iou"] for c in result["classes"]}}


def run_forest(volume: Volume, sparse: np.ndarray, seed: int = 0) -> dict:
    """The forest peer densifying the volume: its scores and cost."""
    cost = Cost()
    result = forest.segment([volume], [sparse], [volume], seed)
    spent = cost.stop()
    return {**score(volume, result.labels[0], sparse), **spent}


def run_densify(volume: Volume, sparse: np.ndarray, seed: int = 0, save: Path | None = None, **options) -> dict:
    """`densify` on the volume (`options` as `densify` takes them: max_time, clock, threads, init, ...):
    the scores of its result, the foreground mean of each part it blended ("parts"; with "equal weights",
    the parts' plain geometric mean, where it weighed them on held-out voxels), and its cost with
    prediction. `save`: the parts' probabilities (float16) and the held-out voxels, as .npz."""
    cost = Cost()
    with tempfile.TemporaryDirectory() as folder:
        result = densify(volume.image.astype(np.float32), sparse, IGNORE, Path(folder) / "model.safetensors",
                         seed=seed, spacing=volume.spacing, progress=False, **options)
    spent = cost.stop()
    parts = {name: score(volume, labels, sparse)["foreground"] for name, labels in result.components.items()}
    maps = result.component_probabilities
    if result.held_out is not None:
        equal = geometric_mean(maps["network"], maps["forest"]).argmax(0)
        parts["equal weights"] = score(volume, decode_labels(equal, result.info.class_values), sparse)["foreground"]
    if save and maps:
        held = result.held_out
        np.savez_compressed(save, **{name: p.astype(np.float16) for name, p in maps.items()},
                            classes=np.asarray(result.info.class_values),
                            held_voxels=held.voxels if held else np.zeros(0, np.int64),
                            held_classes=held.classes if held else np.zeros(0, np.int64))
    return {**score(volume, result.segmentation, sparse), **spent, "parts": parts, "iterations": result.iterations,
            "trees": result.forest_trees, "blend": result.weighing, "tta": result.tta}


def network_alone(run: dict) -> float:
    """The foreground mean of densify's network alone (`run_densify`): its part of the blend, or the
    result itself where nothing was blended in."""
    return run["parts"].get("network", run["foreground"])
