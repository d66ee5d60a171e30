"""Class probabilities for volumes of any size from a network that only ever sees one tile.

Both entry points share one generator of (region, probabilities) pieces that together cover the
volume exactly once: `predict_array` assembles them in memory, `predict_volume` writes labels,
probabilities and uncertainty region by region, so its peak memory follows the tile size, not
the volume size (blended same-padding windows, when asked for, also hold one slab of window
depth × the volume's Y × X).
"""

from __future__ import annotations

import collections
import contextlib
import time
from itertools import combinations
from typing import Iterator

import numpy as np
import torch

from unet3d.data.features import feature_memory_shortfall, region_with_input_features, with_input_features
from unet3d.data.normalization import apply_normalization, for_volume
from unet3d.device import resolve_device
from unet3d.errors import UserError
from unet3d.inference.memory import estimate_tile_bytes, fix_mmap_threshold
from unet3d.inference.tiling import (TilePlan, blend_bytes, blends, choose_output_tile, gaussian_weight, mirrored_box,
                                     plan_tiles)
from unet3d.model.folding import fold_batch_norm
from unet3d.model.forest import ForestModel
from unet3d.model.info import ModelInfo
from unet3d.model.unet import UNet
from unet3d.progress import progress_bar

DEFAULT_MAX_MEMORY = 1 << 30
# A tile whose filter bank is made for it holds its bank inputs about three times over (the bank,
# the raw inputs kept for the forest, the normalized copy) where the tile plan counts them once,
# and the forest's block of features comes on top: its tiles are planned in this share of
# --max-memory (measured: 6.4 GiB peak for densify of 21 M voxels under --max-memory 8G).
BANK_TILE_SHARE = 0.25


def default_max_memory(device: torch.device) -> int:
    """Memory budget when none is given: 1 GiB of the host's, or half of a GPU's free memory (the
    estimate for CUDA counts float16 activations without cuDNN's workspace; the other half is its margin)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return DEFAULT_MAX_MEMORY


def prepare_network(model: UNet, device: torch.device) -> UNet:
    """The network as prediction runs it: batch norm folded, eval mode, on `device`, and for 3D
    nets channels-last (measured 1.3-2.2x faster on CPU)."""
    net = fold_batch_norm(model).to(device).eval()
    return net.to(memory_format=torch.channels_last_3d) if net.config.dims == 3 else net


def _autocast(device: torch.device):
    """float16 autocast on CUDA; none on CPU, where bf16 autocast was measured far slower."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _flip_sets(dims: int) -> list[tuple[int, ...]]:
    """Every combination of mirrored axes (8 in 3D; z is left alone by the per-slice 2D net)."""
    axes = (2, 3, 4) if dims == 3 else (3, 4)
    return [flip for r in range(len(axes) + 1) for flip in combinations(axes, r)]


def tile_probabilities(net: UNet, batch, device: torch.device, tta: bool = False) -> torch.Tensor:
    """Softmax probabilities (N, K, ...) on `device` of a batch of input tiles (N, C, ...), an array
    or a tensor; with `tta` the mean over all mirrored versions of each tile."""
    x = torch.as_tensor(batch, device=device)
    if net.config.dims == 3:
        x = x.to(memory_format=torch.channels_last_3d)
    flips = _flip_sets(net.config.dims) if tta else [()]
    total = None
    with torch.inference_mode(), _autocast(device):
        for axes in flips:
            logits = net(torch.flip(x, axes) if axes else x)
            probs = torch.softmax(logits.float(), dim=1)
            probs = torch.flip(probs, axes) if axes else probs
            total = probs if total is None else total + probs
    return (total / len(flips)).contiguous()


def read_tile(read, plan: TilePlan, start, device: torch.device) -> torch.Tensor:
    """The (C, ...) input tile of the output tile at `start` on `device`, mirrored there at the
    volume's borders from the one box read."""
    data, positions = mirrored_box(read, plan.volume_shape, *plan.input_box(start))
    x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(device)
    for axis, where in enumerate(positions, start=1):
        if where is not None:
            x = x.index_select(axis, torch.from_numpy(where).to(device))
    return x


def tile_outputs(net, read, plan: TilePlan, device, batch_size: int, tta: bool, progress: bool):
    """(output start, probabilities from the tile's output start to the end of its network
    output, on `device`) per tile, in order."""
    with progress_bar(len(plan.starts), unit="tile", disable=not progress, desc="predict") as bar:
        for starts in _batches(plan, batch_size):
            batch = torch.stack([read_tile(read, plan, s, device) for s in starts])
            for start, probs in zip(starts, tile_probabilities(net, batch, device, tta)):
                yield start, probs[(slice(None),) + tuple(slice(o, None) for o in plan.output_offset(start))]
            bar.update(len(starts))


def _batches(plan: TilePlan, batch_size: int):
    """Consecutive tiles, at most `batch_size` at a time, of one input shape (tiles at the faces of
    a seamless same-padding plan have smaller inputs)."""
    batch, shape = [], None
    for start in plan.starts:
        size = plan.input_box(start)[1]
        if batch and (len(batch) == batch_size or size != shape):
            yield batch
            batch = []
        batch.append(start)
        shape = size
    if batch:
        yield batch


def iter_regions(net, read, plan: TilePlan, device, batch_size: int = 1, tta: bool = False,
                 progress: bool = False) -> Iterator[tuple[tuple[slice, ...], torch.Tensor]]:
    """Final probabilities (K, z, y, x) region by region, still on `device` (copied once, to where
    the caller keeps them); the regions tile the volume exactly."""
    tiles = tile_outputs(net, read, plan, device, batch_size, tta, progress)
    if plan.blended:
        yield from _blend_rows(tiles, plan)
        return
    for start, probs in tiles:
        region = plan.output_region(start)
        yield region, probs[(slice(None),) + _extent(region)]


def _extent(region) -> tuple[slice, ...]:
    return tuple(slice(0, r.stop - r.start) for r in region)


def _blend_rows(tiles, plan: TilePlan):
    """Weighted mean of overlapping windows, accumulated where the windows were computed (on a GPU
    the host would spend longer blending than the network computing). Windows arrive in z order,
    so everything above the current window's z start is final and handed on at once: only about
    one window depth of accumulators is ever held."""
    _, height, width = plan.volume_shape
    origin, acc, total, weight = 0, None, None, None
    for start, probs in tiles:
        if acc is None:
            acc = probs.new_zeros((probs.shape[0], 0, height, width))
            total = probs.new_zeros((0, height, width))
            weight = gaussian_weight(plan.output_shape, probs.device)
        if start[0] > origin:
            done = start[0] - origin
            yield (slice(origin, start[0]), slice(0, height), slice(0, width)), acc[:, :done] / total[:done]
            acc, total, origin = acc[:, done:], total[done:], start[0]
        region = plan.output_region(start)
        grow = region[0].stop - origin - total.shape[0]
        if grow > 0:
            acc = torch.cat([acc, acc.new_zeros((acc.shape[0], grow, height, width))], dim=1)
            total = torch.cat([total, total.new_zeros((grow, height, width))])
        local = (slice(region[0].start - origin, region[0].stop - origin),) + region[1:]
        w = weight[_extent(region)]
        acc[(slice(None),) + local].addcmul_(w, probs[(slice(None),) + _extent(region)])
        total[local].add_(w)
    yield (slice(origin, plan.volume_shape[0]), slice(0, height), slice(0, width)), acc / total


def make_plan(model: UNet, shape, tile=None, max_memory: int | None = None, batch_size: int = 1,
              overlap: float | None = None, device: torch.device = torch.device("cpu"), report=None) -> TilePlan:
    """Tiles for a volume: `tile` (output tile size) if given, else the largest whose batch fits the
    budget on `device` (default_max_memory if none is given). `report(note)` hears when blending
    same-padding windows needs memory beyond the budget."""
    if tile is None:
        budget = max_memory or default_max_memory(device)
        try:
            tile = choose_output_tile(model.config, shape, budget, batch_size, overlap, device.type)
        except ValueError as exc:
            raise UserError(f"--max-memory {budget / 2**20:.0f}M: too small, {exc}") from None
        accumulators = blend_bytes(model.config, shape, tile) if blends(model.config, overlap) else 0
        excess = (estimate_tile_bytes(model.config, tile, batch_size, device.type) + accumulators - budget
                  if accumulators else 0)
        if excess > 0 and report is not None:
            report(f"note: blending windows over {shape[1]}×{shape[2]} planes takes about {excess / 2**20:.0f} MiB "
                   f"beyond --max-memory (accumulators of {accumulators / 2**20:.0f} MiB; a valid-padding model "
                   "streams within it)")
    return plan_tiles(model.config, shape, tile, overlap)


def time_middle_tile(model: UNet, read, forest_at, shape, clock, max_memory: int | None = None,
                     device: str = "cpu") -> tuple[float, TilePlan, tuple[slice, ...]]:
    """(seconds, plan, the tile's output region): the middle tile of the plan `predict_volume` makes for a (Z, Y, X) volume of
    `shape` under `max_memory`, timed by `clock` as prediction runs it — its input read with the
    tile's context (`read`: box → the network's input there), the network, and `forest_at` (block →
    the forest's probabilities, or None) on its output region."""
    device = resolve_device(device)
    plan = make_plan(model, shape, None, max_memory, device=device)
    net = prepare_network(model, device)
    start = plan.starts[len(plan.starts) // 2]
    began = clock()
    tile_probabilities(net, read_tile(read, plan, start, device)[None], device)
    if forest_at is not None:
        forest_at(plan.output_region(start))
    return clock() - began, plan, plan.output_region(start)


def predict_array(model: UNet, image: np.ndarray, *, tile=None, max_memory: int | None = None, batch_size: int = 1,
                  tta: bool = False, device: str = "cpu", overlap: float | None = None,
                  progress: bool = False) -> np.ndarray:
    """Class probabilities (K, Z, Y, X) float32 of a normalized (C, Z, Y, X) float32 image."""
    if image.ndim != 4 or image.shape[0] != model.config.in_channels:
        raise ValueError(f"expected a ({model.config.in_channels}, Z, Y, X) image, got shape {image.shape}")
    device = resolve_device(device)
    plan = make_plan(model, image.shape[1:], tile, max_memory, batch_size, overlap, device)
    net = prepare_network(model, device)
    out = np.empty((model.config.num_classes, *image.shape[1:]), np.float32)
    read = lambda box: image[(slice(None),) + box]  # noqa: E731
    target = torch.from_numpy(out)
    for region, probs in iter_regions(net, read, plan, device, batch_size, tta, progress):
        target[(slice(None),) + region].copy_(probs)
    return out


def normalized_entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy of the class probabilities over axis 0 divided by log K: 0 certain, 1 uniform."""
    p = np.clip(probs, 1e-12, 1.0)
    # Clipped: rounding lifts a float32 uniform distribution (a forest's tie) a hair above 1.
    return np.clip(-(p * np.log(p)).sum(axis=0) / np.log(probs.shape[0]), 0.0, 1.0)


def label_dtype(class_values) -> np.dtype:
    return np.min_scalar_type(min(class_values)) if min(class_values) < 0 else np.min_scalar_type(max(class_values))


def region_reader(source, normalization: dict, input_features: dict | None, per_region: bool = False,
                  max_memory: int | None = None):
    """box → the network's normalized input there.

    Filter-bank inputs are made once for the whole volume when they fit in free memory and in
    `max_memory` (62 float32 channels per image channel; never with `per_region`), else region by
    region from the region grown by the bank's reach: the same values, for more filtering work
    (1.6× the prediction's CPU time on EM). A per-volume normalization is fitted on the whole
    volume first, so every region shares it.
    """
    shape = tuple(source.shape[1:])
    if input_features is None:
        read = source.read
    elif per_region or bank_per_region(source, input_features, max_memory):
        read = lambda box: region_with_input_features(source.read, shape, box, input_features)  # noqa: E731
    else:
        inputs = apply_normalization(with_input_features(source.read(), input_features), normalization)
        return lambda box: inputs[(slice(None),) + box]
    normalization = for_volume(normalization, read, shape)
    return lambda box: apply_normalization(read(box), normalization)


def bank_per_region(source, input_features: dict | None, max_memory: int | None) -> bool:
    """Whether a network reading ilastik's filter bank has it made tile by tile: the whole volume's
    does not fit in free memory or in `max_memory`."""
    return input_features is not None and feature_memory_shortfall("image", source.shape, input_features,
                                                                   max_memory) is not None


def tile_memory(max_memory: int | None, per_region: bool) -> int | None:
    """The tile plan's share of `max_memory`: BANK_TILE_SHARE where each tile's filter bank is made
    for it (the plan counts a tile's inputs once)."""
    return int(BANK_TILE_SHARE * max_memory) if per_region and max_memory is not None else max_memory


class SharedBank:
    """The network's inputs made region by region, lending the forest the filter bank they hold.

    A network that reads ilastik's filter bank beside the image, blended with a forest on the same
    bank of the raw image, would otherwise have the bank made twice for every region: once with the
    tile's context for the network, once for the forest's blocks inside it. The raw inputs of the
    last `keep` tiles are kept until the forest has taken its blocks from them.
    """

    def __init__(self, source, normalization: dict, forest: ForestModel, keep: int):
        self.source, self.shape, self.forest = source, tuple(source.shape[1:]), forest
        self.normalization, self.keep = normalization, max(keep, 1) + 1
        self.channels = int(forest.normalization["channels"])
        self.kept: collections.OrderedDict = collections.OrderedDict()
        self.fallback = forest.region_probabilities(source.read, self.shape)

    @staticmethod
    def applies(input_features: dict | None, normalization: dict, forest: ForestModel | None) -> bool:
        """Whether the network's bank is the forest's: the same filters, of the raw image, one
        normalization for the whole volume."""
        return (forest is not None and input_features is not None and forest.bank == input_features
                and forest.normalization.get("method") == "none" and not normalization.get("per_volume"))

    def read(self, box) -> np.ndarray:
        """The network's normalized input in `box`, its raw inputs kept for the forest."""
        raw = region_with_input_features(self.source.read, self.shape, box, self.forest.bank)
        self.kept[tuple((b.start, b.stop) for b in box)] = raw
        while len(self.kept) > self.keep:
            self.kept.popitem(last=False)
        return apply_normalization(raw, self.normalization)

    def forest_at(self, block) -> np.ndarray:
        """The forest's (K, z, y, x) probabilities in `block`, from a kept tile's bank when one holds it."""
        for box, raw in reversed(self.kept.items()):
            if all(start <= k.start and k.stop <= stop for k, (start, stop) in zip(block, box)):
                inside = tuple(slice(k.start - start, k.stop - start) for k, (start, _) in zip(block, box))
                bank = raw[(slice(self.channels, None),) + inside]
                probabilities = self.forest.probabilities(bank.reshape(bank.shape[0], -1))
                return probabilities.reshape((-1,) + bank.shape[1:])
        return self.fallback(block)


def network_and_forest(source, normalization: dict, input_features: dict | None, forest: ForestModel | None,
                       per_region: bool = False, batch_size: int = 1, max_memory: int | None = None,
                       forest_normalization: dict | None = None):
    """(box → the network's normalized input, block → the forest's probabilities or None): the
    filter bank made once per region for both where the network reads the forest's bank and the
    volume's bank is made region by region (`SharedBank`). `forest_normalization`: the forest's,
    already fitted for this volume (else fitted here)."""
    if SharedBank.applies(input_features, normalization, forest) and (
            per_region or bank_per_region(source, input_features, max_memory)):
        bank = SharedBank(source, normalization, forest, batch_size)
        return bank.read, bank.forest_at
    read = region_reader(source, normalization, input_features, per_region, max_memory)
    return read, (None if forest is None else
                  forest.region_probabilities(source.read, tuple(source.shape[1:]), forest_normalization))


class InMemory:
    """An image already in memory (C, Z, Y, X), read like an opened volume."""

    def __init__(self, image: np.ndarray):
        self.image, self.shape, self.meta = image, image.shape, None

    def read(self, box=None) -> np.ndarray:
        return self.image if box is None else self.image[(slice(None),) + tuple(box)]


def as_source(image):
    """An image to read box by box: an opened volume as it is, an array in memory as `InMemory`."""
    return image if hasattr(image, "read") else InMemory(image)


class Boxes:
    """A (C, Z, Y, X) volume made only for the boxes asked for, indexed as the array it stands for
    (`volume[:, z0:z1, y0:y1, x0:x1]`; `read`: box → the data there), for code that slices arrays."""

    def __init__(self, read, shape):
        self.read, self.shape = read, tuple(shape)

    def __getitem__(self, index: tuple) -> np.ndarray:
        if index[0] != slice(None) or len(index) != 4:
            raise IndexError("a volume read box by box takes [:, z, y, x] slices only")
        return self.read(tuple(index[1:]))


def predict_image(model: UNet, info: ModelInfo | dict, image: np.ndarray, *, device: str = "cpu", tta: bool = False,
                  progress: bool = False, forest: ForestModel | None = None) -> np.ndarray:
    """Class probabilities (K, Z, Y, X) of an image in memory (C, Z, Y, X), with the inputs a
    model file describes (its normalization, its filter-bank channels) as `predict_volume` makes
    them, blended with the model's `forest` when it has one."""
    info = ModelInfo.of(info, model.config)
    source = InMemory(np.asarray(image, np.float32))
    read = region_reader(source, info.normalization, info.input_features)
    probabilities = predict_array(model, read((slice(None),) * 3), device=device, tta=tta, progress=progress)
    if forest is None:
        return probabilities
    everything = tuple(slice(0, n) for n in source.shape[1:])
    return forest.blend_region(probabilities, everything, forest.region_probabilities(source.read, source.shape[1:]))


class _ArrayTarget:
    """An array (in memory, or a Zarr array behind a napari layer) written region by region like an output file."""

    def __init__(self, array):
        self.array = array

    def write(self, region, values: np.ndarray) -> None:
        """`values` of a (Z, Y, X) `region`, with the channels in front when the array has them."""
        self.array[(slice(None),) * (self.array.ndim - len(region)) + tuple(region)] = values


def predict_volume(model: UNet, info: ModelInfo | dict, source, label_out=None, prob_out=None, uncertainty_out=None, *,
                   tile=None, max_memory: int | None = None, batch_size: int = 1, tta: bool = False,
                   device: str = "cpu", overlap: float | None = None, progress: bool = False, report=None,
                   forest: ForestModel | None = None, like=None, on_written=None) -> dict:
    """Predict an opened volume and write the requested outputs region by region; with the model's
    `forest`, each region's probabilities are the blend of the network's and the forest's there
    (its filter bank made for that region alone).

    label_out: label values (argmax mapped through the model's class values), a file spec or an array
    of the volume's shape to fill (numpy, Zarr); prob_out: float16 class
    probabilities (K, Z, Y, X); uncertainty_out: float32 normalized entropy. Outputs share the
    source's geometry (affine, spacing), or `like`'s (a VolumeMeta). `report(note)` hears the memory decisions worth telling a
    user (blending beyond the budget, the filter bank made tile by tile). `on_written(voxels, total)` hears
    how many voxels are written after each region (a GUI's progress). Returns a summary.
    """
    from unet3d.io import volume_writer

    fix_mmap_threshold()  # otherwise the heap grows tile after tile
    config = model.config
    shape = tuple(source.shape[1:])
    info = ModelInfo.of(info, config)
    normalization, class_values = info.normalization, np.asarray(info.class_values)
    device = resolve_device(device)
    input_features = info.input_features
    per_region = bank_per_region(source, input_features, max_memory)
    if per_region and report is not None:
        report("the filter bank of the whole volume does not fit in free memory; computing it tile by tile"
               + (" for the network and the forest together" if SharedBank.applies(input_features, normalization,
                                                                                    forest) else " (slower)"))
    plan = make_plan(model, shape, tile, tile_memory(max_memory, per_region), batch_size, overlap, device, report)
    net = prepare_network(model, device)
    read, forest_at = network_and_forest(source, normalization, input_features, forest, per_region, batch_size,
                                         max_memory)
    counts = np.zeros(config.num_classes, np.int64)
    began = time.perf_counter()
    with contextlib.ExitStack() as stack:
        def open_writer(spec, out_shape, dtype):
            if hasattr(spec, "__setitem__"):
                return _ArrayTarget(spec)
            geometry = like if like is not None else source.meta
            return stack.enter_context(volume_writer(spec, out_shape, dtype, like=geometry)) if spec else None

        values_dtype = label_dtype(class_values.tolist())
        labels = open_writer(label_out, shape, values_dtype)
        probabilities = open_writer(prob_out, (config.num_classes, *shape), np.float16)
        uncertainty = open_writer(uncertainty_out, shape, np.float32)
        written, total = 0, int(np.prod(shape))
        for region, probs in iter_regions(net, read, plan, device, batch_size, tta, progress):
            probs = probs.cpu().numpy()
            if forest_at is not None:
                probs = forest.blend_region(probs, region, forest_at)
            winners = probs.argmax(axis=0)
            counts += np.bincount(winners.ravel(), minlength=config.num_classes)
            if labels:
                labels.write(region, class_values[winners].astype(values_dtype))
            if probabilities:
                probabilities.write(region, probs.astype(np.float16))
            if uncertainty:
                uncertainty.write(region, normalized_entropy(probs).astype(np.float32))
            written += int(np.prod(winners.shape))
            if on_written is not None:
                on_written(written, total)
    seconds = time.perf_counter() - began
    return {
        "shape": shape,
        "tiles": len(plan.starts),
        "forest": forest is not None,
        "input_tile": plan.input_shape,
        "output_tile": plan.output_shape,
        "seconds": seconds,
        "voxels_per_second": float(np.prod(shape)) / max(seconds, 1e-9),
        "class_fractions": {int(v): float(c) / counts.sum() for v, c in zip(class_values, counts)},
    }
