"""A layer table of a network: shapes, parameters, tile sizes and margin, computed on the meta
device so even the paper's 132×132×116 tile costs no memory or time."""

from __future__ import annotations

import torch
from torch import nn

from unet3d.model.unet import UNet, UNetConfig, count_parameters


def layer_table(config: UNetConfig, input_shape) -> list[tuple[str, str, tuple, int]]:
    """(name, layer type, output shape, parameters) for every leaf layer of one forward pass."""
    with torch.device("meta"):
        model = UNet(config)
        rows = []

        def record(name):
            def hook(module, inputs, output):
                params = sum(p.numel() for p in module.parameters(recurse=False))
                rows.append((name, type(module).__name__, tuple(output.shape[1:]), params))
            return hook

        for name, module in model.named_modules():
            if not list(module.children()) and not isinstance(module, nn.ReLU):
                module.register_forward_hook(record(name))
        model.eval()
        model(torch.empty(1, config.in_channels, *input_shape))
    return rows


def summary_text(config: UNetConfig, input_shape=None) -> str:
    """The table `unet3d summary` prints."""
    geometry = config.geometry
    if input_shape is None:
        input_shape = geometry.valid_input_shape((64, 64, 64) if config.padding == "same" else (116, 132, 132))
    output_shape = geometry.output_shape(input_shape)
    rows = layer_table(config, input_shape)
    lines = [f"{'layer':<28} {'type':<20} {'output (C, Z, Y, X)':<26} {'params':>12}"]
    lines += [f"{n:<28} {t:<20} {str(s):<26} {p:>12,}" for n, t, s, p in rows]
    model = UNet(config)
    conv = count_parameters(model)
    norm = count_parameters(model, include_norm=True) - conv
    lines += [
        "",
        f"config:        {config.to_dict()}",
        f"input tile:    {' x '.join(map(str, input_shape))} (Z x Y x X), {config.in_channels} channel(s)",
        f"output tile:   {' x '.join(map(str, output_shape))} (Z x Y x X), {config.num_classes} classes",
        f"margin:        {geometry.margin()} voxels lost per side (Z, Y, X)",
        f"parameters:    {conv:,} (convolution weights and biases, as the paper counts)",
        f"               + {norm:,} normalization scale/shift = {conv + norm:,} trainable in all",
    ]
    return "\n".join(lines)
