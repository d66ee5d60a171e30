"""Batch norm folded into the convolutions: the network as prediction and export run it.

A model transformation, not an inference detail: prediction, the memory estimate and every
export format use it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from unet3d.model.unet import TestTimeBatchNorm


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """A copy of `model` with every running-statistics batch norm merged into the convolution
    before it (one layer less per convolution, same output up to float rounding).

    Batch norms that use the batch's own statistics at test time cannot be folded and stay.
    """
    model = copy.deepcopy(model)
    for block in model.modules():
        if not isinstance(block, nn.Sequential):
            continue
        layers = list(block.named_children())
        for (_, conv), (name, norm) in zip(layers, layers[1:]):
            if isinstance(conv, (nn.Conv2d, nn.Conv3d)) and _is_foldable(norm):
                _fold_into(conv, norm)
                setattr(block, name, nn.Identity())
    return model


def _is_foldable(norm: nn.Module) -> bool:
    return isinstance(norm, TestTimeBatchNorm) and not norm.use_batch_stats_at_test and norm.running_var is not None


@torch.no_grad()
def _fold_into(conv: nn.Module, norm: TestTimeBatchNorm) -> None:
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    conv.weight.mul_(scale.reshape(-1, *([1] * (conv.weight.dim() - 1))))
    conv.bias = nn.Parameter((bias - norm.running_mean) * scale + norm.bias)
