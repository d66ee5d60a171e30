"""densify as the volume grows: the serial-section EM stack mirrored along z, from 21 M voxels up.

Usage: .venv/bin/python -m benchmarks.bench_size [--copies 1 6] [--max-time 1800] [--slices 3,3,2]
           [--seed 0] [--max-memory 8G] [--results FILE.jsonl] [--quick]

`--copies N` stacks the 20×1024×1024 em_vnc volume (../shared/data, or UNET3D_SHARED_DATA) N times
along z, every other copy mirrored, so slices meet seamlessly: 1 is the 21 M-voxel stack, 6 the
126 M-voxel one. The image, the dense truth and the (Z, Y, X) = (3, 3, 2) evenly spaced sparse
slices are written as TIFF files; `unet3d densify` runs on them as a user types it (image, sparse
labels, output, ignore label, --max-time, --truth, the voxel spacing) under /usr/bin/time -v,
which gives the wall time and the peak resident memory. The row keeps what densify printed: the
route it took, the time plan, the blend's weight and the IoU of the unannotated voxels.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile

from benchmarks.records import append_row, find_row, load_rows
from harness import IGNORE, volumes
from unet3d.data.sparse import sparsify

UNET3D = Path(sys.executable).with_name("unet3d")


def stack(copies: int, side: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    volume = volumes.em_vnc()
    crop = (slice(None), slice(0, side), slice(0, side))
    image, truth = volume.image[0][crop], volume.truth.astype(np.uint8)[crop]
    pick = lambda a, i: a if i % 2 == 0 else a[::-1]  # noqa: E731
    return (np.concatenate([pick(image, i) for i in range(copies)]),
            np.concatenate([pick(truth, i) for i in range(copies)]))


def current_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def run(copies: int, max_time: float, slices, seed: int, folder: Path, side: int | None = None,
        max_memory: str | None = None) -> dict:
    image, truth = stack(copies, side)
    tifffile.imwrite(folder / "image.tif", image)
    tifffile.imwrite(folder / "truth.tif", truth)
    tifffile.imwrite(folder / "sparse.tif", sparsify(truth, slices, IGNORE).astype(np.uint8))
    voxels = int(image.size)
    del image, truth
    spacing = ",".join(f"{s:g}" for s in volumes.EM_VNC_SPACING)
    command = ["/usr/bin/time", "-v", str(UNET3D), "densify", str(folder / "image.tif"), str(folder / "sparse.tif"),
               "-o", str(folder / "seg.tif"), "--ignore-label", str(IGNORE), "--max-time", f"{max_time:g}",
               "--truth", str(folder / "truth.tif"), "--spacing", spacing, "--seed", str(seed), "--quiet",
               *(["--max-memory", max_memory] if max_memory else [])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return {"voxels": voxels, "error": (done.stdout + done.stderr).strip().splitlines()[-25:]}
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", done.stderr)
    hours, minutes, seconds = (float(g or 0) for g in wall.groups())
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    scores = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("json: "))[6:])
    wall_s = hours * 3600 + minutes * 60 + seconds
    return {"voxels": voxels, "wall_s": round(wall_s, 1), "peak_rss_gib": round(peak / 2**20, 2),
            "us_per_voxel": round(wall_s / voxels * 1e6, 2), "iou": scores,
            "printed": [line for line in done.stdout.splitlines() if not line.startswith("json: ")]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 6], help="em_vnc stacks along z, each a row")
    parser.add_argument("--max-time", type=float, default=1800.0, help="densify's --max-time")
    parser.add_argument("--slices", default="3,3,2", help="evenly spaced slices per axis, (Z, Y, X)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-memory", metavar="SIZE", help="densify's --max-memory (e.g. 8G; default: none given)")
    parser.add_argument("--results", type=Path,
                        help="JSON lines, appended; rows already there for this commit are not re-run")
    parser.add_argument("--quick", action="store_true", help="one copy cropped to 20×256×256, 30 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_time = 30.0
    if not (volumes.shared_data() / "em_vnc").exists():
        print(f"skipped: {volumes.shared_data() / 'em_vnc'} not found (set UNET3D_SHARED_DATA)")
        return
    slices = tuple(int(k) for k in args.slices.split(","))
    done = load_rows(args.results)
    rows = []
    for copies in ([1] if args.quick else args.copies):
        key = {"copies": copies, "max_time": args.max_time, "slices": args.slices, "seed": args.seed,
               "max_memory": args.max_memory, "commit": current_commit()}
        row = find_row(done, key)
        if row is None:
            with tempfile.TemporaryDirectory() as folder:
                row = {**key, **run(copies, args.max_time, slices, args.seed, Path(folder), 256 if args.quick else None,
                                    args.max_memory)}
            append_row(None if args.quick else args.results, row)
        rows.append(row)
    print("| voxels | --max-time | wall time | µs per voxel | peak RSS | foreground IoU (unannotated) | route |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['voxels']:,} | {r['max_time']:g} s | refused or failed: {r['error'][-1]} | | | | |")
            continue
        route = next((line for line in r["printed"] if line.startswith("result: ")), "")[8:]
        print(f"| {r['voxels']:,} | {r['max_time']:g} s | {r['wall_s']:.0f} s | {r['us_per_voxel']:.2f} "
              f"| {r['peak_rss_gib']:.1f} GiB | {r['iou']['mean_iou_foreground']:.3f} | {route} |")


if __name__ == "__main__":
    main()
