"""GPU speed: the paper configuration's training iterations per second, and whole-volume prediction.

Usage:
    python benchmarks/bench_gpu.py [--quick] [--device cuda] [--repeats N] [--volume 256]

Training rows time one step of the paper's network (3 input channels, 3 classes, first width 32,
4 levels, valid padding, batch norm; input 116×132×132 → output 28×44×44 as in the paper; batch
1; masked cross-entropy; SGD with momentum 0.99) under each option: float32, TF32 matrix units,
bf16 autocast (what `unet3d train --amp` does), bf16 with channels_last_3d, and bf16 with
torch.compile. Iterations per second are compared with the paper's 70,000 iterations in about
three days on a TitanX (0.27 per second).

Prediction rows run `unet3d.inference.predict_array` (what `unet3d predict` runs: batch norm
folded, float16 autocast on CUDA) on a random volume of --volume³ voxels with a same-padding and a
valid-padding network (first width 16, 4 levels, 1 channel, 3 classes), and MONAI's
`sliding_window_inference` on the same prepared network and window when monai is importable.

Every row reports median seconds after one warm-up, and peak GPU memory (torch's allocator).
Without a GPU the script says so and, with --quick, runs tiny sizes on the CPU so that CI keeps
the code working; rows that need CUDA are then skipped with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import numpy as np
import torch

from unet3d.inference import predict_array
from unet3d.inference.predictor import make_plan, prepare_network
from unet3d.losses import make_loss
from unet3d.model import PRESETS, UNet, UNetConfig

PAPER_INPUT = (116, 132, 132)  # (Z, Y, X): the paper's tile, output 28×44×44
PAPER_ITERATIONS_PER_SECOND = 70_000 / (3 * 24 * 3600)
QUICK_CONFIG = UNetConfig(in_channels=3, num_classes=3, width=4, levels=3, padding="valid")
QUICK_INPUT = (44, 44, 44)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(function, repeats: int, device: torch.device) -> float:
    """Median wall seconds of `repeats` calls after one warm-up, the device drained each time."""
    function()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def peak_memory(device: torch.device, result: dict):
    """Record the peak of torch's CUDA allocator during the block in result['peak_mib'] (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield
    result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


# ----------------------------------------------------------------------------- training

TRAINING_OPTIONS = {
    # name → (TF32, bf16 autocast, channels_last_3d, torch.compile, needs CUDA)
    "float32": (False, False, False, False, False),
    "TF32": (True, False, False, False, True),
    "bf16 autocast (--amp)": (True, True, False, False, True),
    "bf16 + channels_last_3d": (True, True, True, False, True),
    "bf16 + torch.compile": (True, True, False, True, True),
}


def training_step(config: UNetConfig, shape, device: torch.device, option: str):
    """A closure running one training step of a fresh network under `option`."""
    tf32, bf16, channels_last, compiled, _ = TRAINING_OPTIONS[option]
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.manual_seed(0)
    model = UNet(config).to(device)
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99)
    loss_fn = make_loss("ce")
    x = torch.randn(1, config.in_channels, *shape, device=device).contiguous(memory_format=memory_format)
    out_shape = config.geometry.output_shape(shape)
    target = torch.randint(0, config.num_classes, (1, *out_shape), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = forward(x)
        loss = loss_fn(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def training_rows(config, shape, device, repeats) -> list[str]:
    rows = []
    for option, (*_, needs_cuda) in TRAINING_OPTIONS.items():
        if needs_cuda and device.type != "cuda":
            rows.append(f"| {option} | skipped: needs CUDA | | | |")
            continue
        result = {}
        with peak_memory(device, result):
            seconds = median_seconds(training_step(config, shape, device, option), repeats, device)
        rate = 1 / seconds
        rows.append(f"| {option} | {seconds:.4f} | {rate:.2f} | {rate / PAPER_ITERATIONS_PER_SECOND:.0f}× | "
                    f"{_mib(result['peak_mib'])} |")
    return rows


# ----------------------------------------------------------------------------- prediction


def prediction_rows(size: int, device: torch.device, repeats: int, quick: bool) -> list[str]:
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, size, size, size), dtype=np.float32)
    rows = []
    for padding in ("same", "valid"):
        config = UNetConfig(in_channels=1, num_classes=3, width=4 if quick else 16, levels=3 if quick else 4,
                            padding=padding)
        torch.manual_seed(0)
        model = UNet(config).eval()
        result = {}
        with peak_memory(device, result):
            seconds = median_seconds(lambda: predict_array(model, image, device=device.type), repeats, device)
        rows.append(f"| unet3d {padding} | {size**3 / seconds / 1e6:.2f} | {seconds:.3f} | {_mib(result['peak_mib'])} |")
        if padding == "same":
            rows.append(monai_row(model, image, device, repeats))
    return rows


def monai_row(model: UNet, image: np.ndarray, device: torch.device, repeats: int) -> str:
    """MONAI's sliding window (Gaussian, overlap 0.25) with unet3d's window and prepared network."""
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        return "| MONAI sliding_window_inference | skipped: monai is not importable | | |"
    plan = make_plan(model, image.shape[1:])
    net = prepare_network(model, device)
    x = torch.from_numpy(image)[None].to(device)

    def run():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            sliding_window_inference(x, plan.input_shape, 1, net, overlap=0.25, mode="gaussian").softmax(1).cpu()

    result = {}
    with peak_memory(device, result):
        seconds = median_seconds(run, repeats, device)
    return f"| MONAI sliding_window_inference | {x[0, 0].numel() / seconds / 1e6:.2f} | {seconds:.3f} | {_mib(result['peak_mib'])} |"


def _mib(value) -> str:
    return "–" if value is None else f"{value:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (CPU without a GPU): for CI")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, help="timed calls per row (default 5, quick 1)")
    parser.add_argument("--volume", type=int, help="edge of the predicted cube (default 256, quick 32)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda" and not args.quick:
        raise SystemExit("bench_gpu: no CUDA device (torch.cuda.is_available() is False); "
                         "run it on a GPU machine, or with --quick for a CPU smoke test")
    repeats = args.repeats or (1 if args.quick else 5)
    config, shape = (QUICK_CONFIG, QUICK_INPUT) if args.quick else (PRESETS["paper"], PAPER_INPUT)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}")
    print(f"\n### Training step, {'tiny network' if args.quick else 'the paper network'}, input "
          f"{'×'.join(map(str, shape))} → {'×'.join(map(str, config.geometry.output_shape(shape)))}, batch 1\n")
    print("| option | s/step | iterations/s | × paper (0.27/s) | peak MiB |\n|---|---:|---:|---:|---:|")
    for row in training_rows(config, shape, device, repeats):
        print(row, flush=True)
    size = args.volume or (32 if args.quick else 256)
    print(f"\n### Prediction of a {size}³ volume (probabilities back on the host)\n")
    print("| method | Mvoxel/s | seconds | peak MiB |\n|---|---:|---:|---:|")
    for row in prediction_rows(size, device, repeats, args.quick):
        print(row, flush=True)


if __name__ == "__main__":
    main()
