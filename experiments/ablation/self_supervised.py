"""Self-supervised pretraining on the volume being densified, inside densify's budget.

Usage: .venv/bin/python experiments/ablation/self_supervised.py VOLUME SLICES SEED BUDGET [notta] [share=S]
       [forest_blend options]
  share=S  the part of the network's CPU time spent on the pretext task (default 0.3)

Every voxel of the volume is image, only the annotated slices are labels. For the first `share`
of its time the network (densify's, with its own head) learns to restore the image inside
random cuboids replaced by noise (in-painting, as in Models Genesis, Zhou et al. 2019), on
patches drawn anywhere in the volume; the filter-bank channels, where densify adds them, are
replaced by noise in the same cuboids. Then everything but the head starts densify's training on the
slices, for the rest of the time. The rest is forest_blend.py's run; prints its JSON line with
"pretext_share" and "pretext_steps".
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch

from experiments.ablation import forest_blend
from unet3d.model import UNet
from unet3d.training.trainer import patch_geometry

MAX_CUBOIDS = 6


def masked_batch(volume: torch.Tensor, shape, batch: int, rng: np.random.Generator):
    """Patches drawn uniformly from `volume` (C, Z, Y, X), cuboids replaced by noise; (inputs, targets, mask)."""
    inputs, targets, masks = [], [], []
    for _ in range(batch):
        corner = [int(rng.integers(0, n - s + 1)) for n, s in zip(volume.shape[1:], shape)]
        patch = volume[(slice(None),) + tuple(slice(c, c + s) for c, s in zip(corner, shape))].clone()
        for axis in range(3):
            if rng.random() < 0.5:
                patch = patch.flip(axis + 1)
        mask = torch.zeros(shape, dtype=torch.bool)
        for _ in range(int(rng.integers(2, MAX_CUBOIDS + 1))):
            size = [int(rng.integers(max(2, s // 8), max(3, s // 3) + 1)) for s in shape]
            start = [int(rng.integers(0, s - z + 1)) for s, z in zip(shape, size)]
            mask[tuple(slice(a, a + z) for a, z in zip(start, size))] = True
        targets.append(patch[:1].clone())
        patch[:, mask] = torch.randn(patch.shape[0], int(mask.sum()))
        inputs.append(patch)
        masks.append(mask)
    return torch.stack(inputs), torch.stack(targets), torch.stack(masks)[:, None]


def pretrain(config, data, seconds: float) -> tuple[UNet, int]:
    """densify's network trained to in-paint for `seconds` CPU seconds (its head's first channel
    restores the image; a network has two outputs at least)."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = UNet(dataclasses.replace(config.network, num_classes=2)).to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    volume, patch = data.images[0], patch_geometry(config)[0]
    start, steps = time.process_time(), 0
    model.train()
    while time.process_time() - start < seconds:
        inputs, targets, mask = masked_batch(volume, patch, config.batch_size, rng)
        output = model(inputs.contiguous(memory_format=torch.channels_last_3d))
        loss = ((output[:, :1] - targets) ** 2)[mask].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    return model, steps


def pretrained_train(share: float, record: dict):
    """forest_blend's `train`, preceded by the pretext task for `share` of its time."""
    densify_train = forest_blend.train

    def run(config, data, output, **options):
        model, steps = pretrain(config, data, share * config.max_time)
        record["pretext_steps"] = steps
        network = UNet(config.network)
        weights = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
        network.load_state_dict(weights, strict=False)
        config = dataclasses.replace(config, max_time=(1 - share) * config.max_time)
        return densify_train(config, data, output, network=network, **options)

    return run


if __name__ == "__main__":
    arguments, share = forest_blend.take_option(sys.argv, "share", 0.3)
    record = {"pretext_share": share}
    forest_blend.train = pretrained_train(share, record)
    print(json.dumps(forest_blend.run_from_arguments(arguments, __doc__) | record))
