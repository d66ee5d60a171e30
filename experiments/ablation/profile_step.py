"""Where does a densify training step spend its CPU time? Patch preparation vs forward/backward.

Usage: .venv/bin/python -m experiments.ablation.profile_step [--steps N] [--layers]

Prints CPU seconds (process time, all threads) per step for a few network/patch/augmentation
variants on the bundled nuclei example; with --layers, the CPU milliseconds of each 3×3×3
convolution of densify's network (forward, input gradient, weight gradient) on its batch. CPU
time rather than wall time because the machine's cores are shared: wall time would measure the
neighbours.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from unet3d.augmentation import AugmentationConfig
from unet3d.losses import make_loss
from unet3d.model import UNet, UNetConfig
from unet3d.training.dataset import PatchBatches
from unet3d.workflows.densify import default_config

from experiments.ablation.common import load_volume, training_set
from harness import IGNORE
from unet3d.data.sparse import sparsify

VARIANTS = {
    # name: (padding, width, levels, output patch, batch, augmentation)
    "valid w8 L3 out16x40x40 b2 paper-aug": ("valid", 8, 3, (16, 40, 40), 2, AugmentationConfig()),
    "valid w8 L3 out16x40x40 b2 flips": ("valid", 8, 3, (16, 40, 40), 2, "flips"),
    "same w8 L3 16x40x40 b2 paper-aug": ("same", 8, 3, (16, 40, 40), 2, AugmentationConfig()),
    "same w8 L3 16x40x40 b2 flips": ("same", 8, 3, (16, 40, 40), 2, "flips"),
    "same w16 L4 32x64x64 b1 flips": ("same", 16, 4, (32, 64, 64), 1, "flips"),
}


def flips_only() -> AugmentationConfig:
    return AugmentationConfig(rotation_deg=0.0, scale=(1.0, 1.0), elastic_sigma=0.0, gamma=(1.0, 1.0),
                              intensity_scale=(1.0, 1.0), intensity_shift=(0.0, 0.0))


def profile(data, padding, width, levels, output, batch, augmentation, steps) -> tuple:
    network = UNetConfig(in_channels=data.channels, num_classes=len(data.class_values), width=width,
                         levels=levels, padding=padding, norm="batch")
    shape = tuple(min(int(n), t) for n, t in zip(data.images[0].shape[1:], output))
    input_shape = network.geometry.input_shape_for_output(shape) if padding == "valid" else \
        network.geometry.valid_input_shape(shape, "up")
    output_shape = network.geometry.output_shape(input_shape)
    batches = PatchBatches(data, input_shape, output_shape, batch, augmentation, seed=0)
    torch.manual_seed(0)
    model = UNet(network).to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    loss_fn = make_loss("ce", None)
    prep = compute = 0.0
    for i in range(steps + 1):
        t0 = time.process_time()
        images, targets = batches[i]
        t1 = time.process_time()
        logits = model(images.contiguous(memory_format=torch.channels_last_3d))
        loss = loss_fn(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        t2 = time.process_time()
        if i:  # the first step warms up allocators and kernels
            prep, compute = prep + t1 - t0, compute + t2 - t1
    voxels = batch * math.prod(output_shape)
    return prep / steps, compute / steps, voxels, input_shape


def convolution_shapes(network: UNetConfig, batch_shape) -> list[tuple[tuple, tuple]]:
    """(input shape, weight shape) of every 3×3×3 convolution in one forward pass of `batch_shape`."""
    model, shapes = UNet(network), []
    for module in model.modules():
        if isinstance(module, torch.nn.Conv3d) and module.kernel_size == (3, 3, 3):
            module.register_forward_hook(
                lambda m, args, out: shapes.append((tuple(args[0].shape), tuple(m.weight.shape))))
    with torch.no_grad():
        model(torch.zeros(batch_shape))  # training mode: every convolution runs as a module
    return shapes


def cpu_ms(run, repeats: int) -> float:
    run()  # warm-up
    start = time.process_time()
    for _ in range(repeats):
        run()
    return (time.process_time() - start) / repeats * 1000


def profile_layers(data, repeats: int) -> None:
    """Forward and backward of each convolution alone, channels-last, as densify trains them on `data`."""
    config = default_config(data)
    batch_shape = (config.batch_size, data.channels, *config.patch_shape)
    layout = torch.channels_last_3d
    patches = "×".join(map(str, config.patch_shape))
    print(f"| convolution (batch {config.batch_size}, {patches} patches) | forward ms | input gradient ms | "
          "weight gradient ms |")
    print("|---|---|---|---|")
    for input_shape, weight_shape in convolution_shapes(config.network, batch_shape):
        x = torch.randn(input_shape).contiguous(memory_format=layout)
        weight = torch.randn(weight_shape).contiguous(memory_format=layout)
        grad = torch.randn(input_shape[0], weight_shape[0], *input_shape[2:]).contiguous(memory_format=layout)
        gradient = lambda mask: torch.ops.aten.convolution_backward(  # noqa: E731
            grad, x, weight, None, [1, 1, 1], [1, 1, 1], [1, 1, 1], False, [0, 0, 0], 1, mask)
        times = [cpu_ms(lambda: torch.nn.functional.conv3d(x, weight, padding=1), repeats),
                 cpu_ms(lambda: gradient([True, False, False]), repeats),
                 cpu_ms(lambda: gradient([False, True, False]), repeats)]
        name = f"{weight_shape[1]}→{weight_shape[0]} channels at {'×'.join(map(str, input_shape[2:]))}"
        print(f"| {name} | " + " | ".join(f"{t:.1f}" for t in times) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--layers", action="store_true", help="time each convolution of densify's network instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    volume = load_volume("nuclei_tiny")
    data = training_set(volume, sparsify(volume.truth, (3, 3, 2), IGNORE))
    if args.layers:
        return profile_layers(data, args.steps)
    print(f"torch threads: {torch.get_num_threads()}\n")
    print("| variant | input patch | CPU s/step: patches | network | labelled output voxels per CPU s |")
    print("|---|---|---|---|---|")
    for name, (padding, width, levels, output, batch, augmentation) in VARIANTS.items():
        augmentation = flips_only() if augmentation == "flips" else augmentation
        prep, compute, voxels, input_shape = profile(data, padding, width, levels, output, batch, augmentation,
                                                     args.steps)
        print(f"| {name} | {'×'.join(map(str, input_shape))} | {prep:.3f} | {compute:.3f} | "
              f"{voxels / (prep + compute):.3g} |", flush=True)


if __name__ == "__main__":
    main()
