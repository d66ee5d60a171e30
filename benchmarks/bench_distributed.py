"""Prediction on a local Dask cluster: throughput, scaling from 1 to 2 workers, peak memory per worker.

A synthetic uint16 volume (smooth waves plus noise, written chunk by chunk as OME-Zarr) is predicted
by a small valid-padding network (width 4, 3 levels, random weights: the speed does not depend on
them) on a LocalCluster of 1, then 2 worker processes with one thread each, into a fresh OME-Zarr
store each time (the time of the blocks' pass; each worker has passed one tile through the network
before it, as every run does). Peak memory is each worker process's VmHWM after its run (Python, PyTorch and
Dask included), the largest over the workers; the client's own peak is printed too.

    .venv/bin/python -m benchmarks.bench_distributed            # 512×1024×1024 voxels, default 256³ blocks
    .venv/bin/python -m benchmarks.bench_distributed --quick    # 64×256×256, 64×128×128 blocks (CI, ~1 min)
    .venv/bin/python -m benchmarks.bench_distributed --results benchmarks/records/distributed.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_size import current_commit
from benchmarks.records import append_row
from unet3d.inference.distributed import DEFAULT_BLOCK, predict_distributed
from unet3d.io import volume_writer
from unet3d.model import UNet, UNetConfig, save_model

FULL = {"shape": (512, 1024, 1024), "block": (DEFAULT_BLOCK,) * 3}
QUICK = {"shape": (64, 256, 256), "block": (64, 128, 128)}
CHUNK = 128


def peak_mib() -> float:
    """This process's peak resident memory (VmHWM)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def write_synthetic(path: str, shape) -> None:
    """Smooth waves plus noise, chunk by chunk: the volume is never held in memory."""
    rng = np.random.default_rng(0)
    with volume_writer(path, shape, np.uint16, chunks=(CHUNK,) * 3) as writer:
        for corner in itertools.product(*(range(0, n, CHUNK) for n in shape)):
            region = tuple(slice(c, min(c + CHUNK, n)) for c, n in zip(corner, shape))
            z, y, x = np.ogrid[region]
            waves = np.sin(z / 9.0) + np.sin(y / 13.0) * np.cos(x / 11.0)
            noise = rng.normal(scale=0.3, size=tuple(s.stop - s.start for s in region))
            writer.write(region, (1000 + 400 * (waves + noise)).astype(np.uint16))


def save_network(path: str) -> None:
    torch.manual_seed(0)
    model = UNet(UNetConfig(in_channels=1, num_classes=3, width=4, levels=3, padding="valid"))
    normalization = {"method": "zscore", "channels": 1, "offset": [1000.0], "scale": [400.0]}
    save_model(path, model, {"class_values": [0, 1, 2], "normalization": normalization})


def run(workers: int, model: str, image: str, output: str, block) -> dict:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit=0,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        summary = predict_distributed(client, model, image, output, block=block)
        summary["worker_peak_mib"] = max(client.run(peak_mib).values())
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small volume, for CI (about a minute)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="cluster sizes to measure (default 1 2)")
    parser.add_argument("--results", type=Path, help="JSON-lines file the rows are appended to, with the commit")
    args = parser.parse_args()
    setting = QUICK if args.quick else FULL
    shape, block = setting["shape"], setting["block"]
    with tempfile.TemporaryDirectory(prefix="bench_distributed.") as folder:
        model, image = f"{folder}/model.safetensors", f"{folder}/image.zarr"
        save_network(model)
        began = time.perf_counter()
        write_synthetic(image, shape)
        print(f"volume {'×'.join(map(str, shape))} uint16 ({math.prod(shape) * 2 / 2**30:.2f} GiB) written in "
              f"{time.perf_counter() - began:.0f} s; network width 4, 3 levels, valid padding, "
              f"{torch.get_num_threads()} CPU threads here, 1 per worker")
        rows = [(workers, run(workers, model, image, f"{folder}/out{workers}.zarr", block)) for workers in args.workers]
    report(rows, shape)
    print(f"client peak memory: {peak_mib():.0f} MiB")
    for workers, summary in rows:
        append_row(None if args.quick else args.results,
                   {"commit": current_commit(), "shape": list(shape), "workers": workers, "threads": torch.get_num_threads(),
                    "client_peak_mib": round(peak_mib()), **json_ready(summary)})


def json_ready(summary: dict) -> dict:
    """The summary's numbers and tuples as JSON takes them."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in summary.items()
            if isinstance(v, (int, float, str, tuple, list, bool))}


def report(rows, shape) -> None:
    first = rows[0][1]
    tile = "×".join(map(str, first["output_tile"]))
    block = "×".join(map(str, first["block"]))
    print(f"\nblocks of {block} ({first['blocks']}), output tiles of {tile} (input "
          f"{'×'.join(map(str, first['input_tile']))})")
    print(f"{'workers':>7} {'predict s':>10} {'pyramid s':>10} {'voxels/s':>12} {'per worker':>11} {'efficiency':>10} "
          f"{'peak MiB/worker':>16}")
    base = first["voxels_per_second"] / rows[0][0]
    for workers, summary in rows:
        rate = summary["voxels_per_second"]
        print(f"{workers:>7} {summary['seconds']:>10.1f} {summary['pyramid_seconds']:>10.1f} "
              f"{rate:>12,.0f} {rate / workers:>11,.0f} {rate / workers / base:>10.0%} "
              f"{summary['worker_peak_mib']:>16.0f}")


if __name__ == "__main__":
    main()
