"""Does shifting densify's probabilities until the predicted class fractions match the annotated
slices' fractions raise IoU? Scored offline on runs saved by forest_blend.py.

Usage: .venv/bin/python experiments/ablation/prior_matching.py FILE.npz...
  FILE.npz  written by `forest_blend.py ... save=FILE.npz`, named VOLUME_SLICES_sSEED.npz

The idea: if evenly spread, fully annotated slices sampled the volume without bias, the share of
each class on them would estimate its share of the whole volume (docs/ablation.md: on the MRI
crops they over-sample the hippocampus 2.2-2.6 times). The network, trained on class-balanced patches
with a class-weighted loss, and the forest, trained on a class-balanced draw of voxels, need not
predict those shares. Each rule adds one log-offset per class to the blend (Saerens et al. 2002,
with the target prior known instead of estimated) and takes the argmax:

- soft: the mean probability of each class over the volume equals its annotated share;
- hard: the share of voxels whose argmax is the class equals its annotated share;
- the same two with the volume's true shares (an oracle, to bound what the rule can give);
- hard, with the geometric mean of the network's and the forest's own (argmax) shares.

Prints one row per run (foreground IoU on the voxels no slice annotates) and the mean change of
each rule against densify's.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from experiments.ablation.blend_rules import load_run, print_rule_table
from experiments.paper.methods import IGNORE
from unet3d.workflows.blend import BLEND_FLOOR, geometric_mean


def class_shares(labels: np.ndarray, classes: list[int]) -> np.ndarray:
    counts = np.array([(labels == c).sum() for c in classes], np.float64)
    return counts / counts.sum()


def predicted_shares(log_probabilities: np.ndarray, offsets: np.ndarray, hard: bool) -> np.ndarray:
    shifted = log_probabilities + offsets[:, None]
    if hard:
        return np.bincount(shifted.argmax(0), minlength=len(offsets)) / shifted.shape[1]
    shifted = np.exp(shifted - shifted.max(0, keepdims=True))
    return (shifted / shifted.sum(0, keepdims=True)).mean(1)


def match_shares(probabilities: np.ndarray, target: np.ndarray, hard: bool, iterations: int = 60) -> np.ndarray:
    """Probabilities shifted by per-class log-offsets until their shares (soft or argmax) meet `target`."""
    log_probabilities = np.log(probabilities.reshape(len(target), -1) + BLEND_FLOOR)
    if hard:  # the argmax share is a step function of the offsets: every n-th voxel, 2 to 4 million, suffices
        step = max(1, log_probabilities.shape[1] // 2_000_000)
        sample = log_probabilities[:, ::step]
    else:
        sample = log_probabilities
    offsets = np.zeros(len(target))
    floor = 1e-6
    for _ in range(iterations):
        shares = predicted_shares(sample, offsets, hard)
        offsets += (0.5 if hard else 1.0) * (np.log(target + floor) - np.log(shares + floor))
        offsets -= offsets.mean()
    shifted = log_probabilities + offsets[:, None]
    shifted = np.exp(shifted - shifted.max(0, keepdims=True))
    return (shifted / shifted.sum(0, keepdims=True)).reshape(probabilities.shape)


def score_run(path: Path) -> dict[str, float]:
    run = load_run(path)
    blend = geometric_mean(run.network, run.forest)
    annotated = class_shares(run.sparse[run.sparse != IGNORE], run.classes)
    true = class_shares(run.volume.truth, run.classes)
    argmax_shares = lambda p: class_shares(p.argmax(0), list(range(len(run.classes))))  # noqa: E731
    between = np.sqrt(argmax_shares(run.network) * argmax_shares(run.forest))
    rules = {"densify": blend,
             "soft, annotated shares": match_shares(blend, annotated, hard=False),
             "hard, annotated shares": match_shares(blend, annotated, hard=True),
             "soft, true shares": match_shares(blend, true, hard=False),
             "hard, true shares": match_shares(blend, true, hard=True),
             "hard, the two models' mean shares": match_shares(blend, between / between.sum(), hard=True),
             "network, hard annotated": match_shares(run.network, annotated, hard=True),
             "network alone": run.network}
    scores = {rule: run.score(p)["mean_iou"] for rule, p in rules.items()}
    scores["shares (annotated / true / densify)"] = " / ".join(
        ",".join(f"{s:.3f}" for s in shares) for shares in (annotated, true, argmax_shares(blend)))
    return scores


def main(paths: list[str]) -> None:
    print_rule_table({Path(p).stem: score_run(Path(p)) for p in paths}, "densify")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
