"""Intensity normalization of densify's network: z-score (densify's) against percentiles.

Usage: .venv/bin/python experiments/ablation/normalization.py VOLUME SLICES SEED [BUDGET]

Trains densify's network twice on the same slices (its recipe, BUDGET CPU seconds, default 120,
one thread), once on the z-scored image and once on the image scaled between its 1st and 99th
percentiles, and prints one JSON line of foreground IoU on the unannotated voxels for each.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_volume, run_unet  # noqa: E402


def main() -> None:
    volume, slices, seed = sys.argv[1], tuple(int(k) for k in sys.argv[2].split(",")), int(sys.argv[3])
    budget = float(sys.argv[4]) if len(sys.argv) > 4 else 120.0
    torch.set_num_threads(1)
    image, truth, spacing = load_volume(volume)
    row = {"volume": volume, "slices": list(slices), "seed": seed, "budget": budget}
    for method in ("zscore", "percentile"):
        run = run_unet(image, truth, slices, spacing, budget, seed, normalization=method)
        row[method] = round(run["foreground"], 4)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
