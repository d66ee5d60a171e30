"""How densify weighs its network against the forest on held-out annotated blocks, against other rules.

Usage: .venv/bin/python -m experiments.ablation.held_out_blend FILE.npz...
  FILE.npz  written by `benchmarks/bench_densify.py --save FOLDER`, named VOLUME_SLICES_sSEED_tSECONDS.npz

For each saved run, scores (foreground IoU on the voxels no slice annotates) the plain geometric
mean, densify's rule (the network's weight that scores best on the held-out annotated voxels), a
stacked classifier fitted on the same held-out voxels (multinomial logistic regression on both
models' log-probabilities: a weight and an offset per class), the best single weight chosen on the
unannotated voxels themselves (an oracle, the ceiling of any weight rule), and each model alone.
"""

from __future__ import annotations

import sys
from pathlib import Path


import numpy as np

from experiments.ablation.blend_rules import print_rule_table
from harness import IGNORE, volumes
from unet3d.data.labels import decode_labels
from unet3d.data.sparse import sparsify
from unet3d.evaluation import evaluate_volumes
from unet3d.workflows.blend import (
    BLEND_FLOOR,
    NETWORK_WEIGHTS,
    HeldOut,
    choose_network_weight,
    weighted_geometric_mean,
)

CHUNK = 1 << 20


def stacked(network: np.ndarray, forest: np.ndarray, held: HeldOut) -> np.ndarray:
    """Class scores of a logistic regression on both log-probability maps, fitted on the held-out voxels."""
    from sklearn.linear_model import LogisticRegression

    features = lambda voxels: np.log(np.concatenate([network.reshape(len(network), -1)[:, voxels],  # noqa: E731
                                                     forest.reshape(len(forest), -1)[:, voxels]]) + BLEND_FLOOR).T
    model = LogisticRegression(max_iter=500).fit(features(held.voxels), held.classes)
    flat = np.full((len(network), network[0].size), -np.inf, np.float32)
    for start in range(0, flat.shape[1], CHUNK):
        voxels = np.arange(start, min(start + CHUNK, flat.shape[1]))
        flat[model.classes_, start:start + voxels.size] = model.decision_function(features(voxels)).T
    return flat.reshape(network.shape)


def score_run(path: Path) -> dict:
    name, slices, seed, _ = path.stem.rsplit("_", 3)
    volume = volumes.load(name)
    sparse = sparsify(volume.truth, tuple(int(k) for k in slices.split(",")), IGNORE)
    saved = np.load(path)
    classes = [int(c) for c in saved["classes"]]
    network, forest = saved["network"].astype(np.float32), saved["forest"].astype(np.float32)
    held = HeldOut(saved["held_voxels"], saved["held_classes"])

    def score(probabilities: np.ndarray) -> float:
        labels = decode_labels(probabilities.argmax(0), classes)
        result = evaluate_volumes(labels, volume.truth, exclude=sparse, ignore_label=IGNORE,
                                  background=volume.background)
        return result["mean_iou_foreground"]

    weights = {w: score(weighted_geometric_mean(network, forest, w)) for w in NETWORK_WEIGHTS}
    chosen = choose_network_weight(network, forest, held).network_weight if len(held) else 0.5
    oracle = max(weights, key=weights.get)
    return {"held-out voxels": f"{len(held):,}", "equal weights": weights[0.5],
            "held-out weight (densify)": weights[chosen], "chosen": f"{chosen:.1f}",
            "held-out stacking": score(stacked(network, forest, held)) if len(held) else weights[0.5],
            "best weight (oracle)": weights[oracle], "oracle": f"{oracle:.1f}",
            "network alone": weights[1.0], "forest alone": weights[0.0]}


def main(paths: list[str]) -> None:
    print_rule_table({Path(p).stem: score_run(Path(p)) for p in paths}, "equal weights")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
