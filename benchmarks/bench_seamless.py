"""Seamless tiles against blended windows for same-padding networks: work, memory, time, and
whether the result depends on the tile size.

Usage: .venv/bin/python -m benchmarks.bench_seamless [--shapes 64,256,256 ...] [--max-memory 1G]
           [--repeats 1] [--results FILE.jsonl] [--quick]

The network is the plan's (`unet3d train` and densify: width 8, 3 levels, same padding, batch
norm), random weights with trained-looking batch statistics (the arithmetic is what is
measured, not accuracy). For each volume shape and each mode — seamless (the default: output
tiles edge to edge, each read with the network's reach) and blended (`--overlap 0.25`, the
earlier default) — the tile chosen for the memory budget, the input voxels the network reads per
output voxel, the estimated peak (tile batch plus, for blended windows, the accumulators), and
the median wall time of `predict_array`. The last column predicts once more with the budget
halved (other tiles) and gives the largest difference in probability and the share of voxels
whose label changed: 0 means the result does not depend on the tiling.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from benchmarks.records import append_row, find_row, load_rows
from benchmarks.timing import median_time
from unet3d.cli.predict import memory_size
from unet3d.inference import choose_output_tile, estimate_tile_bytes, predict_array
from unet3d.inference.tiling import _input_shape, blend_bytes, blends, tiles_work
from unet3d.model import UNet, UNetConfig
from unet3d.model import unet

MODES = {"seamless": None, "blended (--overlap 0.25)": 0.25}


def plan_network(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    model = UNet(UNetConfig(in_channels=1, num_classes=3, width=8, levels=3, padding="same", norm="batch"))
    for module in model.modules():
        if isinstance(module, unet.TestTimeBatchNorm):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def measure(model: UNet, shape, budget: int, overlap, repeats: int) -> dict:
    config = model.config
    image = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
    tile = choose_output_tile(config, shape, budget, 1, overlap)
    peak = (estimate_tile_bytes(config, _input_shape(config, tile, overlap, shape))
            + (blend_bytes(config, shape, tile) if blends(config, overlap) else 0))
    seconds = median_time(lambda: predict_array(model, image, max_memory=budget, overlap=overlap), repeats)
    full = predict_array(model, image, max_memory=budget, overlap=overlap)
    other = predict_array(model, image, max_memory=budget // 2, overlap=overlap)
    return {"tile": list(tile), "work": round(tiles_work(config, shape, tile, overlap) / math.prod(shape), 2),
            "peak_mib": round(peak / 2**20), "seconds": round(seconds, 2),
            "other_tile": list(choose_output_tile(config, shape, budget // 2, 1, overlap)),
            "max_difference": float(np.abs(full - other).max()),
            "labels_changed": float((full.argmax(0) != other.argmax(0)).mean())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["64,256,256", "128,256,256"], help="volume shapes Z,Y,X")
    parser.add_argument("--max-memory", type=memory_size, default="1G", help="budget for one tile batch (default 1G)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--results", type=Path, help="JSON lines, appended; rows already there are not re-run")
    parser.add_argument("--quick", action="store_true", help="one small volume, a small budget")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.max_memory = ["24,48,40"], 64 << 20
    model, done, rows = plan_network(), load_rows(args.results), []
    for text in args.shapes:
        shape = tuple(int(n) for n in text.split(","))
        for mode, overlap in MODES.items():
            key = {"shape": list(shape), "mode": mode, "max_memory": args.max_memory,
                   "threads": torch.get_num_threads()}
            row = find_row(done, key)
            if row is None:
                row = {**key, **measure(model, shape, args.max_memory, overlap, args.repeats)}
                append_row(None if args.quick else args.results, row)
            rows.append(row)
    print("| volume | mode | tile | input voxels read per output voxel | estimated peak | seconds "
          "| tiles at half the budget | largest probability difference | labels changed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'×'.join(map(str, r['shape']))} | {r['mode']} | {'×'.join(map(str, r['tile']))} | {r['work']:.2f} "
              f"| {r['peak_mib']} MiB | {r['seconds']:.2f} | {'×'.join(map(str, r['other_tile']))} "
              f"| {r['max_difference']:.2g} | {100 * r['labels_changed']:.3f} % |")


if __name__ == "__main__":
    main()
