"""The napari loop's preview as a user sees it: IoU of the slices in view against seconds since Train.

Usage: .venv/bin/python -m benchmarks.bench_interactive [--volumes nuclei_tiny ovule colin27] [--seconds 60]
           [--slices 2,3,3] [--seed 0] [--results FILE.jsonl] [--quick]

One round of `interactive.Session` (what the napari widget runs, without the GUI) on each volume,
painted with the paper's (x,y,z) = (3,3,2) slices of its ground truth — (Z, Y, X) = (2, 3, 3) —
and the viewer on the middle z-slice. The session opens first and Train is pressed once the
forest's filter bank, which the session makes in the background while the user paints, is made
(its time is printed: a user who paints for less waits the rest at the first Train). Every preview the round hands the widget is scored: IoU of
the previewed slab's unpainted voxels against the truth (the foreground classes; every class for
em_vnc). Two sessions per volume: the loop as it ships (its forest's preview first, then the
blend as the network learns) and the network alone (`Session(forest=False)`). The forest alone
is its first preview: it does not change during a round. Prints one row per preview time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.records import append_row, find_row, load_rows
from harness import volumes
from unet3d.data.sparse import sparsify
from unet3d.evaluation.metrics import confusion_matrix, scores
from unet3d.interactive.session import UNPAINTED, Session


def slab_iou(preview, volume, painted) -> float:
    mask = painted[preview.box] == UNPAINTED
    predicted = preview.labels[mask].astype(np.int64) - 1
    confusion = confusion_matrix(predicted, volume.truth[preview.box][mask], volume.num_classes)
    return round(scores(confusion, list(range(volume.num_classes)), background=volume.background)
                 ["mean_iou_foreground"], 4)


def one_round(volume, painted, seconds: float, forest: bool, seed: int) -> tuple[list[tuple[float, float]], float]:
    """(seconds since Train, preview IoU) of every preview of one round, and the seconds the
    filter bank took in the background before Train."""
    opened = time.monotonic()
    session = Session(volume.image, volume.spacing, seed=seed, forest=forest)
    session.wait_for_features()
    bank_seconds = round(time.monotonic() - opened, 1)
    points, started = [], time.monotonic()
    try:
        session.train_round(painted, seconds, view_z=lambda: volume.truth.shape[0] // 2,
                            on_preview=lambda p: points.append((round(time.monotonic() - started, 1),
                                                                slab_iou(p, volume, painted))))
    finally:
        session.close()
    return points, bank_seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volumes", nargs="+", default=["nuclei_tiny", "ovule", "colin27"])
    parser.add_argument("--seconds", type=float, default=60.0, help="the round's training budget")
    parser.add_argument("--slices", default="2,3,3", help="painted slices per axis, (Z, Y, X)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, help="JSON lines, appended; volumes already there are not re-run")
    parser.add_argument("--quick", action="store_true", help="the nuclei example, a 6 s round")
    args = parser.parse_args(argv)
    if args.quick:
        args.volumes, args.seconds = ["nuclei_tiny"], 6.0
    slices = tuple(int(k) for k in args.slices.split(","))
    done = load_rows(args.results)
    rows = []
    for name in args.volumes:
        key = {"volume": name, "seconds": args.seconds, "slices": args.slices, "seed": args.seed}
        row = find_row(done, key)
        if row is None:
            try:
                volume = volumes.load(name)
            except Exception as exc:  # noqa: BLE001 - a missing shared volume skips its row
                print(f"skipped {name}: {exc}")
                continue
            sparse = sparsify(volume.truth, slices, -1)
            painted = np.where(sparse >= 0, sparse + 1, UNPAINTED).astype(np.uint8)
            shown, bank_seconds = one_round(volume, painted, args.seconds, True, args.seed)
            row = {**key, "voxels": int(volume.truth.size), "shown": shown, "bank_seconds": bank_seconds,
                   "network_alone": one_round(volume, painted, args.seconds, False, args.seed)[0]}
            append_row(None if args.quick else args.results, row)
        rows.append(row)
    print("| volume | voxels | filter bank in the background | first preview (forest alone) | lowest shown "
          "− forest | shown at 50 % of the round | shown at the end | network alone: first preview | at 50 % "
          "| at the end |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        def at(points, fraction):
            """The preview shown `fraction` of the training budget after the round's first preview."""
            before = [p for p in points if p[0] <= points[0][0] + fraction * r["seconds"]] if points else []
            return f"{before[-1][1]:.3f} at {before[-1][0]:.0f} s" if before else "–"

        first = lambda points: f"{points[0][1]:.3f} at {points[0][0]:.1f} s" if points else "–"  # noqa: E731
        lowest = (f"{min(p[1] for p in r['shown']) - r['shown'][0][1]:+.3f}" if r["shown"] else "–")
        print(f"| {r['volume']} | {r['voxels']:,} | {r.get('bank_seconds', '–')} s | {first(r['shown'])} | {lowest} "
              f"| {at(r['shown'], 0.5)} | {at(r['shown'], 1.0)} "
              f"| {first(r['network_alone'])} | {at(r['network_alone'], 0.5)} | {at(r['network_alone'], 1.0)} |")


if __name__ == "__main__":
    main()
