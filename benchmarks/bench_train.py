"""Fully automatic segmentation: `unet3d train` on sparse slices of some volumes, scored on unseen ones.

Usage: .venv/bin/python -m benchmarks.bench_train [--quick] [--dataset hippocampus|em_vnc] [--fold K]
           [--train-cases 40] [--test-cases 40] [--max-time 600 ... | --steps 2000 ...] [--slices 2,3,3]
           [--dense] [--seed 0]
           [--train-options "--width 16"] [--peers nnunet [--nnunet-no-tta]] [--results FILE.jsonl]

MSD Hippocampus (../shared/data/hippocampus, or UNET3D_SHARED_DATA): a seeded permutation of the
cases gives the training cases and the unseen ones; IoU per class and the foreground mean
(anterior, posterior) on every voxel of the unseen cases. em_vnc: leave one quarter of the
20×1024×1024 EM stack out (`--fold`), train on the other three; every class counts in the mean.
Training labels keep the paper's (x,y,z) = (3,3,2) slices of each training volume — 3 yz-, 3 xz-
and 2 xy-slices, (Z, Y, X) = (2, 3, 3) — (`--dense`: every voxel, the upper bound). `unet3d train`
runs as a user types it: images, labels, ignore label, output, `--max-time` (wall seconds, all
cores; `--steps`: `--iterations` instead, the same work however busy the machine is) and the voxel spacing where the volume has one, nothing else: its plan decides the rest
(printed); `--train-options` adds options, to measure a choice of the plan against another.
`unet3d predict` segments each unseen volume. The peer in the same run: ilastik's random forest
(100 trees on the 7-scale filter bank of each volume, standardized on its own statistics),
fitted on the same annotated voxels (a seeded sample of at most 100,000), predicting the same
unseen volumes. `unet3d predict` blends the network with the forest `train` stored beside it;
the network alone is scored too. `--peers nnunet`: nnU-Net v2 (3d_fullres, its own plan) trained on
the same sparse labels for the same `--max-time` wall seconds, predicting the same unseen volumes
(benchmarks/peers/nnunet.py; needs `bash benchmarks/peers.sh`). Rows go to `--results` as JSON
lines; a rerun skips the rows already there (and adds only a peer a row lacks).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.peers import nnunet
from harness import IGNORE, forest, volumes
from unet3d.data.sparse import sparsify
from unet3d.evaluation.metrics import confusion_matrix, scores
from unet3d.inference.predictor import predict_image
from unet3d.model import load_model

UNET3D = Path(sys.executable).with_name("unet3d")


def split_cases(dataset: str, train: int, test: int, seed: int, fold: int) -> tuple[list[str], list[str]]:
    """Volume names (`harness.volumes.load`) to train on and to score on."""
    if dataset == "em_vnc":
        return [f"em_vnc_q{i}" for i in range(4) if i != fold], [f"em_vnc_q{fold}"]
    cases = volumes.hippocampus_names()
    if len(cases) < train + test:
        raise SystemExit(f"{len(cases)} hippocampus cases found, {train + test} needed")
    order = np.random.default_rng(seed).permutation(len(cases))
    return [cases[i] for i in order[:train]], [cases[i] for i in order[train:train + test]]


def foreground_scores(confusion: np.ndarray, background: int | None) -> dict:
    result = scores(confusion, list(range(len(confusion))), background=background)
    return {"fg": round(result["mean_iou_foreground"], 4),
            "iou": {str(c["value"]): round(c["iou"], 3) for c in result["classes"]}}


def run_unet(train_cases, test_cases, slices, budget: list[str], folder: Path, options: list[str]) -> dict:
    images, labels = [], []
    for case in train_cases:
        volume = volumes.load(case)
        np.save(folder / f"{case}_image.npy", volume.image)
        np.save(folder / f"{case}_labels.npy", volume.truth.astype(np.uint8) if slices is None
                else sparsify(volume.truth, slices, IGNORE).astype(np.uint8))
        images.append(str(folder / f"{case}_image.npy"))
        labels.append(str(folder / f"{case}_labels.npy"))
    model = folder / "model.safetensors"
    spacing = ["--spacing", ",".join(f"{s:g}" for s in volume.spacing)] if volume.spacing else []
    start = time.monotonic()
    trained = subprocess.run([str(UNET3D), "train", "--images", *images, "--labels", *labels, "--ignore-label",
                              str(IGNORE), "-o", str(model), *budget, "--quiet", *spacing, *options],
                             capture_output=True, text=True, check=True)
    seconds = time.monotonic() - start
    best = model.with_name("model.best.safetensors")
    chosen = best if best.exists() else model
    network, info = load_model(chosen)
    confusion, alone, predict_seconds = 0, 0, 0.0
    for case in test_cases:
        volume = volumes.load(case)
        np.save(folder / "test.npy", volume.image)
        start = time.monotonic()
        subprocess.run([str(UNET3D), "predict", str(chosen), str(folder / "test.npy"),
                        "-o", str(folder / "prediction.npy"), "--quiet"], capture_output=True, text=True,
                       check=True)
        predict_seconds += time.monotonic() - start
        confusion = confusion + confusion_matrix(np.load(folder / "prediction.npy"), volume.truth, volume.num_classes)
        alone = alone + confusion_matrix(predict_image(network, info, volume.image).argmax(0), volume.truth,
                                         volume.num_classes)
    steps = int(trained.stdout.split("trained ")[-1].split()[0])
    return {**foreground_scores(confusion, volume.background), "s": round(seconds, 1), "steps": steps,
            "predict_s": round(predict_seconds, 1),
            "network_alone": foreground_scores(alone, volume.background),
            "network_weight": (info.forest or {}).get("network_weight", 1.0),
            "plan": trained.stdout.strip().splitlines(),
            "model": "best on the held-out training cases" if best.exists() else "last"}


def forest_on_unseen(train_cases, test_cases, slices, seed: int) -> dict:
    """The forest peer (`harness.forest`) fitted on the training cases, each scan standardized on its own."""
    start = time.monotonic()
    train_volumes, test_volumes = [volumes.load(c) for c in train_cases], [volumes.load(c) for c in test_cases]
    sparse = [v.truth if slices is None else sparsify(v.truth, slices, IGNORE) for v in train_volumes]
    result = forest.segment(train_volumes, sparse, test_volumes, seed)
    confusion = sum(confusion_matrix(labels, volume.truth, volume.num_classes)
                    for labels, volume in zip(result.labels, test_volumes))
    return {**foreground_scores(confusion, test_volumes[0].background), "s": round(time.monotonic() - start, 1)}


def run_nnunet(dataset: str, train_cases, test_cases, slices, seconds: float, folder: Path, tta: bool) -> dict:
    """nnU-Net v2 on the same sparse labels for the same wall seconds (benchmarks/peers/nnunet.py)."""
    result = nnunet.run(dataset, train_cases, test_cases, slices, IGNORE, seconds, folder, tta)
    background = volumes.load(test_cases[0]).background
    return {**foreground_scores(result.pop("confusion"), background), **result}


def network_alone(result: dict) -> str:
    """The network alone's mean IoU, and the network's weight in the blend (rows from before the
    forest joined the model: not measured)."""
    if "network_alone" not in result:
        return "–"
    return f"{result['network_alone']['fg']:.3f} (weight {result['network_weight']:.1f})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=("hippocampus", "em_vnc"), default="hippocampus",
                        help="em_vnc: train on three quarters of the EM stack, score the fourth (--fold)")
    parser.add_argument("--fold", type=int, default=3, choices=range(4), help="em_vnc: the quarter left out")
    parser.add_argument("--train-cases", type=int, default=40)
    parser.add_argument("--test-cases", type=int, default=40)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--max-time", type=float, nargs="+", default=[600.0], help="train's --max-time, each a row")
    budget.add_argument("--steps", type=int, nargs="+",
                        help="train's --iterations instead, each a row: comparisons that machine load cannot bias")
    parser.add_argument("--slices", default="2,3,3", help="slices per axis, (Z, Y, X): the paper's (x,y,z) = (3,3,2)")
    parser.add_argument("--dense", action="store_true", help="train on every voxel of the training cases")
    parser.add_argument("--seed", type=int, default=0, help="the split and the forest")
    parser.add_argument("--train-options", default="",
                        help="more options for `unet3d train`, e.g. \"--width 16 --seed 1\" (default: none, the plan)")
    parser.add_argument("--peers", nargs="*", default=[], choices=("nnunet",),
                        help="nnunet: also train nnU-Net v2 (3d_fullres) for each --max-time, from .venv-bench")
    parser.add_argument("--nnunet-no-tta", action="store_true",
                        help="nnU-Net predicts without its default test-time mirroring (8x faster; as unet3d predict)")
    parser.add_argument("--results", type=Path, help="JSON lines, appended; rows already there are not re-run")
    parser.add_argument("--quick", action="store_true", help="4 training cases, 2 unseen, 15 s: keeps this script working")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_cases, args.test_cases, args.max_time = 4, 2, [15.0]
    if not (volumes.shared_data() / args.dataset).exists():
        print(f"skipped: {volumes.shared_data() / args.dataset} not found (set UNET3D_SHARED_DATA)")
        return
    if args.dataset == "em_vnc":
        args.train_cases, args.test_cases = 3, 1
    slices = None if args.dense else tuple(int(k) for k in args.slices.split(","))
    labels = "dense" if args.dense else args.slices
    train_cases, test_cases = split_cases(args.dataset, args.train_cases, args.test_cases, args.seed, args.fold)
    done = ([json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
            if args.results and args.results.exists() else [])
    fold = args.fold if args.dataset == "em_vnc" else None
    same = lambda r: (r.get("dataset", "hippocampus"), r.get("fold"), r["labels"], r["train_cases"],  # noqa: E731
                      r["test_cases"], r["seed"]) == (args.dataset, fold, labels, args.train_cases, args.test_cases,
                                                      args.seed)
    forest = next((r["forest"] for r in done if same(r)), None) or forest_on_unseen(train_cases, test_cases, slices, args.seed)
    options = args.train_options.split()
    rows = []
    budgets = ([(f"{n} steps", ["--iterations", str(n)], None) for n in args.steps] if args.steps else
               [(f"{t:g} s", ["--max-time", f"{t:g}"], t) for t in args.max_time])
    peers = set(args.peers)
    if "nnunet" in peers:
        reason = nnunet.missing() or ("its trainer counts wall seconds (--max-time), not --steps" if args.steps
                                      else None)
        if reason:
            print(f"skipped nnU-Net: {reason}")
            peers.discard("nnunet")
    for label, budget, seconds in budgets:
        row = next((r for r in reversed(done) if same(r) and r["budget"] == label  # the latest: it may add a peer
                    and r.get("train_options", "") == args.train_options), None)
        fresh = row is None
        if fresh:
            with tempfile.TemporaryDirectory() as folder:
                unet = run_unet(train_cases, test_cases, slices, budget, Path(folder), options)
            row = {"dataset": args.dataset, "fold": fold, "labels": labels, "train_cases": args.train_cases, "test_cases": args.test_cases,
                   "seed": args.seed, "budget": label, "train_options": args.train_options,
                   "unet": unet, "forest": forest}
        if "nnunet" in peers and "nnunet" not in row:
            with tempfile.TemporaryDirectory() as folder:
                row = {**row, "nnunet": run_nnunet(args.dataset, train_cases, test_cases, slices, seconds,
                                                   Path(folder), tta=not args.nnunet_no_tta)}
            fresh = True
        if fresh and args.results:
            with args.results.open("a") as out:
                out.write(json.dumps(row) + "\n")
        rows.append(row)
    print("| dataset | labels | training cases | unseen cases | train options | budget | steps "
          "| unet3d train → predict: mean IoU (per class) | its network alone | forest: mean IoU (per class) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        background = "0" if r.get("dataset", "hippocampus") == "hippocampus" else None
        per_class = lambda result: " / ".join(  # noqa: E731
            f"{iou:.2f}" for value, iou in result["iou"].items() if value != background)
        u, f = r["unet"], r["forest"]
        print(f"| {r.get('dataset', 'hippocampus')} | {r['labels']} | {r['train_cases']} | {r['test_cases']} "
              f"| {r.get('train_options') or 'planned'} | {r['budget']} | {u['steps']} "
              f"| {u['fg']:.3f} ({per_class(u)}) | {network_alone(u)} | {f['fg']:.3f} ({per_class(f)}) |")
    if any("nnunet" in r for r in rows):
        print("\n| dataset | labels | training cases | unseen cases | budget | method | iterations | train s "
              "| predict s | mean IoU (per class) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            background = "0" if r.get("dataset", "hippocampus") == "hippocampus" else None
            peer = r.get("nnunet")
            peer_name = nnunet.METHOD + ("" if peer is None or peer.get("tta", True) else ", no mirroring")
            for method, result in (("unet3d train → predict", r["unet"]), (peer_name, peer)):
                if result is None:
                    continue
                per_class = " / ".join(f"{iou:.2f}" for value, iou in result["iou"].items() if value != background)
                train_s = (f"{result['s']:.0f} (+ {result['preprocess_s']:.0f} preprocessing)"
                           if "preprocess_s" in result else f"{result['s']:.0f}")
                predict_s = f"{result['predict_s']:.0f}" if "predict_s" in result else "–"
                print(f"| {r.get('dataset', 'hippocampus')} | {r['labels']} | {r['train_cases']} | {r['test_cases']} "
                      f"| {r['budget']} | {method} | {result['steps']} | {train_s} | {predict_s} "
                      f"| {result['fg']:.3f} ({per_class}) |")
    if rows:
        print("\nplan of the last run:\n" + "\n".join(rows[-1]["unet"]["plan"]))
        if "nnunet" in rows[-1]:
            print(f"{nnunet.METHOD}: " + "\n".join(rows[-1]["nnunet"]["plan"]))


if __name__ == "__main__":
    main()
