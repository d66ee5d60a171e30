"""densify against ilastik's random forest, side by side on the same annotated voxels.

Usage: .venv/bin/python -m benchmarks.bench_densify [--quick] [--volumes ovule em_vnc_q0 colin27 ...]
           [--slices 3,3,2] [--max-time 600] [--seeds 0 1] [--results FILE.jsonl] [--save FOLDER] [--train]

Per volume and seed: keep the paper's evenly spread orthogonal slices of the dense truth (k per
axis, (Z, Y, X)); fit the forest peer (ilastik's recipe: 100 trees on the full 7-scale filter
bank, on a seeded sample of at most 100,000 annotated voxels as everywhere in this repository) and
run densify with its defaults and `--max-time`, as `unet3d densify` does (wall clock, all cores).
IoU on the unannotated voxels, per class and the mean over foreground classes (every class on
em_vnc, which has no background), and wall seconds. densify's own forest and network, and their
plain geometric mean where densify weighed the two, are scored from the same run.
`--train`: `unet3d train` with the same `--max-time` and nothing else (its plan), then `unet3d
predict`, on the same sparse volume: the fully automatic default should do at least as well as
densify's network, which trains on the same recipe for the share of the budget the forest leaves.
Rows go to `--results` as JSON lines; a rerun skips the rows already there (resumable); `--save`
keeps each run's probability maps for offline study.
Volumes: nuclei_tiny (bundled), ovule, em_vnc (whole), em_vnc_q0..3, colin27, hippocampus_NNN
(from ../shared/data or UNET3D_SHARED_DATA).
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

from harness import IGNORE, runs, volumes
from unet3d.data.sparse import sparsify


def recorded(run: dict) -> dict:
    """A run's scores as this benchmark's rows hold them: rounded, classes without a score left out,
    wall seconds ("s")."""
    return {"fg": round(run["foreground"], 4),
            "iou": {str(value): round(iou, 3) for value, iou in run["iou"].items() if iou is not None},
            "s": round(run["wall"], 1)}


def densify_recorded(run: dict) -> dict:
    """`recorded`, with what densify's run adds: each part's score (`harness.runs.run_densify`), its
    iterations, its forest's trees and how it weighed the blend."""
    return {**recorded(run), "parts": {name: round(fg, 4) for name, fg in run["parts"].items()},
            "iterations": run["iterations"], "trees": run["trees"], "blend": run["blend"]}


def run_train(volume: volumes.Volume, sparse: np.ndarray, max_time: float, seed: int) -> dict:
    """The fully automatic command on this one volume, as a user types it: `unet3d train` with only
    the budget (its plan decides the rest), then `unet3d predict` on the same volume."""
    unet3d = Path(sys.executable).with_name("unet3d")
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        image, labels, model, output = (Path(folder) / n for n in ("image.npy", "labels.npy", "m.safetensors", "out.npy"))
        np.save(image, volume.image.astype(np.float32))
        np.save(labels, sparse)
        spacing = ["--spacing", ",".join(f"{s:g}" for s in volume.spacing)] if volume.spacing else []
        subprocess.run([str(unet3d), "train", "--images", str(image), "--labels", str(labels), "--ignore-label",
                        str(IGNORE), "-o", str(model), "--max-time", f"{max_time:g}", "--seed", str(seed), "--quiet",
                        *spacing], check=True, capture_output=True, text=True)
        subprocess.run([str(unet3d), "predict", str(model), str(image), "-o", str(output), "--quiet"], check=True,
                       capture_output=True, text=True)
        segmentation = np.load(output)
    return recorded({**runs.score(volume, segmentation, sparse), "wall": time.monotonic() - start})


def measure(name: str, slices: tuple[int, ...], max_time: float, seed: int, save: Path | None = None,
            forest: dict | None = None, with_train: bool = False) -> dict:
    """One row; `forest`: the peer's scores from an earlier row on the same voxels (it does not
    depend on densify's recipe or budget), else it is fitted here."""
    volume = volumes.load(name)
    sparse = sparsify(volume.truth, slices, IGNORE)
    return {"volume": name, "slices": ",".join(map(str, slices)), "seed": seed, "max_time": max_time,
            "voxels": int(volume.truth.size), "annotated": round(float(np.mean(sparse != IGNORE)), 4),
            "forest": forest or recorded(runs.run_forest(volume, sparse, seed)),
            "densify": densify_recorded(runs.run_densify(volume, sparse, seed, save, max_time=max_time)),
            **({"train": run_train(volume, sparse, max_time, seed)} if with_train else {})}


def print_table(rows: list[dict]) -> None:
    print("| volume | voxels | slices | seed | annotated | forest (s) | densify (s) | lead | densify's network | "
          "densify's forest | equal weights | iterations | unet3d train (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f, d = r["forest"], r["densify"]
        parts = d["parts"]
        part = lambda k: f"{parts[k]:.3f}" if k in parts else "–"  # noqa: E731
        train = f"{r['train']['fg']:.3f} ({r['train']['s']:.0f})" if "train" in r else "–"
        print(f"| {r['volume']} | {r['voxels'] / 1e6:.1f} M | {r['slices']} | {r['seed']} | {100 * r['annotated']:.1f} % "
              f"| {f['fg']:.3f} ({f['s']:.0f}) | {d['fg']:.3f} ({d['s']:.0f}) | {d['fg'] - f['fg']:+.3f} "
              f"| {part('network')} | {part('forest')} | {part('equal weights')} | {d['iterations']} | {train} |")
    if rows:
        leads = [r["densify"]["fg"] - r["forest"]["fg"] for r in rows]
        print(f"\nmean lead over the forest: {np.mean(leads):+.3f} (min {min(leads):+.3f}) over {len(rows)} runs")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volumes", nargs="+", default=["ovule", "em_vnc_q0", "colin27"])
    parser.add_argument("--slices", default="3,3,2", help="k slices per axis, (Z, Y, X)")
    parser.add_argument("--max-time", type=float, default=600.0, help="densify's --max-time (wall seconds)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--results", type=Path, help="JSON lines, appended; rows already there are not re-run")
    parser.add_argument("--save", type=Path, metavar="FOLDER",
                        help="also keep densify's network and forest probabilities and its held-out voxels "
                        "(float16 .npz per run) for offline study of blend rules")
    parser.add_argument("--train", action="store_true",
                        help="also run `unet3d train` with the same --max-time (nothing else) on the volume and score "
                        "its prediction: the fully automatic default against densify's network")
    parser.add_argument("--quick", action="store_true", help="the bundled example at 10 s: keeps this script working")
    args = parser.parse_args(argv)
    if args.quick:
        args.volumes, args.max_time, args.seeds = ["nuclei_tiny"], 10.0, [0]
    slices = tuple(int(k) for k in args.slices.split(","))
    done = ([json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
            if args.results and args.results.exists() else [])
    rows = []
    for name in args.volumes:
        for seed in args.seeds:
            key = (name, args.slices, seed, args.max_time, "")  # rows of other recipes (older files) don't count
            row = next((r for r in done if (r["volume"], r["slices"], r["seed"], r["max_time"], r.get("recipe", ""))
                        == key and ("train" in r or not args.train)), None)
            if row is None:
                save = args.save / f"{name}_{args.slices}_s{seed}_t{args.max_time:g}.npz" if args.save else None
                if save:
                    args.save.mkdir(parents=True, exist_ok=True)
                forest = next((r["forest"] for r in done if (r["volume"], r["slices"], r["seed"])
                               == (name, args.slices, seed)), None)
                row = measure(name, slices, args.max_time, seed, save, forest, args.train)
                if args.results:
                    with args.results.open("a") as out:
                        out.write(json.dumps(row) + "\n")
            rows.append(row)
    print_table(rows)


if __name__ == "__main__":
    main()
