"""Objects block by block against the whole volume at once: how many voxels and objects agree.

Usage: PYTHONPATH=. .venv/bin/python -m benchmarks.bench_instances_blockwise [--volumes nuclei_tiny ovule]
           [--blocks 32 64] [--halos 16 32] [--results FILE.jsonl] [--quick]

Per volume (nuclei_tiny with kind nuclei, the ovule with kind cells) two probability maps made from
the dense class truth without training: its one-hot ("oracle", plateaus and ties everywhere) and the
one-hot blurred by a Gaussian of 1 voxel and renormalised ("blurred", soft borders as a network
draws them). Each goes through `instances_from_probabilities` (whole volume) and
`instances_blockwise` with cubic blocks of each size and each halo. Per pair: the share of voxels
with the same label, the share of the whole volume's objects found with exactly the same voxels, the
object counts, the seconds of each, and the whole volume's AP at IoU 0.5 and 0.75 on the voxels
the paper's (3,3,2) slices leave unannotated (`bench_instances`' oracle rows score the same way).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from benchmarks.bench_instances import VOLUME_KIND, one_hot, score
from benchmarks.records import append_row
from harness import IGNORE, volumes
from unet3d.data.sparse import sparsify
from unet3d.instances import KINDS, instances_blockwise, instances_from_probabilities

VOLUMES = ("nuclei_tiny", "ovule")


def probability_maps(truth: np.ndarray, classes: list[int]) -> dict[str, np.ndarray]:
    exact = one_hot(truth, classes)
    smooth = np.stack([ndimage.gaussian_filter(p, 1.0) for p in exact])
    return {"oracle": exact, "blurred": smooth / smooth.sum(0)}


def agreement(whole: np.ndarray, blocks: np.ndarray) -> dict:
    """Shares of equal voxels and of the whole volume's objects that the blocks reproduce exactly."""
    pairs, counts = np.unique(np.stack([whole.ravel(), blocks.ravel()]), axis=1, return_counts=True)
    sizes, other = np.bincount(whole.ravel()), np.bincount(blocks.ravel())
    exact = [(a, b) for (a, b), n in zip(pairs.T, counts) if a and b and n == sizes[a] == other[b]]
    return {"equal_voxels": round(float((whole == blocks).mean()), 6), "objects_whole": int(whole.max()),
            "objects_blocks": int(blocks.max()), "equal_objects": round(len(exact) / max(int(whole.max()), 1), 4)}


def measure(name: str, blocks: list[int], halos: list[int], results: Path | None) -> list[dict]:
    volume, truth = volumes.load(name), volumes.instance_truth(name)
    mask = sparsify(volume.truth, (3, 3, 2), IGNORE) == IGNORE
    classes = sorted(int(v) for v in np.unique(volume.truth))
    method, rows = KINDS[VOLUME_KIND[name]], []
    for source, probabilities in probability_maps(volume.truth, classes).items():
        started = time.monotonic()
        whole = instances_from_probabilities(probabilities, classes, method, spacing=volume.spacing)
        whole_s, scores = time.monotonic() - started, score(whole, truth, mask)
        for block in blocks:
            for halo in halos:
                started = time.monotonic()
                labels = instances_blockwise(probabilities, classes, method, spacing=volume.spacing,
                                             block=(block,) * 3, halo=halo)
                row = {"volume": name, "shape": list(whole.shape), "kind": VOLUME_KIND[name], "source": source,
                       "block": block, "halo": halo, **agreement(whole, labels), "whole_s": round(whole_s, 2),
                       "blocks_s": round(time.monotonic() - started, 2), "ap50": scores["ap50"], "ap75": scores["ap75"]}
                append_row(results, row)
                rows.append(row)
    return rows


def print_rows(rows: list[dict]) -> None:
    print("| volume | probabilities | block | halo | equal voxels | equal objects | objects (whole / blocks) "
          "| s (whole / blocks) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['volume']} | {r['source']} | {r['block']}³ | {r['halo']} | {r['equal_voxels']:.4%} "
              f"| {r['equal_objects']:.1%} | {r['objects_whole']} / {r['objects_blocks']} "
              f"| {r['whole_s']:.1f} / {r['blocks_s']:.1f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volumes", nargs="+", default=list(VOLUMES), choices=VOLUMES)
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 64], help="cubic block edges, voxels")
    parser.add_argument("--halos", type=int, nargs="+", default=[16, 32], help="halos, voxels")
    parser.add_argument("--results", type=Path, help="JSON lines, appended")
    parser.add_argument("--quick", action="store_true", help="nuclei_tiny, one block size and halo: keeps this script working")
    args = parser.parse_args(argv)
    if args.quick:
        args.volumes, args.blocks, args.halos, args.results = ["nuclei_tiny"], [16], [16], None
    rows = []
    for name in args.volumes:
        if not (volumes.shared_data() / name).exists():  # the instance truth, nuclei_tiny's too, lives there
            print(f"skipped {name}: {volumes.shared_data() / name} not found (set UNET3D_SHARED_DATA)")
            continue
        rows += measure(name, args.blocks, args.halos, args.results)
    print_rows(rows)


if __name__ == "__main__":
    main()
