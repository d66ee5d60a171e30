"""Prediction speed and peak memory: unet3d's tiling vs MONAI's sliding_window_inference.

Every measurement runs in a fresh process (peak resident memory from ru_maxrss, minus the
process's memory before predicting), with the same network weights for both. MONAI lives in a
separate environment so the product's stays small:

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0 monai numpy scipy h5py tifffile
    .venv-bench/bin/pip install -e . --no-deps
    .venv-bench/bin/python benchmarks/bench_predict.py [--quick]

Also: `--streaming` measures peak memory of HDF5→HDF5 prediction of a volume several times
larger than the memory budget; `--memory-factor` measures the activation peak factor.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
OVULE = REPO.parent / "shared" / "data" / "ovule" / "ovule.h5"


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_volume(name: str, quick: bool) -> np.ndarray:
    """Normalized (1, Z, Y, X) float32: the real ovule stack, or a synthetic cube of blobs."""
    if name == "ovule":
        import h5py

        with h5py.File(OVULE, "r") as f:
            raw = f["raw"][:24, :64, :64] if quick else f["raw"][...]
        raw = raw.astype(np.float32)
    else:
        from scipy.ndimage import gaussian_filter

        n = 48 if quick else 160
        raw = gaussian_filter(np.random.default_rng(0).normal(size=(n, n, n)).astype(np.float32), 2)
    return ((raw - raw.mean()) / raw.std())[None]


def network(padding: str, width: int, levels: int):
    from unet3d.model import UNet, UNetConfig

    torch.manual_seed(0)
    return UNet(UNetConfig(in_channels=1, num_classes=2, width=width, levels=levels, padding=padding)).eval()


def measure_one(job: dict) -> dict:
    """Runs inside the child process: one predictor on one volume."""
    from unet3d.inference import predict_array
    from unet3d.inference.predictor import prepare_network

    torch.set_num_threads(job["threads"])
    image = load_volume(job["volume"], job["quick"])
    model = network(job["padding"], job["width"], job["levels"])
    before = rss_mib()
    began = time.perf_counter()
    if job["engine"] == "unet3d":
        predict_array(model, image, tile=job["tile"], overlap=0.25)
    else:
        from monai.inferers import sliding_window_inference

        net = prepare_network(model, torch.device("cpu"))  # same folded, channels-last network

        def predictor(x):
            return torch.softmax(net(x.contiguous(memory_format=torch.channels_last_3d)), dim=1)

        with torch.inference_mode():
            sliding_window_inference(torch.from_numpy(image)[None], job["tile"], 1, predictor, overlap=0.25, mode="gaussian")
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "voxels_per_second": math.prod(image.shape[1:]) / seconds, "peak_mib": rss_mib() - before}


def run_child(job: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def comparison(args) -> None:
    from unet3d.inference import choose_output_tile
    from unet3d.model import UNetConfig

    try:
        import monai  # noqa: F401
    except ImportError:
        print("MONAI is not installed in this environment: create .venv-bench as this script's docstring says; "
              "only unet3d rows are measured.\n")
        have_monai = False
    else:
        have_monai = True
    width, levels = (4, 3) if args.quick else (16, 4)
    volumes = ["ovule", "synthetic"]
    print(f"network width {width}, {levels} levels, 2 classes; {torch.get_num_threads()} threads; overlap 0.25 (Gaussian)\n")
    print("| volume | unet3d network | unet3d tiles (in→out) | unet3d voxels/s | unet3d peak MiB | MONAI network | MONAI roi | MONAI voxels/s | MONAI peak MiB | speed ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for volume in volumes:
        shape = load_volume(volume, args.quick).shape[1:]
        for padding in ("same", "valid"):
            config = UNetConfig(width=width, levels=levels, padding=padding, num_classes=2)
            tile = choose_output_tile(config, shape, (args.max_memory or (48 if args.quick else 512)) << 20)
            job = {"volume": volume, "quick": args.quick, "width": width, "levels": levels, "threads": args.threads}
            ours = run_child({**job, "engine": "unet3d", "padding": padding, "tile": tile})
            if padding == "valid":
                tile_in = config.geometry.input_shape_for_output(tile)
            else:
                tile_in = config.geometry.valid_input_shape(tile)
            # MONAI always with a same-padding net: for the valid row, windows as large as our input tiles
            roi = UNetConfig(width=width, levels=levels, padding="same").geometry.valid_input_shape(
                [min(t, config.geometry.valid_input_size_1d(n, a)) for a, (t, n) in enumerate(zip(tile_in, shape))])
            theirs = run_child({**job, "engine": "monai", "padding": "same", "tile": roi}) if have_monai else None
            t_in, t_out = "x".join(map(str, tile_in)), "x".join(map(str, tile))
            row = f"| {volume} {'x'.join(map(str, shape))} | {padding} | {t_in}→{t_out} | {ours['voxels_per_second']:,.0f} | {ours['peak_mib']:.0f} |"
            if theirs:
                ratio = ours["voxels_per_second"] / theirs["voxels_per_second"]
                row += f" same | {'x'.join(map(str, roi))} | {theirs['voxels_per_second']:,.0f} | {theirs['peak_mib']:.0f} | {ratio:.2f} |"
            else:
                row += " - | - | - | - | - |"
            print(row, flush=True)


def streaming(args) -> None:
    """Peak memory of HDF5→HDF5 prediction for a volume several times the memory budget."""
    import h5py

    from unet3d.inference import predict_volume
    from unet3d.inference.predictor import prepare_network, tile_probabilities
    from unet3d.io import open_volume

    shape = (64, 256, 256) if args.quick else (256, 512, 512)
    budget = 32 << 20
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=REPO) as folder:
        source = Path(folder) / "big.h5"
        with h5py.File(source, "w") as f:
            data = f.create_dataset("raw", shape, np.float32, chunks=(32, 64, 64))
            rng = np.random.default_rng(0)
            for z in range(0, shape[0], 32):
                data[z:z + 32] = rng.normal(size=(min(32, shape[0] - z), *shape[1:])).astype(np.float32)
        model = network("valid", 2, 3)
        warm_up = np.zeros((1, 1, *model.geometry.valid_input_shape((72, 72, 72))), np.float32)
        tile_probabilities(prepare_network(model, torch.device("cpu")), warm_up, torch.device("cpu"))
        before = rss_mib()  # after PyTorch's one-off allocations (kernels, thread pools)
        with open_volume(f"{source}:/raw") as volume:
            summary = predict_volume(model, {}, volume, f"{folder}/labels.h5", uncertainty_out=f"{folder}/u.h5",
                                     max_memory=budget, device="cpu")
        grown = rss_mib() - before
    input_mib = math.prod(shape) * 4 / 2**20
    print(f"volume {'x'.join(map(str, shape))} float32 = {input_mib:.0f} MiB (probabilities in memory would be "
          f"{2 * input_mib:.0f} MiB); budget {budget >> 20} MiB; {summary['tiles']} tiles of "
          f"{'x'.join(map(str, summary['input_tile']))}; peak memory growth while predicting: {grown:.0f} MiB; "
          f"{summary['voxels_per_second']:,.0f} voxels/s")


def memory_factor(args) -> None:
    """Peak memory of one forward pass over the summed layer outputs, for a few networks."""
    for width, levels, padding, n in ((8, 4, "valid", 140), (4, 4, "valid", 180), (8, 3, "same", 96), (16, 4, "valid", 124)):
        job = {"width": width, "levels": levels, "padding": padding, "n": n, "threads": args.threads}
        out = subprocess.run([sys.executable, __file__, "--factor-child", json.dumps(job)], capture_output=True, text=True)
        print(out.stdout.strip() or out.stderr[-500:])


def factor_child(job: dict) -> None:
    from unet3d.inference.predictor import prepare_network, tile_probabilities
    from unet3d.inference.tiling import activation_bytes

    torch.set_num_threads(job["threads"])
    model = network(job["padding"], job["width"], job["levels"])
    net = prepare_network(model, torch.device("cpu"))
    shape = model.geometry.valid_input_shape((job["n"],) * 3)
    x = np.random.default_rng(0).normal(size=(1, 1, *shape)).astype(np.float32)
    before = rss_mib()
    tile_probabilities(net, x, torch.device("cpu"))
    peak = rss_mib() - before
    total = activation_bytes(model.config)(shape) / 2**20
    print(f"width {job['width']} levels {job['levels']} {job['padding']} input {shape}: peak {peak:.0f} MiB, "
          f"summed activations {total:.0f} MiB, factor {peak / total:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small volumes and network (under a minute)")
    parser.add_argument("--streaming", action="store_true", help="peak memory of HDF5 streaming instead")
    parser.add_argument("--memory-factor", action="store_true", help="activation peak factor instead")
    parser.add_argument("--max-memory", type=int, help="MiB for the tile choice (default 48, full run 512)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--factor-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_one(json.loads(args.child))))
    elif args.factor_child:
        factor_child(json.loads(args.factor_child))
    elif args.streaming:
        streaming(args)
    elif args.memory_factor:
        memory_factor(args)
    else:
        comparison(args)


if __name__ == "__main__":
    main()
