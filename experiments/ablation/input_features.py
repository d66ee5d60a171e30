"""Does ilastik's filter bank, given to the U-Net as extra input channels, raise densify's IoU?

Usage: .venv/bin/python -m experiments.ablation.input_features VOLUME SLICES VARIANT SEED BUDGET [LOSS]
  VOLUME   nuclei_tiny, ovule, em_vnc_q0..3, hippocampus_NNN
  SLICES   k per axis, e.g. 1,1,1
  VARIANT  plain (the image), features (+ 61 filters at ilastik's seven scales),
           features_small (+ the filters at scales 1 and 3.5 only)
  BUDGET   CPU seconds of this process: the filters' time is taken out of the training time
  LOSS     densify's loss (default) or another of unet3d.losses, e.g. dice_ce

Prints one JSON line: foreground IoU on the voxels no slice annotates, iterations, CPU seconds.
Findings are in docs/ablation.md ("Filter-bank input channels").
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path


import numpy as np
import torch

from experiments.ablation.common import cpu_budget_config
from experiments.paper import protocols
from harness import IGNORE, volumes
from harness.forest import annotated_classes
from unet3d.data.features import DEFAULT_SCALES, input_feature_spec, with_input_features
from unet3d.data.labels import decode_labels
from unet3d.data.normalization import apply_normalization
from unet3d.inference import predict_array
from unet3d.training import train
from unet3d.training.dataset import prepare_training_set

SCALES = {"features": DEFAULT_SCALES, "features_small": (1.0, 3.5)}


def with_features(volume: volumes.Volume, variant: str) -> np.ndarray:
    """The network's input as `densify --filter-features` makes it (with this variant's scales)."""
    if variant == "plain":
        return volume.image
    return with_input_features(volume.image, input_feature_spec(volume.spacing, SCALES[variant]))


def main(name: str, slices: str, variant: str, seed: int, budget: float, loss: str | None = None) -> dict:
    torch.set_num_threads(1)
    volume = volumes.load(name)
    sparse = protocols.sparsify(volume.truth, tuple(int(k) for k in slices.split(",")), ignore_label=IGNORE)
    start = time.process_time()
    image = with_features(volume, variant)
    seconds_features = time.process_time() - start
    classes = annotated_classes([sparse])
    training = prepare_training_set([image], [sparse], IGNORE, class_values=classes, spacing=volume.spacing)
    config = cpu_budget_config(training, max(budget - seconds_features, 5), seed, **({"loss": loss} if loss else {}))
    with tempfile.TemporaryDirectory() as folder:
        result = train(config, training, Path(folder) / "model.safetensors", progress=False)
    probabilities = predict_array(result.model, apply_normalization(image, training.normalization))
    labels = decode_labels(probabilities.argmax(0), classes)
    score = protocols._score(volume, labels, sparse == IGNORE)
    return {"volume": name, "slices": slices, "variant": variant, "loss": config.loss, "seed": seed, "budget": budget,
            "features_s": round(seconds_features, 1), "iterations": result.iterations,
            "mean_iou": round(score["mean_iou"], 4), "iou": {k: round(v, 3) for k, v in score["iou"].items()},
            "cpu_s": round(time.process_time() - start, 1)}


if __name__ == "__main__":
    if len(sys.argv) not in (6, 7) or sys.argv[3] not in ("plain", *SCALES):
        sys.exit(__doc__)
    loss = sys.argv[6] if len(sys.argv) == 7 else None
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), loss)))
