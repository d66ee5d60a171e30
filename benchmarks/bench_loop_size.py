"""The napari loop as the volume grows: a round's time and memory, 21 M → 126 M → 1 G voxels.

Usage: .venv/bin/python -m benchmarks.bench_loop_size [--copies 1 6 50] [--seconds 30] [--slices 3,3,2]
           [--rounds 1] [--results FILE.jsonl] [--quick]

Each row stacks the 20×1024×1024 em_vnc volume (../shared/data, or UNET3D_SHARED_DATA) `--copies`
times along z (as bench_size does), writes it as OME-Zarr and opens it as napari's reader opens
it (lazily above the in-memory size, `interactive.large.IN_MEMORY_VOXELS`), then, in a fresh
process so that its peak resident memory is its own: the session opens, one round of
`--seconds` trains on the painting of (3, 3, 2) evenly spaced slices of the dense truth (a
uint8 Labels layer, as a user's painting is held), previewing the view at the stack's middle
(`--rounds` rounds, each timed with the seconds before its first training step).
The row keeps the opening and the round's seconds, the whole-volume preview the widget shows
after a round held in memory, the previews' median time, the peak RSS and the IoU of the
unpainted voxels in the last preview (its box or slab). `--quick`: the 21 M row's
volume cropped to 256×256, a 5-second round.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_size import current_commit, stack
from benchmarks.records import append_row, find_row, load_rows
from harness import IGNORE
from unet3d.data.sparse import sparsify


def build(copies: int, slices, folder: Path, side: int | None) -> tuple[Path, Path, Path]:
    """The stack as OME-Zarr, its painting (napari's values: class + 1 on the slices, 0 elsewhere)
    and its truth as .npy files."""
    from unet3d.io import write_volume

    image, truth = stack(copies, side)
    write_volume(str(folder / "stack.ome.zarr"), image)
    del image
    sparse = sparsify(truth, slices, IGNORE)
    np.save(folder / "painting.npy", np.where(sparse == IGNORE, 0, sparse + 1).astype(np.uint8))
    np.save(folder / "truth.npy", truth)
    return folder / "stack.ome.zarr", folder / "painting.npy", folder / "truth.npy"


def measure(image_path: str, painting_path: str, truth_path: str, seconds: float, count: int) -> dict:
    """`count` rounds on the same painting in this process (run as `--child`)."""
    from unet3d.interactive.session import Session
    from unet3d.napari.io import read_layer

    data = read_layer(image_path)[0][0]
    painting = np.load(painting_path, mmap_mode="r")
    began = time.monotonic()
    session = Session(data)
    session.wait_for_features()
    opened = time.monotonic() - began
    previews, rounds = [], []
    middle = session.shape[0] // 2
    for _ in range(count):
        began, steps_at = time.monotonic(), []
        result = session.train_round(np.asarray(painting), seconds, on_preview=previews.append, view_z=lambda: middle,
                                     on_progress=lambda progress: steps_at.append(time.monotonic()))
        rounds.append({"round_s": round(time.monotonic() - began, 1), "steps": result.iterations,
                       "before_training_s": round(steps_at[0] - began, 1)})
    began = time.monotonic()
    if not session.large:  # after the last round the widget previews the whole volume; box by box, Segment volume does
        session.preview_volume()
    after_s = time.monotonic() - began
    last = previews[-1]
    truth = np.load(truth_path, mmap_mode="r")[last.box]
    unpainted = np.asarray(painting[last.box]) == 0
    predicted, expected = last.labels[unpainted].astype(np.int64) - 1, truth[unpainted].astype(np.int64)
    classes = [c for c in np.unique(expected) if c != 0]
    iou = np.mean([np.sum((predicted == c) & (expected == c)) / max(np.sum((predicted == c) | (expected == c)), 1)
                   for c in classes])
    return {"large": session.large, "open_s": round(opened, 1), "round_s": rounds[0]["round_s"],
            "whole_preview_s": round(after_s, 1), "rounds": rounds,
            "steps": rounds[0]["steps"], "previews": len(previews),
            "preview_median_s": round(float(np.median([p.seconds for p in previews])), 2),
            "preview_box": [b.stop - b.start for b in last.box], "preview_iou_unpainted": round(float(iou), 3),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def run(copies: int, seconds: float, slices, side: int | None, rounds: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="unet3d-loop-size-") as folder:
        paths = build(copies, slices, Path(folder), side)
        voxels = int(np.prod(np.load(paths[2], mmap_mode="r").shape))
        done = subprocess.run([sys.executable, "-m", "benchmarks.bench_loop_size", "--child", *map(str, paths),
                               "--seconds", str(seconds), "--rounds", str(rounds)], capture_output=True, text=True)
    if done.returncode:
        return {"voxels": voxels, "error": (done.stdout + done.stderr).strip().splitlines()[-20:]}
    return {"voxels": voxels, **json.loads(done.stdout.strip().splitlines()[-1])}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 6, 50], help="em_vnc stacks along z, each a row")
    parser.add_argument("--seconds", type=float, default=30.0, help="the round's budget (the widget's default)")
    parser.add_argument("--slices", default="3,3,2", help="painted slices per axis, (Z, Y, X), evenly spaced")
    parser.add_argument("--results", type=Path, help="JSON-lines file: rows kept, finished rows skipped")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds on the same painting (a later round reuses what the view's box made)")
    parser.add_argument("--quick", action="store_true", help="one cropped stack, a 5-second round")
    parser.add_argument("--child", nargs=3, metavar=("IMAGE", "PAINTING", "TRUTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child, args.seconds, args.rounds)))
        return
    slices = tuple(int(s) for s in args.slices.split(","))
    copies, seconds, side = ([1], 5.0, 256) if args.quick else (args.copies, args.seconds, None)
    rows = load_rows(None if args.quick else args.results)
    print(f"{'voxels':>14} {'route':>11} {'open s':>7} {'round s':>8} {'steps':>6} {'then whole s':>13} "
          f"{'preview s':>10} {'peak GiB':>9} {'IoU':>6}")
    for count in copies:
        key = {"copies": count, "seconds": seconds, "slices": list(slices), "side": side, "commit": current_commit(),
               **({"rounds": args.rounds} if args.rounds > 1 else {})}
        row = find_row(rows, key)
        if row is None:
            row = {**key, **run(count, seconds, slices, side, args.rounds)}
            append_row(None if args.quick else args.results, row)
        if "error" in row:
            print(f"{row['voxels']:>14,} failed: {row['error'][-1]}")
            continue
        print(f"{row['voxels']:>14,} {'box by box' if row['large'] else 'in memory':>11} {row['open_s']:>7} "
              f"{row['round_s']:>8} {row['steps']:>6} {row['whole_preview_s']:>13} {row['preview_median_s']:>10} {row['peak_rss_gib']:>9} "
              f"{row['preview_iou_unpainted']:>6}")
        for number, later in enumerate(row.get("rounds", [])[1:], 2):
            print(f"{'':>14} {'round ' + str(number):>11} {'':>7} {later['round_s']:>8} {later['steps']:>6}")
        if "rounds" in row:
            print(f"{'':>14} {'before training s, round by round:':>34} "
                  f"{', '.join(str(r['before_training_s']) for r in row['rounds'])}")


if __name__ == "__main__":
    main()
