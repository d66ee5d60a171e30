"""Prediction speed and peak memory: unet3d's tiling vs MONAI's sliding_window_inference.

Every measurement runs in a fresh process (peak resident memory from /proc/self/status VmHWM,
minus the process's memory before predicting), with the same network weights for both. MONAI
lives in a separate environment so the product's stays small:

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0 monai numpy scipy h5py tifffile
    .venv-bench/bin/pip install -e . --no-deps
    .venv-bench/bin/python -m benchmarks.bench_predict [--quick] [--repeats 3] [--max-memory 2048]

Also: `--streaming` measures peak memory of HDF5→HDF5 and Zarr→Zarr prediction for volumes of
growing size under one memory budget; `--memory-model` compares the tile memory estimate with measured peaks;
`--planning` times the choice of the tile (memory estimates replayed for candidate shapes)."""

from __future__ import annotations

import argparse
import contextlib
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

from harness import volumes

REPO = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    """Peak resident memory of this process so far. ru_maxrss is not used where /proc exists:
    a child started with vfork (as subprocess does) inherits its parent's peak in ru_maxrss."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_volume(name: str, quick: bool) -> np.ndarray:
    """Normalized (1, Z, Y, X) float32: the real ovule stack (a corner of it with `quick`), or a
    synthetic cube of blobs."""
    if name == "ovule":
        raw = volumes.load("ovule").image[0]
        raw = (raw[:24, :64, :64] if quick else raw).astype(np.float32)
    else:
        from scipy.ndimage import gaussian_filter

        n = 48 if quick else 256
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
    if job["engine"] == "pytorch3dunet":
        return pytorch3dunet_one(job, image, model)
    before = rss_mib()
    began = time.perf_counter()
    if job["engine"] == "unet3d":
        predict_array(model, image, tile=job["tile"], batch_size=job["batch"], overlap=job["overlap"])
    else:
        from monai.inferers import sliding_window_inference

        if job["prepared"]:  # the folded, channels-last network unet3d runs
            net = prepare_network(model, torch.device("cpu"))
            layout = torch.channels_last_3d
        else:  # the module as a MONAI user holds it after training
            net, layout = model, torch.contiguous_format

        def predictor(x):
            return torch.softmax(net(x.contiguous(memory_format=layout)), dim=1)

        with torch.inference_mode():
            sliding_window_inference(torch.from_numpy(image)[None], job["tile"], job["batch"], predictor,
                                     overlap=job["overlap"], mode=job["mode"])
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "voxels_per_second": math.prod(image.shape[1:]) / seconds, "peak_mib": rss_mib() - before}


class _ChannelsLastSoftmax(torch.nn.Module):
    """Our prepared network as a module that takes any layout and returns probabilities."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.softmax(self.net(x.contiguous(memory_format=torch.channels_last_3d)), dim=1)


def halo_for(window, overlap: float) -> tuple[int, ...]:
    """pytorch-3dunet's halo that reads as much context per window as MONAI's overlap does."""
    return tuple(round(w * overlap / 2) for w in window)


def pytorch3dunet_one(job: dict, image: np.ndarray, model) -> dict:
    """pytorch-3dunet's StandardPredictor: patches of window − 2·halo laid edge to edge, each read
    with its halo (mirrored at the volume's border) and cropped back; labels written to HDF5."""
    import h5py
    from pytorch3dunet.datasets.hdf5 import StandardHDF5Dataset
    from pytorch3dunet.datasets.utils import default_prediction_collate
    from pytorch3dunet.unet3d.config import TorchDevice
    from pytorch3dunet.unet3d.predictor import StandardPredictor
    from torch.utils.data import DataLoader

    from unet3d.inference.predictor import prepare_network

    halo = halo_for(job["tile"], job["overlap"])
    patch = [w - 2 * h for w, h in zip(job["tile"], halo)]
    with tempfile.TemporaryDirectory(prefix="unet3d-p3d-") as folder:
        path = Path(folder) / "input.h5"
        with h5py.File(path, "w") as f:
            f["raw"] = image[0]
        net = _ChannelsLastSoftmax(prepare_network(model, torch.device("cpu")))
        before = rss_mib()
        began = time.perf_counter()
        dataset = StandardHDF5Dataset(str(path), "test", {"name": "SliceBuilder", "patch_shape": patch, "stride_shape": patch,
                                                           "halo_shape": list(halo)},
                                      {"raw": [{"name": "ToTensor", "expand_dims": True}]})
        loader = DataLoader(dataset, batch_size=job["batch"], collate_fn=default_prediction_collate)
        StandardPredictor(net, folder, 2, TorchDevice.CPU, save_segmentation=True)(loader)
        seconds = time.perf_counter() - began
    return {"seconds": seconds, "voxels_per_second": math.prod(image.shape[1:]) / seconds, "peak_mib": rss_mib() - before}


def run_child(job: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_predict", "--child", json.dumps(job)],
                         capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def comparison_cases(shape, width: int, levels: int, budget: int, with_peers: bool, batch_sizes=(1, 2, 4),
                     overlaps=(0.25, 0.5)) -> list[tuple[str, str, dict]]:
    """(predictor, tiles, job) per case. Every case uses the same budget and the same weights
    (the seed fixes them; valid and same nets have identical parameters). MONAI runs the
    same-padding net with the near-cubic window, the largest that fits the budget (what a user
    who maximises `roi_size` would pick), given either our prepared network (batch norm folded,
    channels-last) or the module as trained; and once with unet3d's volume-shaped window."""
    from unet3d.inference import choose_output_tile
    from unet3d.inference.memory import estimate_tile_bytes
    from unet3d.inference.tiling import near_cubic_tile
    from unet3d.model import UNetConfig

    valid = UNetConfig(width=width, levels=levels, padding="valid", num_classes=2)
    same = UNetConfig(width=width, levels=levels, padding="same", num_classes=2)
    cases = []
    for batch in batch_sizes:
        try:
            tile = choose_output_tile(valid, shape, budget, batch)
        except ValueError:  # not even the smallest tiles fit the budget this many at a time
            continue
        tiles = f"{_x(valid.geometry.input_shape_for_output(tile))}→{_x(tile)}, {batch} per batch"
        cases.append(("unet3d valid, edge to edge", tiles, {"engine": "unet3d", "padding": "valid", "tile": tile, "batch": batch, "overlap": 0.25}))
    cube = near_cubic_tile(same, shape, budget, lambda t: estimate_tile_bytes(same, t))
    for overlap in overlaps:
        window = choose_output_tile(same, shape, budget, overlap=overlap)
        cases.append(("unet3d same, Gaussian blend", f"{_x(window)}, overlap {overlap}",
                      {"engine": "unet3d", "padding": "same", "tile": window, "batch": 1, "overlap": overlap}))
        if not with_peers:
            continue
        for mode in ("constant", "gaussian"):
            cases.append((f"MONAI same, {mode} blend", f"{_x(cube)}, overlap {overlap}",
                          {"engine": "monai", "padding": "same", "tile": cube, "batch": 1, "overlap": overlap,
                           "mode": mode, "prepared": True, "reference": True}))
        cases.append(("MONAI same, constant blend, module as trained", f"{_x(cube)}, overlap {overlap}",
                      {"engine": "monai", "padding": "same", "tile": cube, "batch": 1, "overlap": overlap,
                       "mode": "constant", "prepared": False}))
        cases.append(("MONAI same, constant blend, unet3d's window", f"{_x(window)}, overlap {overlap}",
                      {"engine": "monai", "padding": "same", "tile": window, "batch": 1, "overlap": overlap,
                       "mode": "constant", "prepared": True}))
        halo = halo_for(cube, overlap)
        if all(w - 2 * h >= 64 for w, h in zip(cube[1:], halo[1:])):  # pytorch-3dunet's least patch height, width
            cases.append(("pytorch-3dunet StandardPredictor, halo", f"{_x(cube)}, halo {_x(halo)}",
                          {"engine": "pytorch3dunet", "padding": "same", "tile": cube, "batch": 1, "overlap": overlap}))
    return cases


def _x(shape) -> str:
    return "×".join(map(str, shape))


def comparison(args) -> None:
    """Median over repeats of every case, repeats interleaved so load changes hit all cases alike;
    ratios are to MONAI's fastest configuration with the near-cubic window on the same volume."""
    try:
        import monai  # noqa: F401
        import pytorch3dunet  # noqa: F401
    except ImportError:
        print("MONAI or pytorch-3dunet is not installed in this environment: run benchmarks/peers.sh (creates "
              ".venv-bench); only unet3d rows are measured.\n")
        have_peers = False
    else:
        have_peers = True
    width, levels = (4, 3) if args.quick else (16, 4)
    budget = (args.max_memory or (48 if args.quick else 1024)) << 20
    repeats = 1 if args.quick else args.repeats
    print(f"network width {width}, {levels} levels, 2 classes; {args.threads} threads; budget {budget >> 20} MiB; "
          f"median of {repeats} fresh processes per case\n")
    print("| volume | predictor | tiles | voxels/s | peak MiB | speed vs fastest MONAI |")
    print("|---|---|---|---|---|---|")
    for volume in args.compare:
        if volume == "ovule" and not (volumes.shared_data() / "ovule").exists():
            print(f"| ovule | skipped: {volumes.shared_data() / 'ovule'} not found | – | – | – | – |", flush=True)
            continue
        shape = load_volume(volume, args.quick).shape[1:]
        cases = comparison_cases(shape, width, levels, budget, have_peers, args.batch_sizes, args.overlaps)
        job = {"volume": volume, "quick": args.quick, "width": width, "levels": levels, "threads": args.threads}
        runs = [[] for _ in cases]
        for _ in range(repeats):
            for case, found in zip(cases, runs):
                found.append(run_child({**job, **case[2]}))
        medians = [{key: float(np.median([r[key] for r in found])) for key in found[0]} for found in runs]
        fastest_monai = max((m["voxels_per_second"] for (_, _, job), m in zip(cases, medians) if job.get("reference")), default=None)
        for (name, tiles, _), m in zip(cases, medians):
            ratio = f"{m['voxels_per_second'] / fastest_monai:.2f}" if fastest_monai else "-"
            print(f"| {volume} {_x(shape)} | {name} | {tiles} | {m['voxels_per_second']:,.0f} | {m['peak_mib']:.0f} | {ratio} |", flush=True)


STREAM_SHAPES = ((64, 256, 256), (128, 512, 512), (256, 512, 512))


def streaming(args) -> None:
    """Peak memory of disk-to-disk prediction (labels, probabilities, uncertainty) for volumes
    up to several times the memory budget: one fresh process per volume, same network and budget."""
    shapes = ((32, 128, 128), (64, 256, 256)) if args.quick else args.volumes or STREAM_SHAPES
    budget = args.max_memory or 128
    width, levels = 4, 2
    print(f"valid network width {width}, {levels} levels; --max-memory {budget}M; {args.threads} threads; "
          "outputs: labels, float16 probabilities, float32 uncertainty\n")
    print("| format | volume (Z×Y×X) | input MiB | outputs MiB | tiles (input) | baseline RSS MiB | peak RSS MiB | peak − baseline MiB | voxels/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for fmt, suffix in (("HDF5", ".h5"), ("Zarr", ".zarr")):
        if fmt.lower() not in args.formats:
            continue
        for shape in shapes:
            with tempfile.TemporaryDirectory(prefix="unet3d-stream-") as folder:
                source = write_noise_volume(Path(folder) / f"input{suffix}", shape)
                job = {"mode": "stream", "source": source, "folder": folder, "suffix": suffix, "budget": budget,
                       "width": width, "levels": levels, "threads": args.threads}
                r = run_child(job)
            voxels = math.prod(shape)
            print(f"| {fmt} | {'×'.join(map(str, shape))} | {voxels * 4 / 2**20:.0f} | {voxels * (1 + 2 * 2 + 4) / 2**20:.0f} | "
                  f"{r['tiles']} ({'×'.join(map(str, r['input_tile']))}) | {r['baseline_mib']:.0f} | {r['peak_mib']:.0f} | "
                  f"{r['peak_mib'] - r['baseline_mib']:.0f} | {r['voxels_per_second']:,.0f} |", flush=True)


def write_noise_volume(path: Path, shape) -> str:
    """A chunked float32 volume of Gaussian noise, written slab by slab (never whole in memory)."""
    rng = np.random.default_rng(0)
    if path.suffix == ".h5":
        import h5py

        file = h5py.File(path, "w")
        data = file.create_dataset("raw", shape, np.float32, chunks=(32, 64, 64))
        spec = f"{path}:/raw"
    else:
        import zarr

        file = contextlib.nullcontext()
        data = zarr.create_array(str(path), shape=shape, dtype=np.float32, chunks=(32, 64, 64))
        spec = str(path)
    with file:
        for z in range(0, shape[0], 32):
            data[z:z + 32] = rng.normal(size=(min(32, shape[0] - z), *shape[1:])).astype(np.float32)
    return spec


def stream_one(job: dict) -> dict:
    """Runs inside the child process: one volume from disk to disk."""
    from unet3d.inference import predict_volume
    from unet3d.io import open_volume

    torch.set_num_threads(job["threads"])
    model = network("valid", job["width"], job["levels"])
    out = Path(job["folder"]) / "out"
    with open_volume(job["source"]) as volume:
        baseline = rss_mib()  # torch, the model and the file's library loaded
        summary = predict_volume(model, {}, volume, f"{out}.labels{job['suffix']}", f"{out}.probs{job['suffix']}",
                                 f"{out}.uncertainty{job['suffix']}", max_memory=job["budget"] << 20, device="cpu")
    return {"baseline_mib": baseline, "peak_mib": rss_mib(), "tiles": summary["tiles"],
            "input_tile": summary["input_tile"], "voxels_per_second": summary["voxels_per_second"]}


MODEL_CASES = ((4, 2, "valid", 1, 82), (8, 3, "valid", 1, 100), (8, 3, "same", 1, 96), (16, 4, "valid", 1, 156),
               (16, 4, "valid", 3, 100), (16, 4, "same", 1, 144), (32, 4, "valid", 1, 132))


def memory_model(args) -> None:
    """The tile memory estimate that sizes tiles (unet3d.inference.memory) against the measured
    peak of one tile's prediction, one fresh process per network."""
    print("| network (width, levels, padding) | channels | input tile | estimate MiB | measured MiB | measured / estimate |")
    print("|---|---|---|---|---|---|")
    for width, levels, padding, channels, n in MODEL_CASES:
        job = {"mode": "model", "width": width, "levels": levels, "padding": padding, "channels": channels, "n": n,
               "threads": args.threads}
        r = run_child(job)
        print(f"| {width}, {levels}, {padding} | {channels} | {_x(r['shape'])} | {r['estimate_mib']:.0f} | "
              f"{r['peak_mib']:.0f} | {r['peak_mib'] / r['estimate_mib']:.2f} |", flush=True)


def model_one(job: dict) -> dict:
    """Runs inside the child process: the peak of one tile against its estimate."""
    from unet3d.inference import estimate_tile_bytes
    from unet3d.inference.memory import fix_mmap_threshold
    from unet3d.inference.predictor import prepare_network, tile_probabilities
    from unet3d.model import UNet, UNetConfig

    torch.set_num_threads(job["threads"])
    fix_mmap_threshold()
    config = UNetConfig(in_channels=job["channels"], num_classes=2, width=job["width"], levels=job["levels"],
                        padding=job["padding"])
    net = prepare_network(UNet(config).eval(), torch.device("cpu"))
    shape = config.geometry.valid_input_shape((job["n"],) * 3)
    before = rss_mib()
    x = np.random.default_rng(0).normal(size=(1, job["channels"], *shape)).astype(np.float32)
    tile_probabilities(net, x, torch.device("cpu"))
    return {"shape": shape, "peak_mib": rss_mib() - before, "estimate_mib": estimate_tile_bytes(config, shape) / 2**20}


PLANNING_VOLUMES = ((64, 200, 200), (20, 512, 512), (256, 256, 256), (384, 384, 384), (1000, 64, 64))


def planning(args) -> None:
    """Seconds and memory estimates (forward-pass replays) to choose the tile of a first-width-16
    network, from empty caches, on the CPU's default budget and on a 40 GiB GPU's."""
    from unet3d.inference import choose_output_tile
    from unet3d.inference.memory import _meta_network, forward_peak_bytes
    from unet3d.model import UNetConfig

    volumes = ((32, 64, 64),) if args.quick else PLANNING_VOLUMES
    budgets = (("cpu", 48 if args.quick else 1024),) if args.quick else (("cpu", 1024), ("cuda", 40960))
    print("| padding | volume | device, budget MiB | tile | estimates | seconds |")
    print("|---|---|---|---|---:|---:|")
    for padding in ("valid", "same"):
        config = UNetConfig(in_channels=1, num_classes=2, width=4 if args.quick else 16, levels=3 if args.quick else 4,
                            padding=padding)
        for volume in volumes:
            for device_type, budget in budgets:
                times = []
                for _ in range(args.repeats):
                    forward_peak_bytes.cache_clear()
                    _meta_network.cache_clear()
                    start = time.perf_counter()
                    tile = choose_output_tile(config, volume, budget << 20, device_type=device_type)
                    times.append(time.perf_counter() - start)
                estimates = forward_peak_bytes.cache_info().misses
                print(f"| {padding} | {_x(volume)} | {device_type}, {budget} | {_x(tile)} | {estimates} | "
                      f"{np.median(times):.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small volumes and network (under a minute)")
    parser.add_argument("--streaming", action="store_true", help="peak memory of HDF5 streaming instead")
    parser.add_argument("--compare", type=lambda t: t.split(","), default=["ovule", "synthetic"],
                        help="volumes to compare on: ovule, synthetic or both (default)")
    parser.add_argument("--batch-sizes", type=lambda t: [int(b) for b in t.split(",")], default=[1, 2, 4])
    parser.add_argument("--overlaps", type=lambda t: [float(o) for o in t.split(",")], default=[0.25, 0.5])
    parser.add_argument("--volumes", type=lambda t: [tuple(map(int, v.split("x"))) for v in t.split(",")],
                        help="--streaming: volume shapes, e.g. 64x256x256,256x512x512")
    parser.add_argument("--formats", default="hdf5,zarr", help="--streaming: hdf5, zarr or both (default)")
    parser.add_argument("--memory-model", action="store_true", help="tile memory estimate against measured peaks instead")
    parser.add_argument("--planning", action="store_true", help="time the choice of the tile instead")
    parser.add_argument("--max-memory", type=int, help="MiB for the tile choice (default 48 with --quick, else 1024; --streaming 128)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per case; the median is reported")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        runner = {"stream": stream_one, "model": model_one}.get(job.get("mode"), measure_one)
        print(json.dumps(runner(job)))
    elif args.streaming:
        streaming(args)
    elif args.memory_model:
        memory_model(args)
    elif args.planning:
        planning(args)
    else:
        comparison(args)


if __name__ == "__main__":
    main()
