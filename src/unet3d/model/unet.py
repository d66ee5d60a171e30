"""The 3D U-Net of Çiçek et al. (2016), configurable, and the 2D U-Net it was compared with.

Both take and return 5-D tensors (N, C, Z, Y, X). The 2D variant applies 2D convolutions to
every z-slice independently, so tiling, training and evaluation code never needs to know which
one it holds; its geometry simply has no margin along z.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
import torch.nn.functional as F

from unet3d.model.geometry import Geometry

NORMS = ("batch", "instance", "group", "none")
PADDINGS = ("valid", "same")
NORM_AT_TEST = ("running", "batch")
# Output rows of a level computed at a time at inference (even, for pooling), and
# the rows a level's two 3×3 convolutions read beyond their output on each side (even).
SLAB_ROWS = 16
SLAB_HALO = 2


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild a network; stored inside every saved model."""

    in_channels: int = 1
    num_classes: int = 2
    width: int = 32
    levels: int = 4
    padding: str = "valid"
    norm: str = "batch"
    dims: int = 3
    norm_at_test: str = "running"

    def __post_init__(self):
        checks = [
            (self.in_channels >= 1, "in_channels must be at least 1"),
            (self.num_classes >= 2, "num_classes must be at least 2"),
            (self.width >= 1, "width must be at least 1"),
            (self.levels >= 1, "levels must be at least 1"),
            (self.padding in PADDINGS, f"padding must be one of {PADDINGS}"),
            (self.norm in NORMS, f"norm must be one of {NORMS}"),
            (self.dims in (2, 3), "dims must be 2 or 3"),
            (self.norm_at_test in NORM_AT_TEST, f"norm_at_test must be one of {NORM_AT_TEST}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_dict(cls, values: dict) -> "UNetConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.levels, self.padding, self.dims)


PRESETS = {
    # The paper's network: 3 channels in, 3 labels out, 32/64 ... 256/512, valid convolutions.
    "paper": UNetConfig(in_channels=3, num_classes=3, width=32, levels=4, padding="valid", norm="batch"),
}


def build_unet(**config) -> "UNet":
    """The network from its configuration's fields: the form a BioImage.IO package's architecture
    entry calls (`unet3d.model.unet.build_unet` with the fields as keyword arguments)."""
    return UNet(UNetConfig(**config))


class TestTimeBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm that can keep using the current batch's statistics in eval mode.

    The paper normalised with batch statistics at test time too (batch size 1); running
    statistics are the usual choice. Either way running statistics are never updated in eval.
    """

    def __init__(self, num_features: int, dims: int, use_batch_stats_at_test: bool = False):
        super().__init__(num_features)
        self.dims = dims
        self.use_batch_stats_at_test = use_batch_stats_at_test

    def _check_input_dim(self, x):
        if x.dim() != self.dims + 2:
            raise ValueError(f"expected {self.dims + 2}-D input, got {x.dim()}-D")

    def forward(self, x):
        if self.training or not self.use_batch_stats_at_test:
            return super().forward(x)
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


def _norm(kind: str, channels: int, dims: int, norm_at_test: str) -> nn.Module:
    if kind == "batch":
        return TestTimeBatchNorm(channels, dims, norm_at_test == "batch")
    if kind == "instance":
        return (nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d)(channels, affine=True)
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    return nn.Identity()


def convolve(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, ...]) -> torch.Tensor:
    """A 3×3(×3) convolution; at inference on the CPU, a 3D one always through oneDNN. PyTorch sends a
    batch of one whose channels × rows × columns are few (at most 20,480: the first convolution
    of a tile's slab, every level of a small volume's network) to its own im2col convolution,
    measured 4–10× slower there for 3–8 channels and 1.3–1.9× for one (a whole prediction of a
    one-channel 64×200×200 volume: 3–7 %); oneDNN's sums agree to float rounding."""
    if _onednn_inference(x):
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, list(padding), [1, 1, 1], [1, 1, 1], 1)
    return (F.conv3d if x.dim() == 5 else F.conv2d)(x, weight, bias, padding=padding)


def _onednn_inference(x: torch.Tensor) -> bool:
    return (x.dim() == 5 and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and torch.backends.mkldnn.is_available() and not torch.jit.is_tracing()
            and not torch.onnx.is_in_onnx_export())


class Conv3d(nn.Conv3d):
    """nn.Conv3d (same parameters) whose zero-padded convolution is `convolve`."""

    def _conv_forward(self, x, weight, bias):
        return convolve(x, weight, bias, self.padding)


class ConvBlock(nn.Sequential):
    """Two 3×3(×3) convolutions, each followed by normalization and ReLU."""

    def __init__(self, config: UNetConfig, in_ch: int, mid_ch: int, out_ch: int):
        conv = Conv3d if config.dims == 3 else nn.Conv2d
        pad = 1 if config.padding == "same" else 0
        layers = []
        for a, b in ((in_ch, mid_ch), (mid_ch, out_ch)):
            layers += [
                conv(a, b, kernel_size=3, padding=pad, bias=True),
                _norm(config.norm, b, config.dims, config.norm_at_test),
                nn.ReLU(inplace=True),
            ]
        super().__init__(*layers)


def center_crop(x: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Crop the trailing spatial axes of x symmetrically to `spatial` (valid-padding skips)."""
    index = [slice(None)] * (x.dim() - len(spatial))
    for have, want in zip(x.shape[-len(spatial):], spatial):
        start = (have - want) // 2
        index.append(slice(start, start + want))
    return x[tuple(index)]


class UNet(nn.Module):
    """U-Net with an analysis and a synthesis path of `levels` resolution steps.

    Level l's first convolution has width·2^l channels and its second doubles that (channels
    doubled before pooling, as in the paper); each up-convolution keeps its channel count.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        dims, w = config.dims, config.width
        conv_t = nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.pool = (nn.MaxPool3d if dims == 3 else nn.MaxPool2d)(2)

        self.encoders = nn.ModuleList()
        channels = config.in_channels
        for level in range(config.levels):
            mid = w * 2**level
            self.encoders.append(ConvBlock(config, channels, mid, 2 * mid))
            channels = 2 * mid
        self.upconvs = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(config.levels - 1)):
            skip = w * 2 ** (level + 1)
            self.upconvs.append(conv_t(channels, channels, kernel_size=2, stride=2, bias=False))
            self.decoders.append(ConvBlock(config, channels + skip, skip, skip))
            channels = skip
        self.head = conv(channels, config.num_classes, kernel_size=1, bias=True)

    @property
    def geometry(self) -> Geometry:
        return self.config.geometry

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, Z, Y, X) image → (N, classes, Z', Y', X') logits; Z' etc. per `geometry`."""
        if x.dim() != 5:
            raise ValueError(f"expected a 5-D tensor (N, C, Z, Y, X), got shape {tuple(x.shape)}")
        if self.config.dims == 2:
            n, c, z, y, xx = x.shape
            slices = x.permute(0, 2, 1, 3, 4).reshape(n * z, c, y, xx)
            out = self._forward_nd(slices)
            return out.reshape(n, z, *out.shape[1:]).permute(0, 2, 1, 3, 4)
        return self._forward_nd(x)

    def _forward_nd(self, x: torch.Tensor) -> torch.Tensor:
        slabs = self._runs_in_slabs()
        skips = []
        for level, encoder in enumerate(self.encoders):
            below = self.config.levels - 1 - level
            if not below:
                x = encoder(x)
                continue
            if slabs:
                x, skip = self._encode_in_slabs(encoder, x, below)
            else:
                x = encoder(x)
                # Pooling first: the pooled map and its indices need not coexist with the skip's copy.
                x, skip = self.pool(x), self._kept_for_decoder(x, below)
            skips.append(skip)
            del skip  # the decoder frees each skip once joined
        last = len(self.decoders) - 1
        for level, (upconv, decoder) in enumerate(zip(self.upconvs, self.decoders)):
            if slabs:
                x = self._decode_in_slabs(upconv, decoder, x, skips.pop(), self.head if level == last else None)
                continue
            x = upconv(x)
            # Rebinding x and popping the skip free both halves once joined (at inference).
            x = torch.cat([center_crop(skips.pop(), x.shape[2:]), x], dim=1)
            x = decoder(x)
        return x if slabs and self.decoders else self.head(x)

    def _kept_for_decoder(self, x: torch.Tensor, levels_below: int) -> torch.Tensor:
        """The part of an encoder output that its decoder reads. Without gradients, a valid-padding
        network keeps a copy of that part alone, so the full-size output is freed right away: the
        uncropped skips held a third of a tile's peak memory, and a lower peak buys larger tiles,
        which spend less of their work on the context margin."""
        if self.config.padding == "same" or torch.is_grad_enabled():
            return x
        kept = center_crop(x, tuple(self._kept_size(n, levels_below) for n in x.shape[2:]))
        return kept.clone(memory_format=_layout(x))

    def _runs_in_slabs(self) -> bool:
        """Whether every level above the bottom may run slab by slab: at inference, normalized voxel by
        voxel (batch norm with running statistics, or none), so a slab sees what the whole does."""
        local_norm = self.config.norm == "none" or (self.config.norm == "batch" and self.config.norm_at_test == "running")
        return local_norm and not self.training and not torch.is_grad_enabled()

    def _slab_rows(self, start: int, stop: int, rows_in: int) -> tuple[int, int]:
        """The input rows [first, end) from which a level's two convolutions give output rows
        [start, stop): valid padding reads the halo of both sides after `start`, same padding reads
        it on each side within the map."""
        if self.config.padding == "valid":
            return start, stop + 2 * SLAB_HALO
        return max(0, start - SLAB_HALO), min(rows_in, stop + SLAB_HALO)

    def _level_rows(self, rows_in: int) -> int:
        """Output rows of a level's two convolutions for `rows_in` input rows."""
        return rows_in - 2 * SLAB_HALO if self.config.padding == "valid" else rows_in

    def _block_on_slab(self, block: nn.Module, x: torch.Tensor, first: int, end: int, rows_in: int) -> torch.Tensor:
        """A two-convolution block on x, the rows [first, end) of a map of `rows_in` rows. With same
        padding, a convolution pads rows with zeros only at the map's own border and drops a row at
        each slab edge inside the map: the output is exactly the whole map's there, and the second
        convolution computes no row twice. (A slab at a border is padded on both sides and loses the
        inner row: a view, where padding one side would copy the slab.)"""
        if self.config.padding == "valid":
            return block(x)
        top, bottom = int(first == 0), int(end == rows_in)
        pad = int(top or bottom)
        for layer in block:
            if isinstance(layer, (nn.Conv3d, nn.Conv2d)):
                x = convolve(x, layer.weight, layer.bias, (pad,) + layer.padding[1:])
                x = x[:, :, pad - top:x.shape[2] - (pad - bottom)]
            else:
                x = layer(x)
        return x

    def _kept_size(self, n: int, levels_below: int) -> int:
        """Size of the part of an encoder output of size n that its decoder reads."""
        return n if self.config.padding == "same" else _decoder_input_size(n, levels_below)

    def _encode_in_slabs(self, encoder: nn.Module, x: torch.Tensor, levels_below: int):
        """An encoder level's pooled output and the part of its output that its decoder reads,
        computed SLAB_ROWS output rows at a time along the first spatial axis: the level's full-size
        maps never exist whole (bar a same-padding skip), so tiles can grow."""
        rows_in = x.shape[2]
        rows, *plane = (self._level_rows(n) for n in x.shape[2:])
        kept_shape = [self._kept_size(n, levels_below) for n in (rows, *plane)]
        first_kept = (rows - kept_shape[0]) // 2
        pooled = kept = None
        for start in range(0, rows, SLAB_ROWS):
            stop = min(start + SLAB_ROWS, rows)
            first, end = self._slab_rows(start, stop, rows_in)
            out = self._block_on_slab(encoder, x[:, :, first:end], first, end, rows_in)[:, :, :stop - start]
            if pooled is None:
                new = dict(dtype=out.dtype, device=out.device, memory_format=_layout(out))
                pooled = torch.empty(*out.shape[:2], rows // 2, *(n // 2 for n in plane), **new)
                kept = torch.empty(*out.shape[:2], *kept_shape, **new)
            pooled[:, :, start // 2:stop // 2] = self.pool(out)
            low, high = max(start, first_kept), min(stop, first_kept + kept_shape[0])
            if low < high:
                kept[:, :, low - first_kept:high - first_kept] = center_crop(out[:, :, low - start:high - start],
                                                                             (high - low, *kept_shape[1:]))
            del out  # before the next slab's maps exist
        return pooled, kept

    def _decode_in_slabs(self, upconv: nn.Module, decoder: nn.Module, x: torch.Tensor, skip: torch.Tensor,
                         head: nn.Module | None):
        """A decoder level (up-convolution, join, convolutions, and the 1×1 head after the last),
        SLAB_ROWS output rows at a time, for the same reason: the join never exists whole.
        Up-convolved row r comes from row r // 2 of x."""
        rows_in = 2 * x.shape[2]
        rows = self._level_rows(rows_in)
        decoded = None
        for start in range(0, rows, SLAB_ROWS):
            stop = min(start + SLAB_ROWS, rows)
            first, end = self._slab_rows(start, stop, rows_in)
            joined = torch.cat([skip[:, :, first:end], upconv(x[:, :, first // 2:end // 2])], dim=1)
            out = self._block_on_slab(decoder, joined, first, end, rows_in)[:, :, :stop - start]
            out = head(out) if head is not None else out
            if decoded is None:
                decoded = torch.empty(*out.shape[:2], rows, *out.shape[3:], dtype=out.dtype, device=out.device,
                                      memory_format=_layout(out))
            decoded[:, :, start:stop] = out
            del joined, out  # before the next slab's maps exist
        return decoded


def _layout(x: torch.Tensor) -> torch.memory_format:
    """Channels-last where x is stored so (prediction's layout), else the default."""
    layout = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    return layout if x.is_contiguous(memory_format=layout) else torch.contiguous_format


def _decoder_input_size(n: int, levels_below: int) -> int:
    """Valid padding: the size of the up-convolution output that meets a skip of size `n`."""
    for _ in range(levels_below):
        n = n // 2 - 4
    for _ in range(levels_below - 1):
        n = 2 * n - 4
    return 2 * n


def count_parameters(model: nn.Module, include_norm: bool = False) -> int:
    """Trainable parameters, counted as the paper does: convolutions only (weights and biases).

    Normalization layers' scale and shift are left out unless `include_norm`; with them left out
    the paper preset gives exactly the paper's 19,069,955.
    """
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm)
    total = 0
    for module in model.modules():
        if isinstance(module, norm_types) and not include_norm:
            continue
        total += sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
    return total
