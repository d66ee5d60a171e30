"""Intensity normalization of densify's network: z-score (densify's) against percentiles.

Usage: .venv/bin/python experiments/ablation/normalization.py VOLUME SLICES SEED [BUDGET]

Trains densify's network twice on the same slices (its recipe, BUDGET CPU seconds, default 120,
one thread), once on the z-scored image and once on the image scaled between its 1st and 99th
percentiles, and prints one JSON line of foreground IoU on the unannotated voxels for each.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import IGNORE, cpu_budget_config, load_volume, score  # noqa: E402

from unet3d.data.labels import decode_labels  # noqa: E402
from unet3d.data.sparse import sparsify  # noqa: E402
from unet3d.inference import predict_array  # noqa: E402
from unet3d.training import train  # noqa: E402
from unet3d.training.dataset import prepare_training_set  # noqa: E402


def main() -> None:
    volume, slices, seed = sys.argv[1], tuple(int(k) for k in sys.argv[2].split(",")), int(sys.argv[3])
    budget = float(sys.argv[4]) if len(sys.argv) > 4 else 120.0
    torch.set_num_threads(1)
    image, truth, spacing = load_volume(volume)
    sparse = sparsify(truth, slices, IGNORE)
    classes = sorted(int(v) for v in set(truth.flat))
    row = {"volume": volume, "slices": list(slices), "seed": seed, "budget": budget}
    for method in ("zscore", "percentile"):
        data = prepare_training_set([image], [sparse], IGNORE, class_values=classes, spacing=spacing,
                                    normalization=method)
        with tempfile.TemporaryDirectory() as folder:
            result = train(cpu_budget_config(data, budget, seed), data, Path(folder) / "model.safetensors",
                           progress=False)
        labels = decode_labels(predict_array(result.model, data.images[0].numpy()).argmax(0), data.class_values)
        row[method] = round(score(labels, truth, sparse)["foreground"], 4)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
