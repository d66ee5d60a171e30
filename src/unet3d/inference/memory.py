"""What one batch of tiles costs in memory, and keeping the C heap from growing tile after tile.

The tile size follows a memory budget, so the estimate must be close: too high and tiles shrink
(a valid-padding tile then spends most of its work on the context margin), too low and the
budget is exceeded. The forward pass is replayed on the meta device (no memory, no time) while
every tensor is counted from its creation until Python frees it, exactly as inference frees
activations; convolution scratch space and the arrays around the forward pass are added.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from unet3d.model import UNet, UNetConfig
from unet3d.model.folding import fold_batch_norm

M_MMAP_THRESHOLD = -3  # mallopt parameter number from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20
IM2COL_MAX_CHANNELS = 2
IM2COL_CAP_BYTES = 128 << 20
CONVOLUTIONS = (torch.conv2d, torch.conv3d, torch.conv_transpose2d, torch.conv_transpose3d,
                torch.ops.aten.mkldnn_convolution, torch.ops.aten.mkldnn_convolution.default)
MAX_POOLS = (torch.nn.functional.max_pool2d, torch.nn.functional.max_pool3d)


@functools.cache
def fix_mmap_threshold() -> bool:
    """Give every block of 1 MiB and more its own mapping, returned to the system when freed.

    glibc raises its mmap threshold each time a mapped block is freed (up to 32 MiB), so from the
    second tile on, activations come from the heap, whose freed pieces are fragmented and rarely
    returned: resident memory crept up by hundreds of MiB over a few hundred tiles. With the
    threshold fixed, memory returns to the same level after every tile. False where the C
    library has no mallopt (musl, macOS, Windows).
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


class _LiveBytes(TorchFunctionMode):
    """Highest total size of the storages alive at once while the mode is active (`peak`), and
    the largest convolution scratch buffer (`scratch`), which oneDNN keeps once allocated.

    It sees every torch function's result, and adds the indices max pooling makes and frees inside
    the function. (A dispatch mode, one level lower, sees those by itself, but entering one imports
    torch._dynamo: about 3 s once per process, half of `unet3d predict` on a small volume.)"""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.peak = 0
        self.scratch = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = meta_cat(*args, **kwargs) if func is torch.cat and _on_meta(args) else func(*args, **kwargs)
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._count(tensor.untyped_storage())
        if func in CONVOLUTIONS:
            self.scratch = max(self.scratch, _im2col_bytes(args[1], out))
        if func in MAX_POOLS:
            self.peak = max(self.peak, sum(self.live.values()) + 8 * out.numel())
        return out

    def _count(self, storage) -> None:
        """Views and in-place results share their base's storage, which is counted once, until freed."""
        key = storage._cdata
        if key not in self.live:
            self.live[key] = storage.nbytes()
            weakref.finalize(storage, self.live.pop, key, None)
            self.peak = max(self.peak, sum(self.live.values()))


def _on_meta(args) -> bool:
    return all(t.is_meta for t in args[0])


def meta_cat(tensors, dim: int = 0) -> torch.Tensor:
    """torch.cat's result on the meta device (same shape, dtype and layout), made without PyTorch's
    Python meta kernel for cat, whose first call imports torch._dynamo (see _LiveBytes)."""
    shape = list(tensors[0].shape)
    dim %= len(shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape), torch.contiguous_format)
    if any(not t.is_contiguous(memory_format=layout) or t.is_contiguous() for t in tensors):
        layout = torch.contiguous_format
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=layout)


def _im2col_bytes(weight: torch.Tensor, output: torch.Tensor) -> int:
    """oneDNN runs 3D convolutions of one or two input channels through an im2col buffer:
    taps × channels × output voxels plus a copy of the output for small outputs, capped near
    IM2COL_CAP_BYTES for large ones (measured on PyTorch 2.13 CPU, 48³ to 156³ tiles)."""
    if weight.dim() != 5 or weight.shape[1] > IM2COL_MAX_CHANNELS:
        return 0
    voxels = output.numel() // output.shape[1]
    return min(output.element_size() * voxels * (weight[0].numel() + output.shape[1]), IM2COL_CAP_BYTES)


@functools.lru_cache(maxsize=8)
def _meta_network(config: UNetConfig, device_type: str) -> UNet:
    """The network as prediction runs it on `device_type` (batch norm folded away; on CUDA in float16,
    as autocast runs it there), without any weights. Folded in uninitialized CPU memory: folding
    on the meta device would run PyTorch's Python meta kernels (see meta_cat)."""
    with torch.device("meta"):
        net = UNet(config).eval()
    net = fold_batch_norm(net.to_empty(device="cpu")).to("meta")
    return net.half() if device_type == "cuda" else net


@functools.lru_cache(maxsize=4096)
def forward_peak_bytes(config: UNetConfig, input_shape: tuple, batch_size: int = 1, device_type: str = "cpu") -> int:
    """Most bytes one inference pass (input tile → class probabilities) holds at once on `device_type`.
    Cached: choosing a tile replays the pass for a few dozen candidate shapes."""
    net = _meta_network(config, device_type)
    dtype = torch.float16 if device_type == "cuda" else torch.float32
    counter = _LiveBytes()
    with torch.no_grad(), counter:
        x = torch.empty(batch_size, config.in_channels, *input_shape, device="meta", dtype=dtype)
        if config.dims == 3:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        logits = net(x)
        probabilities = torch.softmax(logits.float(), dim=1).contiguous()
        del x, logits, probabilities
    scratch = counter.scratch if device_type == "cpu" else 0  # oneDNN's im2col; cuDNN's workspace is not modelled
    return counter.peak + scratch


def estimate_tile_bytes(config: UNetConfig, input_shape, batch_size: int = 1, device_type: str = "cpu") -> int:
    """Peak memory of one batch of tiles: the forward pass, the input batch as read from disk,
    and one more copy of the probabilities for the outputs computed from them."""
    read = 4 * batch_size * config.in_channels * math.prod(input_shape)
    output = 4 * batch_size * config.num_classes * math.prod(config.geometry.output_shape(input_shape))
    return forward_peak_bytes(config, tuple(input_shape), batch_size, device_type) + read + output
