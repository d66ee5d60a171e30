"""Does a network pretrained on other volumes of the same kind, then fine-tuned on the user's
slices, beat densify's fresh network and the random forest?

Usage: .venv/bin/python -m experiments.ablation.pretrained pretrain KIND MODEL BUDGET [SEED] [volumes=N]
       .venv/bin/python -m experiments.ablation.pretrained finetune MODEL VOLUME SLICES SEED BUDGET [lr=R]
       .venv/bin/python -m experiments.ablation.pretrained alone MODEL VOLUME SLICES BUDGET
  KIND     hippocampus: every case of ../shared/data/hippocampus except the ones the experiments
           score (harness/volumes.py); em_vnc: the quarters q1-q3 (the test quarter is q0);
           synthetic_walls: 12 synthetic cell-wall stacks (synthetic_walls.py), for the ovule
  BUDGET   CPU seconds of this process (one thread)
  volumes=N  pretrain on the first N of those volumes only (a quick run)
  lr=R     fine-tune at this peak learning rate instead of densify's

pretrain trains densify's network on the dense labels of those volumes and writes MODEL;
finetune runs densify from MODEL on VOLUME's slices and prints one JSON line: foreground IoU and
IoU per class on the voxels no slice annotates, of densify's result and of its network alone;
alone scores MODEL's network as it is, without a step on the slices and without the forest (with
test-time flips where densify would add them at that budget).
"""

from __future__ import annotations

import dataclasses
import json
import sys


import torch

from experiments.ablation.common import CPU_CLOCK, load_volume
from experiments.ablation.synthetic_walls import synthetic_volume
from harness import IGNORE, volumes
from harness.runs import network_alone, run_densify
from unet3d.data.sparse import sparsify
from unet3d.data.features import input_feature_spec, with_input_features
from unet3d.training import train
from unet3d.training.dataset import prepare_training_set
from unet3d.workflows.densify import StartingModel, default_config

SCORED = set(volumes.HIPPOCAMPUS_CASES) | set(volumes.HIPPOCAMPUS_TEST)


def pretraining_names(kind: str) -> list[str]:
    """The volumes a model of this kind is trained on: none that the experiments score."""
    if kind == "hippocampus":
        return [name for name in volumes.hippocampus_names() if name.removeprefix("hippocampus_") not in SCORED]
    if kind == "em_vnc":
        return [f"em_vnc_q{q}" for q in (1, 2, 3)]
    raise SystemExit(f"unknown kind {kind!r}")


SYNTHETIC_VOLUMES = 12


def pretraining_volumes(kind: str, count: int | None = None) -> list[volumes.Volume]:
    """The volumes, with dense labels, that a model of this kind is trained on (the first `count`)."""
    if kind == "synthetic_walls":
        return [volumes.Volume(f"synthetic_{seed}", *synthetic_volume(seed), None, 0)
                for seed in range(min(count or SYNTHETIC_VOLUMES, SYNTHETIC_VOLUMES))]
    return [volumes.load(name) for name in pretraining_names(kind)[:count]]


def pretrain(kind: str, model: str, budget: float, seed: int = 0, count: int | None = None) -> dict:
    torch.set_num_threads(1)
    volumes = pretraining_volumes(kind, count)
    # The EM and cell-wall networks read the filter bank, as densify gives it on EM and the ovule
    # (tens to hundreds of thousands of annotated voxels).
    spec = input_feature_spec(volumes[0].spacing) if kind in ("em_vnc", "synthetic_walls") else None
    images = [with_input_features(v.image, spec) if spec else v.image for v in volumes]
    # Each volume standardized on its own, as densify does: MRI intensity scales differ between scans.
    classes = list(range(max(v.num_classes for v in volumes)))
    training = prepare_training_set(images, [v.truth for v in volumes], IGNORE, class_values=classes,
                                    spacing=volumes[0].spacing, sources=[v.name for v in volumes], input_features=spec,
                                    per_volume=True)
    config = dataclasses.replace(default_config(training, max_time=budget, seed=seed, clock="cpu"), checkpoint_every=1e9)
    result = train(config, training, model, progress=False)
    return {"kind": kind, "volumes": len(volumes), "iterations": result.iterations, "seconds": result.seconds}


def finetune(model: str, name: str, slices: str, seed: int, budget: float, lr: float | None = None,
             **options) -> dict:
    torch.set_num_threads(1)
    start = StartingModel.load(model)
    if lr is not None:
        start = dataclasses.replace(start, learning_rate=lr)
    volume = load_volume(name)
    sparse = sparsify(volume.truth, tuple(int(k) for k in slices.split(",")), IGNORE)
    result = run_densify(volume, sparse, seed, max_time=budget, init=start, **CPU_CLOCK, **options)
    return {"volume": name, "slices": slices, "seed": seed, "budget": budget, "init": model, "lr": lr, **result,
            "network": network_alone(result)}


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "pretrain":
        count = next((int(a[8:]) for a in args[3:] if a.startswith("volumes=")), None)
        seed = next((int(a) for a in args[3:] if a.isdigit()), 0)
        print(json.dumps(pretrain(args[0], args[1], float(args[2]), seed, count)), flush=True)
    elif command == "alone":
        result = finetune(args[0], args[1], args[2], 0, float(args[3]), iterations=0, forest=False)
        print(json.dumps(result), flush=True)
    else:
        lr = next((float(a[3:]) for a in args[5:] if a.startswith("lr=")), None)
        print(json.dumps(finetune(args[0], args[1], args[2], int(args[3]), float(args[4]), lr)), flush=True)
