"""Densify ablation: each idea's change of foreground IoU (unannotated voxels) at a fixed CPU budget.

Usage: .venv/bin/python -m experiments.ablation.run [--quick] [--volumes nuclei_tiny,hippocampus_001]
           [--slices 3,3,2 ...] [--variants baseline,same ...] [--seeds 0 1] [--budget CPU_SECONDS]
           [--results FILE.jsonl]

For every volume and slice count the random forest runs once, then each variant of the densify
recipe trains for the same CPU budget (default: twice the forest's CPU seconds, at least 120) in
one thread and predicts the whole volume. Rows print as a Markdown table; every run is also
appended as one JSON line to --results so tables and figures can be rebuilt without rerunning.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from experiments.ablation.common import load_volume, run_unet
from harness import IGNORE, volumes
from harness.runs import run_forest
from unet3d.augmentation import AugmentationConfig
from unet3d.data.sparse import sparsify


def _network(config, **changes):
    return dataclasses.replace(config, network=dataclasses.replace(config.network, **changes))


def _valid_padding(config):
    """The former recipe: valid convolutions, input grown so that the output keeps the patch's size."""
    config = _network(config, padding="valid")
    return dataclasses.replace(config, patch_shape=config.network.geometry.input_shape_for_output(config.patch_shape))


# name → (change of densify's default_config, test-time flips)
VARIANTS = {
    "default": (lambda c: c, False),
    "valid_padding": (_valid_padding, False),
    "paper_augmentation": (lambda c: dataclasses.replace(c, augmentation=AugmentationConfig()), False),
    "lr1e-2_onecycle": (lambda c: dataclasses.replace(c, learning_rate=1e-2, schedule="onecycle"), False),
    "dice_ce": (lambda c: dataclasses.replace(c, loss="dice_ce"), False),
    "width16": (lambda c: _network(c, width=16), False),
    "batch1": (lambda c: dataclasses.replace(c, batch_size=1), False),
    "tta": (lambda c: c, True),
    "patch8x56x56": (lambda c: dataclasses.replace(c, patch_shape=(8, 56, 56)), False),
    "patch4x80x80": (lambda c: dataclasses.replace(c, patch_shape=(4, 80, 80)), False),
    "levels4": (lambda c: _network(c, levels=4), False),
    "levels4_8x64x64": (lambda c: dataclasses.replace(_network(c, levels=4), patch_shape=(8, 64, 64)), False),
    "unet2d_4x80x80": (lambda c: dataclasses.replace(_network(c, dims=2), patch_shape=(4, 80, 80)), False),
    "patch32x56x56_batch1": (lambda c: dataclasses.replace(c, patch_shape=(32, 56, 56), batch_size=1), False),
}
QUICK = {"volumes": ["nuclei_tiny"], "slices": [(3, 3, 2)], "seeds": [0], "budget": 30.0}


def table_row(volume, slices, name, runs, forest) -> str:
    fg = [r["foreground"] for r in runs]
    classes = sorted(forest["iou"])[1:]
    per_class = " / ".join(f"{np.mean([r['iou'].get(c) or 0 for r in runs]):.2f}" for c in classes)
    return (f"| {volume} | {','.join(map(str, slices))} | {name} | {np.mean(fg):.3f} ± {np.std(fg):.3f} | "
            f"{np.mean(fg) - forest['foreground']:+.3f} | {per_class} | {np.mean([r['cpu'] for r in runs]):.0f} | "
            f"{np.mean([r['wall'] for r in runs]):.0f} | {np.mean([r['iterations'] for r in runs]):.0f} | {len(runs)} |")


def forest_row(volume, slices, forest) -> str:
    per_class = " / ".join(f"{forest['iou'][c]:.2f}" for c in sorted(forest["iou"])[1:])
    return (f"| {volume} | {','.join(map(str, slices))} | random forest | {forest['foreground']:.3f} | – | "
            f"{per_class} | {forest['cpu']:.0f} | {forest['wall']:.0f} | – | 1 |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="nuclei_tiny at 3,3,2, one seed, 30 CPU s")
    parser.add_argument("--volumes", help="comma-separated: nuclei_tiny, ovule, em_vnc, hippocampus_NNN, hippocampusN")
    parser.add_argument("--slices", nargs="+", help="slice counts per axis, e.g. 1,1,1 3,3,2")
    parser.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--budget", type=float, help="CPU seconds per U-Net run (default: 2× forest, ≥ 120)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the U-Net")
    parser.add_argument("--results", type=Path, help="append every run as a JSON line here")
    args = parser.parse_args()
    quick = QUICK if args.quick else {}
    names = (_volumes(args.volumes) if args.volumes else
             quick.get("volumes") or ["nuclei_tiny", "ovule", "em_vnc"] + volumes.hippocampus_names()[:3])
    slice_list = [tuple(int(k) for k in s.split(",")) for s in args.slices] if args.slices else \
        quick.get("slices", [(1, 1, 1), (2, 2, 1), (3, 3, 2), (4, 4, 3)])
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    seeds = args.seeds or quick.get("seeds", [0, 1])
    budget = args.budget or quick.get("budget")
    torch.set_num_threads(args.threads)

    print("| volume | slices | recipe | mean fg IoU (± std over seeds) | vs forest | fg IoU per class | "
          "CPU s | wall s | iterations | seeds |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for volume in names:
        loaded = load_volume(volume)
        for slices in slice_list:
            forest = run_forest(loaded, sparsify(loaded.truth, slices, IGNORE))
            _record(args.results, volume, slices, "random forest", None, forest)
            print(forest_row(volume, slices, forest), flush=True)
            cpu_budget = budget or max(2 * forest["cpu"], 120.0)
            for name in variants:
                recipe, tta = VARIANTS[name]
                runs = []
                for seed in seeds:
                    run = run_unet(loaded, slices, cpu_budget, seed=seed, recipe=recipe, tta=tta)
                    _record(args.results, volume, slices, name, seed, {**run, "budget": cpu_budget})
                    runs.append(run)
                print(table_row(volume, slices, name, runs, forest), flush=True)


def _volumes(text: str) -> list[str]:
    names = []
    for name in text.split(","):
        count = name.removeprefix("hippocampus")
        names += volumes.hippocampus_names()[:int(count)] if name.startswith("hippocampus") and count.isdigit() else [name]
    return names


def _record(path: Path | None, volume, slices, recipe, seed, run: dict) -> None:
    if path is None:
        return
    with path.open("a") as f:
        f.write(json.dumps({"volume": volume, "slices": list(slices), "recipe": recipe, "seed": seed,
                            **{k: v for k, v in run.items()}}) + "\n")


if __name__ == "__main__":
    main()
