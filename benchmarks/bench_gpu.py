"""GPU speed: the paper configuration's training iterations per second, training against the peers,
and whole-volume prediction against MONAI's sliding window.

Usage:
    python -m benchmarks.bench_gpu [--quick] [--device cuda] [--repeats N] [--volume 256] [--part feed]

Training rows time one step of the paper's network (3 input channels, 3 classes, first width 32,
4 levels, valid padding, batch norm; input 116×132×132 → output 28×44×44 as in the paper; batch
1; masked cross-entropy; SGD with momentum 0.99) under each option: float32, TF32 matrix units,
bf16 autocast (what `unet3d train --amp` does), and bf16 with cudnn.benchmark, with
channels_last_3d, and with torch.compile. Iterations per second are compared with the paper's
70,000 iterations in about three days on a TitanX (0.27 per second).

Peer rows train unet3d (same padding), pytorch-3dunet's UNet3D and MONAI's BasicUNet at the same
widths (first width 32, 1 channel, 3 classes, 128³ patch) in TF32 and bf16, when each is
importable (the widths are matched as in bench_train_step.py).

Prediction rows run `unet3d.inference.predict_array` (what `unet3d predict` runs: batch norm
folded, float16 autocast on CUDA) on a random volume of --volume³ voxels with a same-padding and a
valid-padding network (first width 16, 4 levels, 1 channel, 3 classes) at the default memory
budget and at a GPU-sized one, and MONAI's `sliding_window_inference` (Gaussian, overlap 0.25) on
the same prepared network, with unet3d's window and with the whole volume as its window. A last
table compares float16 GPU probabilities with float32 CPU ones on a small crop.

Feed rows compare, for the paper configuration (its network, tile and augmentation, batch 1)
and for the plan `unet3d train` follows by default (densify's recipe: width 8, 3 levels, 16×40×40,
batch 4, flips), iterations per second of the training loop as `unet3d train` runs it (batches
from `training.dataset.training_batches`, then `training.trainer.Step`) against the step alone on
a batch already on the device, and the batches alone. On a GPU the patches' regions are cut on the
CPU by a background thread and resampled on the GPU, so end to end should reach at least 90 % of
the step alone. On the CPU the loop prepares each batch before its step, as it always has; the
row with a background thread shows what overlapping would give on that machine's cores.
`--part feed` also runs on a CPU at full size.

Every row reports the first call (warm-up: allocation, kernel selection, compilation) and the
median of the timed calls after it, and the peak of torch's CUDA allocator. A row that fails
reports its error and the run goes on. Without a GPU the script says so and, with --quick, runs
tiny sizes on the CPU so that CI keeps the code working; rows that need CUDA are then skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time

import numpy as np
import torch

from benchmarks.bench_train_step import monai_basicunet_model, pytorch3dunet_model
from benchmarks.timing import first_and_median_time
from unet3d.augmentation import AugmentationConfig
from unet3d.inference import predict_array
from unet3d.inference.memory import estimate_tile_bytes
from unet3d.inference.predictor import default_max_memory, make_plan, prepare_network
from unet3d.inference.tiling import blend_bytes
from unet3d.losses import make_loss
from unet3d.model import PRESETS, UNet, UNetConfig
from unet3d.training import TrainConfig
from unet3d.training.dataset import PatchBatches, batch_loader, prefetched, prepare_training_set, training_batches
from unet3d.training.trainer import Step, patch_geometry
from unet3d.workflows.densify import default_config

PAPER_INPUT = (116, 132, 132)  # (Z, Y, X): the paper's tile, output 28×44×44
PAPER_ITERATIONS_PER_SECOND = 70_000 / (3 * 24 * 3600)
QUICK_CONFIG = UNetConfig(in_channels=3, num_classes=3, width=4, levels=3, padding="valid")
QUICK_INPUT = (44, 44, 44)
PEER_WIDTH, PEER_PATCH = 32, 128


@dataclasses.dataclass(frozen=True)
class Options:
    tf32: bool = False
    bf16: bool = False
    channels_last: bool = False
    compiled: bool = False
    cudnn_benchmark: bool = False

    @property
    def needs_cuda(self) -> bool:
        return self != Options()


TRAINING_OPTIONS = {
    "float32": Options(),
    "TF32": Options(tf32=True),
    "TF32 + channels_last_3d (`unet3d train`)": Options(tf32=True, channels_last=True),
    "bf16 autocast": Options(tf32=True, bf16=True),
    "bf16 + channels_last_3d (`unet3d train --amp`)": Options(tf32=True, bf16=True, channels_last=True),
    "bf16 + channels_last_3d + cudnn.benchmark": Options(tf32=True, bf16=True, channels_last=True, cudnn_benchmark=True),
    "bf16 + channels_last_3d + torch.compile": Options(tf32=True, bf16=True, channels_last=True, compiled=True),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, repeats: int, device: torch.device) -> tuple[float, float]:
    """first_and_median_time with the device drained after each call."""
    return first_and_median_time(lambda: (function(), synchronize(device)), repeats)


@contextlib.contextmanager
def peak_memory(device: torch.device, result: dict):
    """Record the peak of torch's CUDA allocator during the block in result['peak_mib'] (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield
    result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


@contextlib.contextmanager
def backend_flags(options: Options):
    """TF32 and cudnn.benchmark as `options` ask, restored afterwards so rows do not leak into each other."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = options.tf32
    torch.backends.cudnn.benchmark = options.cudnn_benchmark
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def guarded(label: str, columns: int, make_row) -> str:
    """The row `make_row` builds, or the row's error: one failing option must not end the run."""
    try:
        return make_row()
    except ImportError as exc:
        return f"| {label} | skipped: {exc.name} is not importable |" + " |" * (columns - 2)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        message = str(exc).strip().splitlines()[0][:140] if str(exc).strip() else ""
        return f"| {label} | failed: {type(exc).__name__}: {message} |" + " |" * (columns - 2)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- training


def training_step(model: torch.nn.Module, shape, device: torch.device, options: Options):
    """A closure running one training step of `model` on random data under `options`."""
    torch.manual_seed(0)
    memory_format = torch.channels_last_3d if options.channels_last else torch.contiguous_format
    model = model.to(device).to(memory_format=memory_format).train()
    forward = torch.compile(model) if options.compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.99)
    loss_fn = make_loss("ce")
    in_channels = next(p for p in model.parameters() if p.dim() == 5).shape[1]
    x = torch.randn(1, in_channels, *shape, device=device).contiguous(memory_format=memory_format)
    with torch.no_grad():
        out_shape = model(x).shape[2:]
    target = torch.randint(0, 3, (1, *out_shape), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=options.bf16):
            logits = forward(x)
        loss = loss_fn(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def time_training(make_model, shape, device, options: Options, repeats: int) -> tuple[float, float, dict]:
    result = {}
    with backend_flags(options), peak_memory(device, result):
        first, seconds = timed(training_step(make_model(), shape, device, options), repeats, device)
    return first, seconds, result


def paper_rows(config, shape, device, repeats) -> list[str]:
    rows = []
    for name, options in TRAINING_OPTIONS.items():
        if options.needs_cuda and device.type != "cuda":
            rows.append(f"| {name} | skipped: needs CUDA | | | | |")
            continue

        def row(name=name, options=options):
            first, seconds, result = time_training(lambda: UNet(config), shape, device, options, repeats)
            rate = 1 / seconds
            return (f"| {name} | {first:.2f} | {seconds:.4f} | {rate:.2f} | {rate / PAPER_ITERATIONS_PER_SECOND:.0f}× | "
                    f"{_mib(result['peak_mib'])} |")

        rows.append(guarded(name, 6, row))
    return rows


PEER_MODELS = {
    "unet3d (same padding)": lambda width: UNet(UNetConfig(in_channels=1, num_classes=3, width=width, padding="same")),
    "pytorch-3dunet UNet3D": pytorch3dunet_model,
    "MONAI BasicUNet": monai_basicunet_model,
}


def peer_rows(width: int, patch: int, device, repeats) -> list[str]:
    """unet3d against the peers at matched widths, each in the default layout, then unet3d as
    `unet3d train` runs it (channels_last_3d); the ratio is each time over plain unet3d's."""
    rows = []
    for precision, options in (("TF32", Options(tf32=True)), ("bf16", Options(tf32=True, bf16=True))):
        if options.needs_cuda and device.type != "cuda":
            rows.append(f"| all | {precision} | skipped: needs CUDA | | | |")
            continue
        reference = None
        runs = [(name, make_model, options) for name, make_model in PEER_MODELS.items()]
        runs.append(("unet3d, channels_last_3d", PEER_MODELS["unet3d (same padding)"],
                     dataclasses.replace(options, channels_last=True)))
        for name, make_model, run_options in runs:

            def row(name=name, make_model=make_model, run_options=run_options):
                nonlocal reference
                _, seconds, result = time_training(lambda: make_model(width), (patch,) * 3, device, run_options, repeats)
                reference = reference or seconds
                return (f"| {name} | {precision} | {seconds:.4f} | {patch**3 / seconds / 1e6:.2f} | "
                        f"{seconds / reference:.2f} | {_mib(result['peak_mib'])} |")

            rows.append(guarded(name, 6, row))
    return rows


# ----------------------------------------------------------------------------- data feed


def sparse_volume(shape, channels: int, seed: int = 0):
    """A random (C, Z, Y, X) image with every 8th z-slice annotated with three classes (255 elsewhere)."""
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((channels, *shape), dtype=np.float32)
    labels = np.full(shape, 255, dtype=np.uint8)
    labels[::8] = rng.integers(0, 3, size=labels[::8].shape)
    return prepare_training_set([image], [labels], 255)


def feed_cases(quick: bool) -> dict[str, tuple[TrainConfig, object]]:
    """(configuration, training set) of the paper's run and of the default plan's."""
    paper_data = sparse_volume((60, 60, 60) if quick else (140, 180, 180), channels=3)
    network, shape = (QUICK_CONFIG, QUICK_INPUT) if quick else (PRESETS["paper"], PAPER_INPUT)
    paper = TrainConfig(network=network, patch_shape=shape, batch_size=1, optimizer="sgd", learning_rate=1e-4,
                        momentum=0.99, loss="ce", augmentation=AugmentationConfig())
    plan_data = sparse_volume((24, 48, 48) if quick else (64, 256, 256), channels=1)
    return {"paper (network, tile, augmentation)": (paper, paper_data),
            "default plan (densify's recipe)": (default_config(plan_data), plan_data)}


def loop_seconds(batches, step, lr: float, count: int) -> float:
    """Median seconds from one step's end to the next's, each batch fetched in between."""
    ends = [time.perf_counter()]
    for images, targets in batches:
        step(images, targets, lr)  # returns the loss as a float: the device has finished
        ends.append(time.perf_counter())
    return float(np.median(np.diff(ends)[1:count + 1]))


def feed_rows(device: torch.device, repeats: int, quick: bool) -> list[str]:
    rows = []
    for name, (config, data) in feed_cases(quick).items():

        def row(config=config, data=data):
            torch.manual_seed(0)
            input_shape, output_shape = patch_geometry(config)
            batches = PatchBatches(data, input_shape, output_shape, config.batch_size, config.augmentation, 0)
            model = UNet(config.network).to(device).to(memory_format=torch.channels_last_3d)
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.99)
            step = Step(model, optimizer, make_loss(config.loss), config, device, channels_last=True)
            count = repeats + 1  # the first iteration warms up
            images, targets = next(training_batches(batches, 0, 1, 0, device))
            _, step_only = timed(lambda: step(images, targets, 1e-4), repeats, device)
            loop = loop_seconds(training_batches(batches, 0, count + 1, 0, device), step, 1e-4, repeats)
            start = time.perf_counter()
            for _ in training_batches(batches, 0, count, 0, device):
                synchronize(device)
            data_only = (time.perf_counter() - start) / count
            cells = [f"{1 / step_only:.3g}", f"{1 / loop:.3g}", f"{100 * step_only / loop:.0f} %"]
            if device.type == "cpu":
                threaded = loop_seconds(prefetched(batch_loader(batches, 0, count + 1, 0)), step, 1e-4, repeats)
                cells.append(f"{1 / threaded:.3g} ({100 * step_only / threaded:.0f} %)")
            else:
                cells.append("–")
            patch = "×".join(map(str, input_shape))
            return f"| {name} | {patch} × {config.batch_size} | {' | '.join(cells)} | {data_only:.4f} |"

        rows.append(guarded(name, 7, row))
    return rows


def feed_table(device: torch.device, repeats: int, quick: bool) -> None:
    print(f"\n### Training loop end to end (batches + step) against the step alone, "
          f"{'tiny sizes' if quick else 'full sizes'}, median of {repeats}\n")
    print("| run | input × batch | step only it/s | end to end it/s | end to end ÷ step | CPU: with a "
          "background thread it/s | batches alone s |\n|---|---|---:|---:|---:|---:|---:|")
    for row in feed_rows(device, repeats, quick):
        print(row, flush=True)


# ----------------------------------------------------------------------------- prediction


def prediction_rows(size: int, device: torch.device, repeats: int, quick: bool) -> list[str]:
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, size, size, size), dtype=np.float32)
    default = default_max_memory(device)
    budgets = (64 << 20,) if quick else (1 << 30, default)
    rows = []
    for padding in ("same", "valid"):
        config = UNetConfig(in_channels=1, num_classes=3, width=4 if quick else 16, levels=3 if quick else 4,
                            padding=padding)
        torch.manual_seed(0)
        model = UNet(config).eval()
        for budget in budgets:
            rows.append(unet3d_row(f"unet3d {padding}", model, image, device, repeats, budget))
        if padding == "same":
            rows.append(monai_row("MONAI, unet3d's window", model, image, device, repeats, budgets[-1]))
            rows.append(monai_row("MONAI, whole volume as window", model, image, device, repeats, None))
    return rows


def unet3d_row(label: str, model: UNet, image: np.ndarray, device, repeats: int, budget: int) -> str:
    def row():
        start = time.perf_counter()
        plan = make_plan(model, image.shape[1:], max_memory=budget, device=device)
        planning = time.perf_counter() - start
        estimate = (estimate_tile_bytes(model.config, plan.input_shape, 1, device.type)
                    + blend_bytes(model.config, image.shape[1:], plan.output_shape))
        result = {}
        with peak_memory(device, result):
            first, seconds = timed(lambda: predict_array(model, image, device=device.type, tile=plan.output_shape),
                                   repeats, device)
        return _prediction_row(label, budget, plan.input_shape, image, first, seconds, result, estimate, planning)

    return guarded(label, 9, row)


def monai_row(label: str, model: UNet, image: np.ndarray, device, repeats: int, budget: int | None) -> str:
    """MONAI's sliding window (Gaussian, overlap 0.25) on unet3d's prepared network; `budget` None:
    the whole volume is one window."""

    def row():
        from monai.inferers import sliding_window_inference

        shape = image.shape[1:]
        window = shape if budget is None else make_plan(model, shape, max_memory=budget, device=device).input_shape
        net = prepare_network(model, device)
        x = torch.from_numpy(image)[None].to(device)

        def run():
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                sliding_window_inference(x, window, 1, net, overlap=0.25, mode="gaussian").softmax(1).cpu()

        result = {}
        with peak_memory(device, result):
            first, seconds = timed(run, repeats, device)
        return _prediction_row(label, budget, window, image, first, seconds, result, None, None)

    return guarded(label, 9, row)


def _prediction_row(label, budget, window, image, first, seconds, result, estimate, planning) -> str:
    budget_text = "–" if budget is None else f"{budget >> 20:,}"
    planning_text = "–" if planning is None else f"{planning:.2f}"
    return (f"| {label} | {budget_text} | {'×'.join(map(str, window))} | {planning_text} | "
            f"{image[0].size / seconds / 1e6:.2f} | {first:.2f} | {seconds:.3f} | "
            f"{_mib(estimate and estimate / 2**20)} | {_mib(result['peak_mib'])} |")


def agreement_row(device: torch.device) -> str:
    """Float16 autocast on the GPU against float32 on the CPU, same network and crop."""

    def row():
        config = UNetConfig(in_channels=1, num_classes=3, width=16, padding="same")
        torch.manual_seed(0)
        model = UNet(config).eval()
        image = np.random.default_rng(1).standard_normal((1, 64, 96, 96), dtype=np.float32)
        gpu = predict_array(model, image, device=device.type)
        cpu = predict_array(model, image, device="cpu")
        same_class = float((gpu.argmax(0) == cpu.argmax(0)).mean())
        return f"| {np.abs(gpu - cpu).max():.2e} | {100 * same_class:.3f} % |"

    if device.type != "cuda":
        return "| skipped: needs CUDA | |"
    return guarded("agreement", 2, row)


def _mib(value) -> str:
    return "–" if value is None else f"{value:,.0f}"


def training_tables(config, shape, device, repeats: int, quick: bool) -> None:
    print(f"\n### Training step, {'tiny network' if quick else 'the paper network'}, input "
          f"{'×'.join(map(str, shape))} → {'×'.join(map(str, config.geometry.output_shape(shape)))}, batch 1\n")
    print("| option | first step s | s/step | iterations/s | × paper (0.27/s) | peak MiB |\n"
          "|---|---:|---:|---:|---:|---:|")
    for row in paper_rows(config, shape, device, repeats):
        print(row, flush=True)
    width, patch = (4, 32) if quick else (PEER_WIDTH, PEER_PATCH)
    print(f"\n### Training step against the peers, first width {width}, {patch}³ patch, batch 1\n")
    print("| network | precision | s/step | Mvoxel/s | time / unet3d's | peak MiB |\n|---|---|---:|---:|---:|---:|")
    for row in peer_rows(width, patch, device, repeats):
        print(row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (CPU without a GPU): for CI")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, help="timed calls per row (default 5, quick 1)")
    parser.add_argument("--volume", type=int, help="edge of the predicted cube (default 256, quick 32)")
    parser.add_argument("--part", choices=("all", "training", "feed", "prediction"), default="all",
                        help="which tables to run")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda" and not args.quick and args.part != "feed":
        raise SystemExit("bench_gpu: no CUDA device (torch.cuda.is_available() is False); "
                         "run it on a GPU machine, with --quick for a CPU smoke test, or --part feed")
    repeats = args.repeats or (1 if args.quick else 5)
    config, shape = (QUICK_CONFIG, QUICK_INPUT) if args.quick else (PRESETS["paper"], PAPER_INPUT)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; cuDNN {torch.backends.cudnn.version()}")
    if args.part in ("all", "training"):
        training_tables(config, shape, device, repeats, args.quick)
    if args.part in ("all", "feed"):
        feed_table(device, max(repeats, 2), args.quick)
    if args.part not in ("all", "prediction"):
        return
    size = args.volume or (32 if args.quick else 256)
    print(f"\n### Prediction of a {size}³ volume (probabilities back on the host)\n")
    print("| method | budget MiB | window | planning s | Mvoxel/s | first call s | seconds | estimate MiB | peak MiB |\n"
          "|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for row in prediction_rows(size, device, repeats, args.quick):
        print(row, flush=True)
    print("\n### Float16 on the GPU against float32 on the CPU (same network, 64×96×96)\n")
    print("| largest probability difference | voxels of the same class |\n|---:|---:|")
    print(agreement_row(device), flush=True)


if __name__ == "__main__":
    main()
