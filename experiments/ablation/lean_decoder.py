"""A lighter full-resolution decoder: more steps per CPU second for the same encoder.

Usage: .venv/bin/python experiments/ablation/lean_decoder.py VOLUME SLICES SEED BUDGET [notta] [forest_blend options]

densify's full-resolution decoder block joins the 32 up-sampled channels to the encoder's 16 and
convolves them to 16 and 16 channels: more than a third of a training step
(`profile_step.py --layers`). Here the up-convolution halves its channels (32 → 16) and the block
convolves 16 + 16 → 8 → 8, as wide as the network's first convolution, about a third of the
work at full resolution; the encoder and the coarser levels are unchanged. The rest is
forest_blend.py's run; prints its JSON line with "decoder": "lean".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from torch import nn

from experiments.ablation import forest_blend
from unet3d.model import unet

densify_init = unet.UNet.__init__


def lean_init(self, config: unet.UNetConfig):
    """densify's network, its last up-convolution, decoder block and head narrowed."""
    densify_init(self, config)
    up_channels = self.upconvs[-1].in_channels
    skip = config.width * 2
    self.upconvs[-1] = nn.ConvTranspose3d(up_channels, skip, kernel_size=2, stride=2, bias=False)
    self.decoders[-1] = unet.ConvBlock(config, 2 * skip, config.width, config.width)
    self.head = nn.Conv3d(config.width, config.num_classes, kernel_size=1, bias=True)


if __name__ == "__main__":
    unet.UNet.__init__ = lean_init
    print(json.dumps(forest_blend.run_from_arguments(sys.argv, __doc__) | {"decoder": "lean"}))
