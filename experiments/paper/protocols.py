"""The three protocols of the paper as lists of runs, and how one run is executed and scored.

slices     the table of annotated slices per axis: densify one volume from k slices per axis and
           score IoU on the voxels nobody annotated (unet3d_dense: all voxels labeled, all scored)
crossval   Table 1, semi-automatic: the (x,y,z) = (4,4,3) annotated slices of a volume dealt into
           three subsets; train on two, score the voxels of the third subset's slices that the
           training slices do not cover
automatic  Table 3, fully automatic: train on sparsely annotated volumes, segment unseen ones

Slice counts are written as the paper writes them, (x,y,z): "4,4,3" is 4 yz-slices (across x),
4 xz-slices and 3 xy-slices, i.e. (Z, Y, X) = (3, 4, 4) in the arrays. Every run has a seed (the
network's initialisation and patches, the forest's trees); the tables give mean ± sd over seeds.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from experiments.paper.methods import segment
from harness import IGNORE, volumes
from unet3d.data.sparse import labeled_fraction, positions_for, sparsify
from unet3d.evaluation import evaluate_volumes

EXPERIMENTS = ("slices", "crossval", "automatic")
SLICE_SETTINGS = ("1,1,1", "2,2,1", "3,3,2", "4,4,3")  # the paper's, (x,y,z)
FOLDS = 3
SEEDS = (0, 1, 2)


def zyx(setting: str) -> tuple[int, int, int]:
    """Slices per array axis (Z, Y, X) of a setting written as the paper writes it, (x,y,z)."""
    x, y, z = (int(k) for k in setting.split(","))
    return z, y, x


CROSSVAL_SLICES = zyx("4,4,3")  # 11 slices, dealt into 3 subsets of 4, 4 and 3
AUTOMATIC_SLICES = zyx("4,4,3")  # annotation of each training volume in the fully automatic protocol


@dataclass(frozen=True)
class Budget:
    """Training per network run: a number of steps (the same work on a busy or an idle machine),
    or wall seconds."""
    steps: int | None = None
    seconds: float | None = None

    def __str__(self) -> str:
        return f"{self.steps} steps" if self.steps else f"{self.seconds:g} s"


@dataclass(frozen=True)
class Run:
    experiment: str
    group: str  # the table the run belongs to: nuclei_tiny, ovule, hippocampus, em_vnc
    setting: str  # "4,4,3", "dense", "subset 2", "test em_vnc_q1", ...
    method: str
    train: tuple[str, ...]  # volumes whose annotation trains the method
    test: tuple[str, ...]  # volumes it segments and is scored on
    seed: int = 0

    @property
    def id(self) -> str:
        return "/".join((self.experiment, self.group, self.setting, self.method, "+".join(self.test), f"seed {self.seed}"))


def slice_runs(volumes: dict[str, list[str]], methods, settings=SLICE_SETTINGS, seeds=SEEDS) -> list[Run]:
    return [Run("slices", group, setting, method, (name,), (name,), seed)
            for seed in seeds for group, names in volumes.items() for name in names for method in methods
            for setting in (("dense",) if method == "unet3d_dense" else settings)]


def crossval_runs(volumes: dict[str, list[str]], methods, folds=range(FOLDS), seeds=SEEDS) -> list[Run]:
    return [Run("crossval", group, f"subset {fold + 1}", method, (name,), (name,), seed)
            for seed in seeds for group, names in volumes.items() for name in names for fold in folds
            for method in methods]


def automatic_runs(splits: dict[str, list[tuple[tuple[str, ...], tuple[str, ...]]]], methods, seeds=SEEDS) -> list[Run]:
    return [Run("automatic", group, f"test {'+'.join(test)}", method, train, test, seed)
            for seed in seeds for group, pairs in splits.items() for train, test in pairs for method in methods]


def em_vnc_splits() -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Each quarter held out once, the three others train."""
    quarters = [f"em_vnc_q{i}" for i in range(4)]
    return [(tuple(q for q in quarters if q != held_out), (held_out,)) for held_out in quarters]


def crossval_subsets(shape, slices=CROSSVAL_SLICES, folds: int = FOLDS) -> list[list[list[int]]]:
    """Positions per axis of each subset: the slices, axis by axis, dealt round-robin into `folds`."""
    subsets = [[[] for _ in shape] for _ in range(folds)]
    dealt = 0
    for axis, positions in enumerate(positions_for(shape, slices)):
        for position in positions:
            subsets[dealt % folds][axis].append(position)
            dealt += 1
    return subsets


def crossval_split(truth: np.ndarray, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """(training sparse labels: the other subsets' slices, mask of the voxels scored: the held-out
    subset's slices minus the voxels the training slices already label)."""
    subsets = crossval_subsets(truth.shape)
    training = [sorted(sum((subsets[f][axis] for f in range(len(subsets)) if f != fold), [])) for axis in range(3)]
    sparse = sparsify(truth, positions=training, ignore_label=IGNORE)
    held_out = sparsify(truth, positions=subsets[fold], ignore_label=IGNORE) != IGNORE
    return sparse, held_out & (sparse == IGNORE)


def execute(run: Run, budget: Budget, figures: Path | None = None) -> dict:
    """Train and score one run; returns its JSON record (and writes its overlay into `figures`)."""
    train_volumes = [volumes.load(name) for name in run.train]
    test_volumes = [v for v in train_volumes if v.name in run.test] or [volumes.load(name) for name in run.test]
    sparse, masks = _annotation(run, train_volumes)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="unet3d-paper-") as workdir:
        result = segment(run.method, train_volumes, sparse, test_volumes, budget.seconds, budget.steps, run.seed,
                         Path(workdir))
    seconds = time.perf_counter() - start
    scores = []
    for volume, labels in zip(test_volumes, result.labels):
        mask = masks.get(volume.name)
        scores.append(_score(volume, labels, mask))
        if figures is not None:
            _overlay(figures, run, volume, labels, result.class_values)
    return {
        "id": run.id, **asdict(run), "budget": str(budget),
        "labeled_fraction": float(np.mean([labeled_fraction(s, IGNORE) for s in sparse])),
        "scores": scores, "mean_iou": float(np.mean([s["mean_iou"] for s in scores])),
        "iterations": result.iterations, "seconds_train": round(result.seconds_train, 1),
        "seconds_predict": round(result.seconds_predict, 1), "seconds": round(seconds, 1),
    }


def _annotation(run: Run, volumes: list[volumes.Volume]) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Sparse training labels per training volume, and the scored voxels per test volume (all if absent)."""
    if run.method == "unet3d_dense":
        return [v.truth.astype(np.uint8) for v in volumes], {}
    if run.experiment == "slices":
        sparse = sparsify(volumes[0].truth, zyx(run.setting), ignore_label=IGNORE)
        return [sparse], {volumes[0].name: sparse == IGNORE}
    if run.experiment == "crossval":
        fold = int(run.setting.removeprefix("subset ")) - 1
        sparse, scored = crossval_split(volumes[0].truth, fold)
        return [sparse], {volumes[0].name: scored}
    return [sparsify(v.truth, AUTOMATIC_SLICES, ignore_label=IGNORE) for v in volumes], {}


def _score(volume: volumes.Volume, labels: np.ndarray, mask: np.ndarray | None) -> dict:
    """IoU per class on the scored voxels; the mean over foreground classes (every class for em_vnc)."""
    prediction, truth = (labels, volume.truth) if mask is None else (labels[mask], volume.truth[mask])
    result = evaluate_volumes(prediction, truth, background=volume.background)
    iou = {str(c["value"]): c["iou"] for c in result["classes"]}
    return {"volume": volume.name, "iou": iou, "mean_iou": result["mean_iou_foreground"], "voxels": result["voxels"]}


def _overlay(figures: Path, run: Run, volume: volumes.Volume, labels: np.ndarray, class_values) -> None:
    from unet3d.evaluation.figures import overlay_figure

    name = run.id.replace("/", "_").replace(",", "-").replace(" ", "-").replace("+", "-")
    overlay_figure(figures / f"{name}.png", volume.image, labels, class_values,
                   title=f"{run.method}, {run.experiment} {run.setting}: {volume.name}")
