"""Would another classifier on the filter bank serve densify's blend better than ilastik's forest?

Usage: .venv/bin/python experiments/ablation/classifiers.py FILE.npz [CLASSIFIER,...]
  FILE.npz     written by `forest_blend.py VOLUME SLICES SEED BUDGET save=FILE.npz`, named
               VOLUME_SLICES_sSEED.npz: the network's probabilities of that densify run
  CLASSIFIER   forest (ilastik's: 100 trees), extra_trees (100 extremely randomized trees),
               boosting (scikit-learn's histogram gradient boosting, 100 rounds); default all

Each classifier is fitted on the same annotated voxels as densify's forest (at most 100,000, the
same seeded sample) of the same filter bank, on one thread, and predicts every voxel. Prints one
JSON line: per classifier its fit and prediction CPU seconds, foreground IoU (and IoU per class)
on the unannotated voxels alone and blended with the saved network (densify's geometric mean);
and the same for the saved run's own forest (densify's, grown within its share of the budget).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
from threadpoolctl import threadpool_limits

from experiments.ablation.blend_rules import load_run
from experiments.paper.methods import IGNORE
from unet3d.data.features import filter_features
from unet3d.baselines.forest import make_forest, predict_probabilities, training_sample
from unet3d.data.labels import UNLABELED, encode_labels
from unet3d.workflows.blend import geometric_mean
from unet3d.workflows.densify import FOREST_TRAIN_VOXELS


def classifier(name: str, seed: int):
    from sklearn.ensemble import ExtraTreesClassifier, HistGradientBoostingClassifier

    return {
        "forest": lambda: make_forest(100, seed, n_jobs=1),
        "extra_trees": lambda: ExtraTreesClassifier(100, n_jobs=1, random_state=seed),
        "boosting": lambda: HistGradientBoostingClassifier(max_iter=100, early_stopping=False, random_state=seed),
    }[name]()


def main(path: Path, names: list[str]) -> dict:
    run = load_run(path)
    seed = int(path.stem.rsplit("_s", 1)[1])
    bank = filter_features(run.volume.image, spacing=run.volume.spacing)
    features = bank.reshape(bank.shape[0], -1)
    labels = encode_labels(run.sparse, run.classes, IGNORE).reshape(-1)
    annotated = np.flatnonzero(labels != UNLABELED)
    voxels = training_sample(annotated, FOREST_TRAIN_VOXELS, seed)  # as densify's forest samples them
    result = {"run": path.stem, "annotated": int(annotated.size),
              "saved forest": {"alone": run.score(run.forest), "blend": run.score(geometric_mean(run.forest, run.network))}}
    for name in names:
        with threadpool_limits(1):
            start = time.process_time()
            model = classifier(name, seed).fit(features[:, voxels].T, labels[voxels])
            fitted = time.process_time()
            probabilities = predict_probabilities(model, features, len(run.classes)).reshape(run.forest.shape)
            predicted = time.process_time()
        result[name] = {"fit s": round(fitted - start, 1), "predict s": round(predicted - fitted, 1),
                        "alone": run.score(probabilities), "blend": run.score(geometric_mean(probabilities, run.network))}
    return result


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2].split(",") if len(sys.argv) == 3 else
                          ["forest", "extra_trees", "boosting"])))
