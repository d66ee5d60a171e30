"""Does the forest's output, given to the U-Net as extra input channels (auto-context), raise IoU?

Usage: .venv/bin/python experiments/ablation/autocontext.py VOLUME SLICES VARIANT SEED BUDGET
  VOLUME   nuclei_tiny, ovule, em_vnc_q0..3, hippocampus_NNN
  SLICES   k per axis, e.g. 1,1,1
  VARIANT  plain (densify on the image), forest (the forest alone), autocontext (image + the
           forest's class probabilities, out-of-fold on the annotated voxels), residual (the same
           inputs; the network's logits are added to the log of the forest's probabilities and
           start at zero, so training starts from the forest's answer)
  BUDGET   CPU seconds in all: the forest stage's CPU time is taken out of the training time

On the annotated voxels the forest has seen the answer, so its probabilities there are far better
than anywhere else; a network trained on them would learn to copy them. Each annotated voxel
therefore gets the probabilities of a forest that did not see its block of the volume (3 folds
of a 3×3×3 block grid); every other voxel gets those of the forest trained on all annotations.

Prints one JSON line: foreground IoU on the voxels no slice annotates, iterations, CPU seconds.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch

from experiments.ablation.common import cpu_budget_config
from experiments.paper import data, protocols
from experiments.paper.methods import IGNORE, annotated_classes
from unet3d.data.features import filter_features
from unet3d.baselines.forest import fit_forest, predict_probabilities
from unet3d.data.labels import UNLABELED, decode_labels, encode_labels
from unet3d.data.normalization import apply_normalization
from unet3d.inference import predict_array
from unet3d.model import UNet
from unet3d.training import train
from unet3d.training.dataset import prepare_training_set

FOLDS = 3
TRAIN_VOXELS = 100_000  # as the forest baseline
TREES = 100  # the forest on all annotations; each fold's forest gets a third, so that the three
# folds together cost about one more fit


def block_folds(shape) -> np.ndarray:
    """Fold index per voxel: a 3×3×3 grid of blocks, neighbouring blocks in different folds."""
    index = [np.minimum(np.arange(n) * 3 // n, 2) for n in shape]
    return (index[0][:, None, None] + index[1][None, :, None] + index[2][None, None, :]) % FOLDS


def forest_probabilities(image, encoded, spacing, seed, out_of_fold: bool) -> np.ndarray:
    """(K, Z, Y, X) forest probabilities; out-of-fold on annotated voxels when asked."""
    num_classes = int(encoded.max()) + 1
    features = filter_features(image, spacing=spacing).reshape(-1, encoded.size)
    labels = encoded.reshape(-1)
    annotated = np.flatnonzero(labels != UNLABELED)
    probabilities = predict_probabilities(fit_forest(features, labels, annotated, TREES, seed, TRAIN_VOXELS), features,
                                          num_classes)
    if out_of_fold:
        folds = block_folds(encoded.shape).reshape(-1)
        for fold in range(FOLDS):
            held_out = annotated[folds[annotated] == fold]
            trained = annotated[folds[annotated] != fold]
            if held_out.size and trained.size:
                forest = fit_forest(features, labels, trained, TREES // FOLDS, seed + 1 + fold, TRAIN_VOXELS)
                probabilities[:, held_out] = predict_probabilities(forest, features[:, held_out], num_classes)
    return probabilities.reshape((num_classes,) + encoded.shape)


def residual_network(classes: int, normalization: dict):
    """A UNet class whose output is log(forest probability) + its own logits (zero at the start)."""
    offset = torch.tensor(normalization["offset"][-classes:]).view(1, -1, 1, 1, 1)
    scale = torch.tensor(normalization["scale"][-classes:]).view(1, -1, 1, 1, 1)

    class ForestResidualUNet(UNet):
        def __init__(self, config):
            super().__init__(config)
            torch.nn.init.zeros_(self.head.weight)
            torch.nn.init.zeros_(self.head.bias)

        def forward(self, x):
            prior = torch.log((x[:, -classes:] * scale + offset).clamp_min(1e-3))
            return prior + super().forward(x)

    return ForestResidualUNet


def main(name: str, slices: str, variant: str, seed: int, budget: float) -> dict:
    torch.set_num_threads(1)
    volume = data.load(name)
    sparse = protocols.sparsify(volume.truth, tuple(int(k) for k in slices.split(",")), ignore_label=IGNORE)
    classes = annotated_classes([sparse])
    start = time.process_time()
    image = volume.image
    iterations = 0
    if variant in ("forest", "autocontext", "residual"):
        encoded = encode_labels(sparse, classes, IGNORE)
        probabilities = forest_probabilities(image, encoded, volume.spacing, seed, variant != "forest")
        image = np.concatenate([image, probabilities])
    forest_s = time.process_time() - start
    if variant == "forest":
        prediction = probabilities
    else:
        training = prepare_training_set([image], [sparse], IGNORE, class_values=classes, spacing=volume.spacing)
        config = cpu_budget_config(training, max(budget - forest_s, 5), seed)
        torch.manual_seed(seed)
        network = residual_network(len(classes), training.normalization)(config.network) \
            if variant == "residual" else None
        with tempfile.TemporaryDirectory() as folder:
            result = train(config, training, Path(folder) / "model.safetensors", progress=False, network=network)
        iterations = result.iterations
        prediction = predict_array(result.model, apply_normalization(image, training.normalization))
    labels = decode_labels(prediction.argmax(0), classes)
    score = protocols._score(volume, labels, sparse == IGNORE)
    return {"volume": name, "slices": slices, "variant": variant, "seed": seed, "budget": budget,
            "forest_s": round(forest_s, 1), "iterations": iterations,
            "mean_iou": round(score["mean_iou"], 4), "iou": {k: round(v, 3) for k, v in score["iou"].items()},
            "cpu_s": round(time.process_time() - start, 1)}


if __name__ == "__main__":
    if len(sys.argv) != 6 or sys.argv[3] not in ("plain", "forest", "autocontext", "residual"):
        sys.exit(__doc__)
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))), flush=True)
