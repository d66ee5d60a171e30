"""Densifying sparse slices with the ilastik-style random forest: IoU on unannotated voxels and time.

Usage: .venv/bin/python -m benchmarks.bench_forest [--quick] [--datasets nuclei_tiny,ovule,em_vnc,hippocampus]
                                                   [--slices 1,1,1 3,3,2] [--max-train-voxels N]

The paper's protocol: keep the ground truth on a few orthogonal slices (k per axis, evenly spread),
train on those voxels only, and score IoU per class on every voxel that was not kept; the mean is
over foreground classes (all but class 0). em_vnc is its first 20×512×512 quarter with its
anisotropic voxel size; hippocampus averages the first cases (5, or 2 with --quick). The last
column repeats what a stand-in of ilastik is reported to reach on the same protocol.
Times are wall-clock seconds and depend on how busy the machine's cores are.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from harness import IGNORE, volumes
from unet3d.baselines import random_forest_segment
from unet3d.data.labels import encode_labels
from unet3d.data.sparse import labeled_fraction, sparsify
from unet3d.evaluation.metrics import evaluate_volumes

REPORTED_STAND_IN = {  # mean foreground IoU of an ilastik stand-in on the same protocol
    "nuclei_tiny": {(1, 1, 1): 0.34, (4, 4, 3): 0.47},
    "ovule": {(1, 1, 1): 0.56, (4, 4, 3): 0.58},
    "hippocampus": {(1, 1, 1): 0.35, (4, 4, 3): 0.54},
    "em_vnc": {(1, 1, 1): 0.39},
}


def load_cases(name: str, hippocampus_cases: int) -> list[volumes.Volume]:
    """The volumes of one dataset: em_vnc is its first quarter, hippocampus its first cases."""
    if name == "hippocampus":
        return [volumes.load(case) for case in volumes.hippocampus_names()[:hippocampus_cases]]
    return [volumes.load("em_vnc_q0" if name == "em_vnc" else name)]


def run_case(image, truth, spacing, slices, max_train_voxels) -> dict:
    num_classes = int(truth.max()) + 1
    sparse = sparsify(truth, slices, ignore_label=IGNORE)
    indices = encode_labels(sparse, range(num_classes), IGNORE)
    start = time.perf_counter()
    result = random_forest_segment(image, indices, spacing=spacing, max_train_voxels=max_train_voxels)
    scores = evaluate_volumes(result.labels, truth, sparse, IGNORE)
    ious = {c["value"]: c["iou"] for c in scores["classes"]}
    return {
        "ious": [ious.get(c) for c in range(num_classes)],
        "foreground": scores["mean_iou_foreground"],
        "labeled": labeled_fraction(sparse, IGNORE),
        "seconds": (result.seconds_features, result.seconds_fit, result.seconds_predict, time.perf_counter() - start),
    }


def combine(runs: list[dict]) -> dict:
    """Mean IoUs over cases (classes absent from a case left out), summed times."""
    classes = max(len(r["ious"]) for r in runs)
    per_class = [[r["ious"][c] for r in runs if c < len(r["ious"]) and r["ious"][c] is not None] for c in range(classes)]
    return {
        "ious": [float(np.mean(v)) if v else None for v in per_class],
        "foreground": float(np.mean([r["foreground"] for r in runs])),
        "labeled": float(np.mean([r["labeled"] for r in runs])),
        "seconds": tuple(np.sum([r["seconds"] for r in runs], axis=0)),
    }


def row(name: str, label: str, slices, result: dict) -> str:
    ious = " / ".join("–" if v is None else f"{v:.2f}" for v in result["ious"])
    reported = REPORTED_STAND_IN.get(name, {}).get(tuple(slices))
    times = " / ".join(f"{s:.1f}" for s in result["seconds"])
    return (f"| {label} | {','.join(map(str, slices))} | {100 * result['labeled']:.1f} | {ious} | "
            f"{result['foreground']:.3f} | {'–' if reported is None else f'{reported:.2f}'} | {times} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="nuclei_tiny and 2 hippocampus cases at 1,1,1 and 3,3,2")
    parser.add_argument("--datasets", help="comma-separated subset of nuclei_tiny,ovule,em_vnc,hippocampus")
    parser.add_argument("--slices", nargs="+", help="slice counts per axis, e.g. 1,1,1 3,3,2")
    parser.add_argument("--max-train-voxels", type=int, default=100_000,
                        help="random sample of the annotated voxels the forest trains on (default 100000)")
    args = parser.parse_args()
    datasets = args.datasets.split(",") if args.datasets else (
        ["nuclei_tiny", "hippocampus"] if args.quick else ["nuclei_tiny", "ovule", "em_vnc", "hippocampus"])
    slice_list = [tuple(int(k) for k in s.split(",")) for s in args.slices] if args.slices else (
        [(1, 1, 1), (3, 3, 2)] if args.quick else [(1, 1, 1), (2, 2, 1), (3, 3, 2), (4, 4, 3)])
    print(f"random forest, 100 trees, ilastik's filter bank, at most {args.max_train_voxels} training voxels\n")
    print("| dataset | slices | labeled % | IoU per class (unannotated voxels) | mean fg IoU | reported stand-in | "
          "s features / fit / predict / total |")
    print("|---|---|---|---|---|---|---|")
    for name in datasets:
        if name != "nuclei_tiny" and not (volumes.shared_data() / name).exists():
            print(f"| {name} | – | – | skipped: no volumes under {volumes.shared_data()} | – | – | – |", flush=True)
            continue
        cases = load_cases(name, 2 if args.quick else 5)
        label = f"{name} ({len(cases)} cases)" if name == "hippocampus" else name
        for slices in slice_list:
            result = combine([run_case(case.image, case.truth, case.spacing, slices, args.max_train_voxels)
                              for case in cases])
            print(row(name, label, slices, result), flush=True)


if __name__ == "__main__":
    main()
