"""Does training the network on densify's own confident labels of the unannotated voxels pay?

Usage: .venv/bin/python experiments/ablation/self_training.py VOLUME SLICES SEED BUDGET [share=S] [threshold=T] [lr=R]
  VOLUME       nuclei_tiny, ovule, em_vnc_q0..3, hippocampus_NNN
  SLICES       k per axis, e.g. 1,1,1
  BUDGET       CPU seconds of this process for the filter bank, the forest and both training rounds
  share=S      the first round's share of the network's training time (default 0.6)
  threshold=T  a voxel not annotated gets the blend's class where its probability is at least T (0.9)
  lr=R         the second round's peak learning rate (default densify's)

Round one is densify: the forest within its share of the budget, the network for `share` of the
rest, the geometric-mean blend (test-time flips where densify would use them). Every voxel the
blend is sure of then joins the annotated ones as a label, and the same network trains on them for
what is left of the budget (a fresh Adam and cosine schedule); the result is blended with the same
forest again. Prints one JSON line: foreground IoU (and IoU per class) on the voxels no slice
annotates for the forest, each round's network and each round's blend, the pseudo-labels' share of
the volume and their accuracy.
"""

from __future__ import annotations

import dataclasses
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
from experiments.ablation.forest_blend import prepare_run
from experiments.paper import protocols
from experiments.paper.methods import IGNORE
from unet3d.data.labels import decode_labels
from unet3d.training import train
from unet3d.workflows.blend import geometric_mean
from unet3d.workflows.densify import predict_with_tta


def pseudo_labels(training, blend: np.ndarray, threshold: float) -> torch.Tensor:
    """The annotated voxels' labels, and the blend's class wherever it is at least `threshold` sure."""
    labels = training.labels[0].clone()
    confident = torch.from_numpy(blend.max(0) >= threshold) & (labels < 0)
    labels[confident] = torch.from_numpy(blend.argmax(0))[confident]
    return labels


def main(name: str, slices: str, seed: int, budget: float, share: float = 0.6, threshold: float = 0.9,
         lr: float | None = None) -> dict:
    torch.set_num_threads(1)
    now = time.process_time
    volume, sparse, classes, training, inputs, forest_result, start = prepare_run(name, slices, seed, budget)
    forest = forest_result.probabilities
    training_time = budget - (now() - start)
    normalized = training.images[0].numpy()
    with tempfile.TemporaryDirectory() as folder:
        first = train(cpu_budget_config(training, share * training_time, seed), training,
                      Path(folder) / "model.safetensors", progress=False)
        unet1, tta = predict_with_tta(first.model, normalized, None, budget, now, "cpu", False)
        blend1 = geometric_mean(unet1, forest)
        labels = pseudo_labels(training, blend1, threshold)
        relabelled = dataclasses.replace(training, labels=[labels])
        rest = max(budget - (now() - start), 5)
        config = cpu_budget_config(training, rest, seed + 1, **({"learning_rate": lr} if lr else {}))
        second = train(config, relabelled, Path(folder) / "model.safetensors", progress=False, network=first.model)
    unet2, _ = predict_with_tta(second.model, normalized, tta, None, now, "cpu", False)
    spent = now() - start
    blend2 = geometric_mean(unet2, forest)

    mask = sparse == IGNORE
    results = {"forest": forest, "unet1": unet1, "blend1": blend1, "unet2": unet2, "blend2": blend2}
    scores = {k: protocols._score(volume, decode_labels(v.argmax(0), classes), mask) for k, v in results.items()}
    added = (labels.numpy() >= 0) & mask
    truth = volume.truth[added]
    correct = float(np.mean(decode_labels(labels.numpy()[added], classes) == truth)) if truth.size else 0.0
    return {"volume": name, "slices": slices, "seed": seed, "budget": budget, "share": share,
            "threshold": threshold, "lr": lr, "inputs": inputs, "tta": tta, "cpu_s": round(spent, 1),
            "iterations": [first.iterations, second.iterations],
            "pseudo_share": round(float(added.mean()), 3), "pseudo_accuracy": round(correct, 3),
            "fg_iou": {k: round(v["mean_iou"], 4) for k, v in scores.items()},
            "class_iou": {k: {c: round(i, 3) for c, i in v["iou"].items()} for k, v in scores.items()}}


if __name__ == "__main__":
    options = dict(o.split("=", 1) for o in sys.argv[5:] if "=" in o)
    if len(sys.argv) < 5 or set(options) - {"share", "threshold", "lr"} or len(options) != len(sys.argv[5:]):
        sys.exit(__doc__)
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]),
                          **{k: float(v) for k, v in options.items()})))
