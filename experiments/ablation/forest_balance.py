"""Does a class-balanced forest make a better partner for the network in densify's blend?

Usage: .venv/bin/python experiments/ablation/forest_balance.py VOLUME SLICES SEED BUDGET [notta]

Runs `forest_blend.py` (densify's forest and network within BUDGET CPU seconds), then fits a second
forest of as many trees on the same annotated voxels and filter bank, with scikit-learn's
class_weight="balanced_subsample" (each tree weighs every class equally), outside the budget. The
network is the same in both blends, so the difference is the forest's alone. ilastik's forest,
the peer densify is compared with, stays unweighted. Prints one JSON line: forest_blend.py's, plus
the balanced forest's foreground IoU, alone and blended (`balanced`), and per class.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
from sklearn.ensemble import RandomForestClassifier

from experiments.ablation import forest_blend
from experiments.paper import data, protocols
from experiments.paper.methods import IGNORE
from unet3d.data.features import filter_features
from unet3d.baselines.forest import predict_probabilities, training_sample
from unet3d.data.labels import UNLABELED
from unet3d.data.labels import decode_labels, encode_labels
from unet3d.workflows.blend import geometric_mean
from unet3d.workflows.densify import FOREST_TRAIN_VOXELS


def balanced_forest(volume: data.Volume, sparse: np.ndarray, classes: list[int], seed: int, trees: int,
                    class_weight="balanced_subsample") -> np.ndarray:
    """(K, Z, Y, X) probabilities of a forest of `trees` trees on densify's bank, fitted on the
    kept slices `sparse`, class-balanced (`class_weight=None` gives densify's own forest back, as a check)."""
    bank = filter_features(volume.image, spacing=volume.spacing)
    labels = encode_labels(sparse, classes, IGNORE).reshape(-1)
    flat = bank.reshape(bank.shape[0], -1)
    voxels = training_sample(np.flatnonzero(labels != UNLABELED), FOREST_TRAIN_VOXELS, seed)
    forest = RandomForestClassifier(n_estimators=trees, n_jobs=1, random_state=seed,
                                    class_weight=class_weight).fit(flat[:, voxels].T, labels[voxels])
    return predict_probabilities(forest, flat, len(classes)).reshape((len(classes),) + sparse.shape)


def main(name: str, slices: str, seed: int, budget: float, tta: bool) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        saved = Path(folder) / "run.npz"
        result = forest_blend.main(name, slices, seed, budget, tta=tta, save=str(saved))
        probabilities = np.load(saved)
        network = probabilities["unet_tta" if tta else "unet"].astype(np.float32)
        classes = [int(c) for c in probabilities["classes"]]
    volume = data.load(name)
    sparse = protocols.sparsify(volume.truth, tuple(int(k) for k in slices.split(",")), ignore_label=IGNORE)
    forest = balanced_forest(volume, sparse, classes, seed, result["trees"])
    scores = {k: protocols._score(volume, decode_labels(p.argmax(0), classes), sparse == IGNORE)
              for k, p in {"balanced_forest": forest, "balanced": geometric_mean(network, forest)}.items()}
    result["fg_iou"] |= {k: round(v["mean_iou"], 4) for k, v in scores.items()}
    result["class_iou"] |= {k: {c: round(i, 3) for c, i in v["iou"].items()} for k, v in scores.items()}
    return result


if __name__ == "__main__":
    if len(sys.argv) not in (5, 6) or sys.argv[5:] not in ([], ["notta"]):
        sys.exit(__doc__)
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), "notta" not in sys.argv)))
