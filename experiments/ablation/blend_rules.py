"""Other ways to combine the U-Net's and the forest's probabilities, scored offline.

Usage: .venv/bin/python -m experiments.ablation.blend_rules FILE.npz...
  FILE.npz  written by `forest_blend.py ... save=FILE.npz`, named VOLUME_SLICES_sSEED.npz

For each saved run, scores (foreground IoU on the voxels no slice annotates) densify's rule, the
geometric mean of the two maps, against weighted geometric means and against smoothing the forest's
map, or the blend, with a Gaussian before the argmax (the forest classifies each voxel on its own,
so its map is speckled; the network's is not). The network's map is its test-time-flipped one where
the run saved it (densify flips where that is cheap: the small volumes). Prints one row per run and
the mean change of each rule against densify's.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple


import numpy as np
from scipy.ndimage import gaussian_filter

from experiments.paper import protocols
from harness import IGNORE, volumes
from unet3d.data.labels import decode_labels
from unet3d.workflows.blend import geometric_mean, weighted_geometric_mean


def smoothed(probabilities: np.ndarray, sigma: float, spacing) -> np.ndarray:
    """Each class map smoothed by a Gaussian of `sigma` voxels along the finest axis (fewer along coarser ones)."""
    finest = min(spacing)
    sigmas = [sigma * finest / s for s in spacing]
    return np.stack([gaussian_filter(p, sigmas) for p in probabilities])


RULES = {
    "geometric (densify)": lambda n, f, s: geometric_mean(n, f),
    "weighted, network 0.35": lambda n, f, s: weighted_geometric_mean(n, f, 0.35),
    "weighted, network 0.65": lambda n, f, s: weighted_geometric_mean(n, f, 0.65),
    "forest smoothed σ 0.7": lambda n, f, s: geometric_mean(n, smoothed(f, 0.7, s)),
    "forest smoothed σ 1.5": lambda n, f, s: geometric_mean(n, smoothed(f, 1.5, s)),
    "blend smoothed σ 1": lambda n, f, s: smoothed(geometric_mean(n, f), 1.0, s),
    "network alone": lambda n, f, s: n,
    "forest alone": lambda n, f, s: f,
}


class SavedRun(NamedTuple):
    volume: volumes.Volume
    sparse: np.ndarray  # the kept slices' labels, IGNORE elsewhere
    classes: list[int]
    network: np.ndarray  # (K, Z, Y, X) float32, test-time flipped where the run saved that
    forest: np.ndarray

    def score(self, probabilities: np.ndarray) -> dict:
        """IoU on the voxels no slice annotates of the most probable class."""
        labels = decode_labels(probabilities.argmax(0), self.classes)
        return protocols._score(self.volume, labels, self.sparse == IGNORE)


def load_run(path: Path) -> SavedRun:
    """A run saved by forest_blend.py, with its volume and kept slices (from the file's name)."""
    name, slices, _ = path.stem.rsplit("_", 2)
    volume = volumes.load(name)
    sparse = protocols.sparsify(volume.truth, tuple(int(k) for k in slices.split(",")), ignore_label=IGNORE)
    saved = np.load(path)
    network = saved["unet_tta"] if "unet_tta" in saved else saved["unet"]
    return SavedRun(volume, sparse, [int(c) for c in saved["classes"]], network.astype(np.float32),
                    saved["forest"].astype(np.float32))


def score_run(path: Path) -> dict[str, float]:
    run = load_run(path)
    spacing = run.volume.spacing or (1.0, 1.0, 1.0)
    return {rule: run.score(combine(run.network, run.forest, spacing))["mean_iou"] for rule, combine in RULES.items()}


def print_rule_table(rows: dict[str, dict], base: str) -> None:
    """A markdown row per run (IoU per rule; text cells as they are) and the mean change of each
    rule against `base`."""
    columns = list(next(iter(rows.values())))
    first = next(iter(rows.values()))
    print("| run | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for run, scores in rows.items():
        print(f"| {run} | " + " | ".join(v if isinstance(v, str) else f"{v:.3f}" for v in scores.values()) + " |")
    print("| mean change | " + " | ".join(
        "" if isinstance(first[c], str) else f"{np.mean([s[c] - s[base] for s in rows.values()]):+.3f}"
        for c in columns) + " |")


def main(paths: list[str]) -> None:
    print_rule_table({Path(p).stem: score_run(Path(p)) for p in paths}, "geometric (densify)")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
