"""Does averaging the U-Net's and the random forest's class probabilities beat either alone?

Usage: .venv/bin/python -m experiments.ablation.forest_blend VOLUME SLICES SEED BUDGET [notta] [trees=N] [save=FILE]
       [width=W] [levels=L] [batch=B] [lr=RATE] [weighting=W]
       [patch=Z,Y,X]
  VOLUME   nuclei_tiny, ovule, em_vnc_q0..3, hippocampus_NNN
  SLICES   k per axis, e.g. 1,1,1
  BUDGET   CPU seconds of this process for everything: the filter bank, the forest (fit and
           prediction) and the U-Net; the U-Net trains for what the first two leave
  notta    skip the scores with test-time flips (8 more predictions: minutes on large volumes)
  trees=N  a forest of N trees (default: densify's, as many as fit in its share of the budget)
  save=FILE  also write the forest's and the U-Net's probabilities (float16 .npz) for offline study
             of other ways to combine them (`blend_rules.py`)
  width=W, levels=L, batch=B  the network's first width, its levels and the training batch
             (default: densify's 8, 3 and 4)
  lr=RATE  Adam's peak learning rate (default: densify's)
  weighting=W  the loss's class weighting: inverse_sqrt (densify's), inverse or none
  patch=Z,Y,X  the training patch (default: densify's 16,40,40 capped by the volume)

The filter bank is computed once and serves both the forest and, when densify would add it
(`choose_inputs`), the network's input. Forest and U-Net are densify's. Prints one JSON line:
foreground IoU (and IoU per class) on the voxels no slice annotates for the forest, the U-Net and
their blends (arithmetic and geometric mean of the probabilities), each with and without
test-time flips.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple


import numpy as np
import torch

from experiments.ablation.common import cpu_budget_config
from experiments.paper import protocols
from harness import IGNORE, volumes
from harness.forest import annotated_classes
from unet3d.data.features import with_input_features
from unet3d.baselines.forest import ForestResult
from unet3d.data.labels import decode_labels
from unet3d.inference import predict_array
from unet3d.training import train
from unet3d.training.dataset import TrainingSet, prepare_training_set
from unet3d.workflows.blend import geometric_mean
from unet3d.workflows.densify import FOREST_MAX_SHARE, FOREST_TREES, choose_inputs, fit_forest_on_bank


def blends(forest: np.ndarray, unet: np.ndarray) -> dict[str, np.ndarray]:
    return {"mean": (forest + unet) / 2, "geometric": geometric_mean(forest, unet)}


class PreparedRun(NamedTuple):
    volume: volumes.Volume
    sparse: np.ndarray  # the kept slices' labels, IGNORE elsewhere
    classes: list[int]
    training: TrainingSet  # with the filter bank where densify would add it
    inputs: str  # densify's line on what the network reads
    forest: ForestResult
    start: float  # CPU seconds of this process when the budget started counting


def prepare_run(name: str, slices: str, seed: int, budget: float, trees: int | None = None) -> PreparedRun:
    """A densify run up to the network: the kept slices, the training set and densify's forest
    (within its share of `budget`, or of `trees` trees), timed from the filter bank on."""
    volume = volumes.load(name)
    sparse = protocols.sparsify(volume.truth, tuple(int(k) for k in slices.split(",")), ignore_label=IGNORE)
    classes = annotated_classes([sparse])
    start = time.process_time()
    spec, inputs = choose_inputs(None, volume.image.shape, sparse, IGNORE, volume.spacing, name)
    image = with_input_features(volume.image, spec) if spec else volume.image
    training = prepare_training_set([image], [sparse], IGNORE, class_values=classes, spacing=volume.spacing,
                                    input_features=spec)
    limit = None if trees else FOREST_MAX_SHARE * budget
    forest = fit_forest_on_bank(volume.image, image, training, seed, None, False, limit, time.process_time,
                                trees or FOREST_TREES)
    return PreparedRun(volume, sparse, classes, training, inputs, forest, start)


def main(name: str, slices: str, seed: int, budget: float, tta: bool = True, trees: int | None = None,
         save: str | None = None, shape: dict | None = None, recipe: dict | None = None) -> dict:
    """`trees`: a forest of that many; None: densify's, grown within its share of the budget.
    `shape`: UNetConfig fields (width, levels) to change; `recipe`: TrainConfig fields to change."""
    torch.set_num_threads(1)
    volume, sparse, classes, training, inputs, forest_result, start = prepare_run(name, slices, seed, budget, trees)
    forest = forest_result.probabilities
    seconds_forest = time.process_time() - start
    config = cpu_budget_config(training, max(budget - seconds_forest, 5), seed)
    config = dataclasses.replace(config, network=dataclasses.replace(config.network, **(shape or {})),
                                 **(recipe or {}))
    with tempfile.TemporaryDirectory() as folder:
        result = train(config, training, Path(folder) / "model.safetensors", progress=False)
    normalized = training.images[0].numpy()
    unet = predict_array(result.model, normalized)
    seconds_total = time.process_time() - start
    unet_tta = predict_array(result.model, normalized, tta=True) if tta else None
    seconds_tta = time.process_time() - start - seconds_total

    mask = sparse == IGNORE
    results = {"forest": forest, "unet": unet} | blends(forest, unet)
    if tta:
        results |= {"unet_tta": unet_tta} | {f"{k}_tta": v for k, v in blends(forest, unet_tta).items()}
    if save:
        np.savez_compressed(save, **{k: results[k].astype(np.float16) for k in ("forest", "unet", "unet_tta")
                                     if k in results}, classes=np.asarray(classes))
    scores = {k: protocols._score(volume, decode_labels(v.argmax(0), classes), mask) for k, v in results.items()}
    return {"volume": name, "slices": slices, "seed": seed, "budget": budget, "inputs": inputs,
            "network": f"width {config.network.width}, {config.network.levels} levels, batch {config.batch_size}",
            "learning_rate": config.learning_rate, "class_weighting": config.class_weighting,
            "patch": list(config.patch_shape),
            "trees": forest_result.trees,
            "forest_s": round(seconds_forest, 1), "iterations": result.iterations, "cpu_s": round(seconds_total, 1),
            "tta_extra_s": round(seconds_tta, 1), "fg_iou": {k: round(v["mean_iou"], 4) for k, v in scores.items()},
            "class_iou": {k: {c: round(i, 3) for c, i in v["iou"].items()} for k, v in scores.items()}}


def parse_patch(value: str) -> tuple[int, ...]:
    return tuple(int(n) for n in value.split(","))


# Options that change densify's network (UNetConfig fields) and its training (TrainConfig fields).
NETWORK_OPTIONS = ("width", "levels")
RECIPE_OPTIONS = {"batch": ("batch_size", int), "lr": ("learning_rate", float), "weighting": ("class_weighting", str),
                  "patch": ("patch_shape", parse_patch)}


def take_option(argv: list[str], name: str, default, parse=float):
    """A wrapper experiment's own NAME=VALUE option: (argv without it, its value or `default`)."""
    prefix = f"{name}="
    values = [a[len(prefix):] for a in argv if a.startswith(prefix)]
    return [a for a in argv if not a.startswith(prefix)], parse(values[-1]) if values else default


def run_from_arguments(argv: list[str], usage: str = __doc__) -> dict:
    """main() for a command line VOLUME SLICES SEED BUDGET [notta] [NAME=VALUE ...]; exits with `usage` if malformed."""
    options = argv[5:]
    named = dict(o.split("=", 1) for o in options if "=" in o)
    if (len(argv) < 5 or set(named) - {"trees", "save", *NETWORK_OPTIONS, *RECIPE_OPTIONS}
            or any(o != "notta" and "=" not in o for o in options)):
        sys.exit(usage)
    return main(argv[1], argv[2], int(argv[3]), float(argv[4]), tta="notta" not in options,
                trees=int(named["trees"]) if "trees" in named else None, save=named.get("save"),
                shape={o: int(named[o]) for o in NETWORK_OPTIONS if o in named},
                recipe={field: parse(named[o]) for o, (field, parse) in RECIPE_OPTIONS.items() if o in named})


if __name__ == "__main__":
    print(json.dumps(run_from_arguments(sys.argv)))
