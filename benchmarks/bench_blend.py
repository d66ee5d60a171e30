"""The unseen-half protocol: `unet3d train` on one half of a volume's sparse slices, scored on the
other half, for the network alone, the model's forest alone and the blend `unet3d predict` delivers.

Usage: .venv/bin/python -m benchmarks.bench_blend [--volumes ovule em_vnc] [--seeds 0 1] [--folds 0 1]
           [--max-time 300] [--slices 2,3,3] [--results FILE.jsonl] [--quick]

Each volume (../shared/data, or UNET3D_SHARED_DATA) is cut in two halves (`harness.volumes.half`:
the ovule across x, em_vnc across y, colin27 into hemispheres). Fold k trains on half k's paper
(x,y,z) = (3,3,2) slices — (Z, Y, X) = (2, 3, 3) — and scores every voxel of the other half.
`unet3d train` runs as a user types it (images, labels, ignore label, output, --max-time, --seed,
the voxel spacing where the volume has one); the three rows come from the one model file it
writes: its network alone, its forest alone, and the blend (what `unet3d predict` writes). The
peer in the same run is ilastik's forest as every benchmark runs it (`harness.forest`: 100 trees
on the 7-scale bank, fitted on the same annotated voxels, at most 100,000 of them). Every class counts in the mean
except the ovule's and colin27's background. Rows go to --results as JSON lines; a rerun skips
rows already there.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.records import append_row, find_row, load_rows
from harness import IGNORE, forest, volumes
from unet3d.data.sparse import sparsify
from unet3d.evaluation.metrics import confusion_matrix, scores
from unet3d.inference.predictor import predict_image
from unet3d.model import load_forest, load_model

UNET3D = Path(sys.executable).with_name("unet3d")


def mean_iou(labels: np.ndarray, volume) -> dict:
    confusion = confusion_matrix(labels, volume.truth, volume.num_classes)
    result = scores(confusion, list(range(volume.num_classes)), background=volume.background)
    return {"mean": round(result["mean_iou_foreground"], 4),
            "iou": {str(c["value"]): None if c["iou"] is None else round(c["iou"], 3) for c in result["classes"]}}


def run_train(train, test, slices, max_time: float, seed: int, folder: Path) -> dict:
    """`unet3d train` on `train`'s slices; the network, forest and blend on `test`."""
    np.save(folder / "image.npy", train.image)
    sparse = sparsify(train.truth, slices, IGNORE).astype(np.uint8)
    np.save(folder / "labels.npy", sparse)
    classes = ",".join(str(v) for v in np.unique(sparse) if v != IGNORE)  # a half may lack a rare class
    model = folder / "model.safetensors"
    spacing = ["--spacing", ",".join(f"{s:g}" for s in train.spacing)] if train.spacing else []
    started = time.monotonic()
    trained = subprocess.run([str(UNET3D), "train", "--images", str(folder / "image.npy"), "--labels",
                              str(folder / "labels.npy"), "--ignore-label", str(IGNORE), "-o", str(model),
                              "--max-time", f"{max_time:g}", "--seed", str(seed), "--classes", classes, "--quiet",
                              *spacing],
                             capture_output=True, text=True)
    if trained.returncode:
        raise SystemExit(f"unet3d train failed: {trained.stderr.strip().splitlines()[-1]}")
    seconds = time.monotonic() - started
    network, info = load_model(model)
    model_forest = load_forest(model, info)
    started = time.monotonic()
    network_p = predict_image(network, info, test.image)
    values = np.asarray(info.class_values)
    row = {"train_s": round(seconds, 1), "stdout": trained.stdout.strip().splitlines()[-3:],
           "network": mean_iou(values[network_p.argmax(0)], test)}
    if model_forest is not None:
        shape = test.image.shape[1:]
        forest_p = model_forest.region_probabilities(lambda box: test.image[(slice(None),) + box], shape)(
            tuple(slice(0, n) for n in shape))
        row["forest"] = mean_iou(values[forest_p.argmax(0)], test)
        row["blend"] = mean_iou(values[model_forest.blend(network_p, forest_p).argmax(0)], test)
        row["weight"] = model_forest.network_weight
    else:
        row["forest"] = row["blend"] = row["network"]
        row["weight"] = 1.0
    row["predict_s"] = round(time.monotonic() - started, 1)
    return row


def run_peer_forest(train, test, slices, seed: int) -> dict:
    sparse = sparsify(train.truth, slices, IGNORE)
    result = forest.segment([train], [sparse], [test], seed)
    return mean_iou(result.labels[0], test)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volumes", nargs="+", default=["ovule", "em_vnc"], choices=("ovule", "em_vnc", "colin27"))
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1], choices=(0, 1), help="the half trained on")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--max-time", type=float, default=300.0, help="train's --max-time (wall seconds)")
    parser.add_argument("--slices", default="2,3,3", help="slices per axis, (Z, Y, X): the paper's (x,y,z) = (3,3,2)")
    parser.add_argument("--results", type=Path, help="JSON lines, appended; rows already there are not re-run")
    parser.add_argument("--quick", action="store_true", help="the ovule, one fold, one seed, 20 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.volumes, args.folds, args.seeds, args.max_time = ["ovule"], [0], [0], 20.0
    slices = tuple(int(k) for k in args.slices.split(","))
    done = load_rows(args.results)
    rows = []
    for name in args.volumes:
        if not (volumes.shared_data() / name).exists():
            print(f"skipped {name}: {volumes.shared_data() / name} not found (set UNET3D_SHARED_DATA)")
            continue
        for fold in args.folds:
            train, test = volumes.load(f"{name}_h{fold}"), volumes.load(f"{name}_h{1 - fold}")
            peer = next((r["peer_forest"] for r in done if (r["volume"], r["fold"], r["slices"]) ==
                         (name, fold, args.slices)), None) or run_peer_forest(train, test, slices, 0)
            for seed in args.seeds:
                key = {"volume": name, "fold": fold, "seed": seed, "max_time": args.max_time, "slices": args.slices}
                row = find_row(done, key)
                if row is None:
                    with tempfile.TemporaryDirectory() as folder:
                        row = {**key, **run_train(train, test, slices, args.max_time, seed, Path(folder)),
                               "peer_forest": peer}
                    append_row(args.results, row)
                rows.append(row)
    print("| volume | trained on | seed | --max-time | network alone | model's forest alone | blend (weight) "
          "| blend − forest | ilastik forest, 100 trees |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['volume']} | half {r['fold']} | {r['seed']} | {r['max_time']:g} s | {r['network']['mean']:.3f} "
              f"| {r['forest']['mean']:.3f} | {r['blend']['mean']:.3f} ({r['weight']:.1f}) "
              f"| {r['blend']['mean'] - r['forest']['mean']:+.3f} | {r['peer_forest']['mean']:.3f} |")
    for name in dict.fromkeys(r["volume"] for r in rows):
        mine = [r for r in rows if r["volume"] == name]
        summary = {part: np.mean([r[part]["mean"] for r in mine]) for part in ("network", "forest", "blend")}
        peer = np.mean([r["peer_forest"]["mean"] for r in mine])
        print(f"{name}: mean over {len(mine)} runs — network {summary['network']:.3f}, model's forest "
              f"{summary['forest']:.3f}, blend {summary['blend']:.3f}, ilastik forest {peer:.3f}")


if __name__ == "__main__":
    main()
