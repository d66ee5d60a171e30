"""Foreground IoU against CPU seconds: densify at several budgets next to the random forest.

Usage: .venv/bin/python -m experiments.ablation.curve [--volume nuclei_tiny] [--slices 3,3,2]
           [--budgets 20 60 120] [--seeds 0 1] [--output docs/figures/densify_vs_forest.png]

Each budget is a separate run of `unet3d densify` with its defaults (the schedule anneals over the
whole budget, so a snapshot of a longer run would not show what a shorter one reaches); the
figure shows its result and, from the same runs, its network alone. The forest is one point: its
CPU seconds for features, fit and prediction, and its IoU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from experiments.ablation.common import CPU_CLOCK, load_volume
from harness import IGNORE
from harness.runs import network_alone, run_densify, run_forest
from unet3d.atomic import atomic_path
from unet3d.data.sparse import sparsify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volume", default="nuclei_tiny")
    parser.add_argument("--slices", default="3,3,2")
    parser.add_argument("--budgets", type=float, nargs="+", default=[20.0, 60.0, 120.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--output", type=Path, default=Path("docs/figures/densify_vs_forest.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    slices = tuple(int(k) for k in args.slices.split(","))
    volume = load_volume(args.volume)
    sparse = sparsify(volume.truth, slices, IGNORE)
    forest = run_forest(volume, sparse)
    print(f"forest: fg IoU {forest['foreground']:.3f}, {forest['cpu']:.0f} CPU s, {forest['wall']:.0f} wall s")
    points = []
    for budget in args.budgets:
        runs = [run_densify(volume, sparse, seed, max_time=budget, **CPU_CLOCK) for seed in args.seeds]
        fg = [r["foreground"] for r in runs]
        network = [network_alone(r) for r in runs]
        cpu = float(np.mean([r["cpu"] for r in runs]))
        points.append((cpu, float(np.mean(fg)), float(np.std(fg)), float(np.mean(network)), float(np.std(network))))
        print(f"densify {budget:.0f} CPU s budget: fg IoU {np.mean(fg):.3f} ± {np.std(fg):.3f} (network alone "
              f"{np.mean(network):.3f}), {cpu:.0f} CPU s with prediction, "
              f"{np.mean([r['wall'] for r in runs]):.0f} wall s", flush=True)
    plot(args.output, points, forest, f"{args.volume}, slices {args.slices}, seeds {args.seeds}")


def plot(path: Path, points, forest, title: str) -> None:
    cpu, mean, std, network, network_std = (np.array(v) for v in zip(*points))
    figure, axes = plt.subplots(figsize=(4.5, 3.2), dpi=90)
    axes.errorbar(cpu, mean, yerr=std, marker="o", capsize=3, label="densify (U-Net + forest)")
    axes.errorbar(cpu, network, yerr=network_std, marker=".", capsize=3, linestyle="--", color="C0", alpha=0.6,
                  label="its U-Net alone")
    axes.scatter([forest["cpu"]], [forest["foreground"]], marker="s", color="C3", zorder=3, label="random forest")
    axes.set_xlabel("CPU seconds (train + predict)")
    axes.set_ylabel("foreground IoU, unannotated voxels")
    axes.set_title(title, fontsize=8)
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    plt.close(figure)


if __name__ == "__main__":
    main()
