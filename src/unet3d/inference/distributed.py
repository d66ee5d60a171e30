"""Prediction of volumes too large for one machine on a Dask cluster, block by block.

The client plans everything first and touches nothing until every check has passed: the model
and the image are opened, their channels compared, per-volume normalization statistics fitted
once for the whole volume, and the tiles of the whole volume planned exactly as single-process
prediction plans them. The volume is then cut into blocks, each one chunk of every output
array. A worker predicts a block from the tiles of that plan that touch it (the tiles inside
it, read with their context margin; blended same-padding windows: every window overlapping it,
blended with the same weights), so the result equals the single-process one, and writes the
block straight into the output store; only a word per block returns to the client.

Workers load the network once per process (cached by path and weight digest). A block's
done-marker is written after its data, so an interrupted run resumes with the blocks still
missing, and a block written twice (a lost worker's, redone by Dask) is written identically.
Dask and ome-zarr are imported only here, when a prediction on a cluster is asked for.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import os
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from unet3d.data.features import region_with_input_features
from unet3d.data.normalization import for_volume
from unet3d.device import resolve_device
from unet3d.errors import UserError
from unet3d.inference.memory import fix_mmap_threshold
from unet3d.inference.predictor import (DEFAULT_MAX_MEMORY, label_dtype, make_plan, network_and_forest, prepare_network,
                                        tile_outputs, tile_probabilities)
from unet3d.inference.tiling import TilePlan, gaussian_weight, plan_tiles
from unet3d.io import open_volume, parse_spec
from unet3d.io.ome_zarr import (Block, PredictionStore, broken_chunks, done_blocks, downsample_block, prepare_store,
                                write_block, write_metadata)
from unet3d.io.readers import FORMAT_NAMES
from unet3d.model import load_forest, load_predictor
from unet3d.progress import progress_bar

DEFAULT_BLOCK = 256  # voxels per axis of a block (and output chunk) unless asked otherwise
CONNECT_TIMEOUT = 10.0  # seconds to reach a scheduler before giving up
REGION_FORMATS = ("zarr", "hdf5", "npy")  # inputs every worker reads region by region
MAX_NAMED = 8  # broken chunks named in the line that reports them
INSTALL = "prediction on Dask needs unet3d's distributed extra: pip install 'unet3d[distributed]'"


@dataclass(frozen=True)
class BlockJob:
    """What every block's task needs, planned once on the client; small enough to send to each worker."""

    model_path: str
    model_digest: str
    image: str  # spec with an absolute path: workers may run elsewhere
    channel_axis: int | None
    normalization: dict  # fitted: per-volume statistics already computed for the whole volume
    input_features: dict | None
    plan: TilePlan  # the whole volume's tile geometry, its starts left out (see axis_starts)
    axis_starts: tuple[tuple[int, ...], ...]  # the plan's tile starts along each axis
    store: PredictionStore
    device: str
    batch_size: int
    tta: bool
    skip_empty: float | None
    forest_normalization: dict | None = None  # fitted for the volume; None: the model has no forest


def predict_distributed(cluster, model_path: str, image: str, output: str, *, block=None, tile=None,
                        max_memory: int | None = None, batch_size: int = 1, tta: bool = False, overlap: float | None = None,
                        channel_axis: int | None = None, skip_empty: float | None = None, device: str = "cpu",
                        connect_timeout: float = CONNECT_TIMEOUT, progress: bool = False, report=None) -> dict:
    """Predict `image` with the model at `model_path` on a Dask cluster into the OME-Zarr store `output`.

    cluster: a `distributed.Client`, or an address: 'local' (a worker process per CPU core),
    'local:N', or a scheduler's 'tcp://HOST:PORT'. block: (Z, Y, X) block and chunk size, rounded
    up to the tile grid (default 256 per axis). skip_empty: blocks whose raw intensities are all
    at most this are written as the first class with probability 1 instead of being predicted.
    `max_memory` is the budget of one task. Returns a summary of the run.
    """
    job = plan_job(model_path, image, output, block=block, tile=tile, max_memory=max_memory, batch_size=batch_size,
                   tta=tta, overlap=overlap, channel_axis=channel_axis, skip_empty=skip_empty, device=device,
                   report=report)
    if not isinstance(cluster, str):
        return run_job(cluster, job, progress, report)
    with connect(cluster, connect_timeout) as client:
        return run_job(client, job, progress, report)


def plan_job(model_path: str, image: str, output: str, *, block=None, tile=None, max_memory: int | None = None,
             batch_size: int = 1, tta: bool = False, overlap: float | None = None, channel_axis: int | None = None,
             skip_empty: float | None = None, device: str = "cpu", report=None) -> BlockJob:
    """Every check and every decision of a run, on the client, before anything is written."""
    _require_packages()
    source, target = parse_spec(image), parse_spec(output)
    if source.format not in REGION_FORMATS:
        raise UserError(f"{image}: {FORMAT_NAMES[source.format]} files are not read region by region; convert the "
                        "image to OME-Zarr (or HDF5) for prediction on Dask")
    if target.format != "zarr" or target.key is not None:
        raise UserError(f"{output}: prediction on Dask writes an OME-Zarr store; name a path ending in .zarr "
                        "without a key")
    image = os.path.abspath(source.path) + (f":/{source.key}" if source.key else "")
    model, info, forest = load_predictor(model_path)
    config = model.config
    features = info.input_features
    with open_volume(image, "image", channel_axis) as volume:
        shape = tuple(volume.shape[1:])
        expected = info.image_channels(config)
        if volume.shape[0] != expected:
            raise UserError(f"{source.text}: {volume.shape[0]} channel(s), but {model_path} expects {expected} "
                            "(use --channel-axis if the channels were not detected)")
        normalization = for_volume(info.normalization, raw_reader(volume, features), shape)
        forest_normalization = None if forest is None else forest.volume_normalization(volume.read, shape)
        spacing = volume.meta.spacing
    if tile is None:
        wanted = tuple(min(b, n) for b, n in zip(block or (DEFAULT_BLOCK,) * 3, shape))
        planning_device = torch.device("cuda" if device == "cuda" else "cpu")  # the client may have no GPU
        tile = make_plan(model, wanted, None, max_memory or DEFAULT_MAX_MEMORY, batch_size, overlap,
                         planning_device, report).output_shape
    plan = plan_tiles(config, shape, tile, overlap)
    class_values = tuple(info.class_values)
    digest = model_digest(model)
    settings = {"model": digest, "normalization": normalization, "features": features, "tta": tta,
                "forest": info.forest,
                "input": plan.input_shape, "output": plan.output_shape, "skip_empty": skip_empty}
    store = PredictionStore(
        path=os.path.abspath(target.path), shape=shape, block=block_shape(plan, block), class_values=class_values,
        label_dtype=str(label_dtype(list(class_values))), model=_digest(json.dumps(settings, sort_keys=True)),
        spacing=tuple(spacing) if spacing else None)
    axis_starts = tuple(tuple(sorted({s[a] for s in plan.starts})) for a in range(3))
    return BlockJob(os.path.abspath(model_path), digest, image, channel_axis, normalization, features,
                    replace(plan, starts=[]), axis_starts, store, device, batch_size, tta, skip_empty,
                    forest_normalization)


def block_shape(plan: TilePlan, wanted=None) -> tuple[int, int, int]:
    """Blocks of `wanted` size (default DEFAULT_BLOCK) at most the volume; for valid padding rounded
    up to whole output tiles, so that every tile lies in exactly one block."""
    wanted = wanted or (DEFAULT_BLOCK,) * 3
    if not plan.blended:
        wanted = tuple(-(-w // t) * t for w, t in zip(wanted, plan.output_shape))
    return tuple(min(w, n) for w, n in zip(wanted, plan.volume_shape))


def model_digest(model) -> str:
    """SHA-256 of a network's architecture and weights: names the model a store was written with."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _require_packages() -> None:
    try:
        import distributed  # noqa: F401
        import ome_zarr  # noqa: F401
    except ImportError:
        raise UserError(INSTALL) from None


@contextlib.contextmanager
def connect(address: str, timeout: float = CONNECT_TIMEOUT):
    """A client of the cluster `address` names ('local', 'local:N' or a scheduler address), closed
    on exit together with a local cluster it started; an unreachable scheduler is a UserError
    after `timeout` seconds."""
    _require_packages()
    import distributed

    if address == "local" or address.startswith("local:"):
        workers = _local_workers(address)
        with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as cluster, distributed.Client(cluster) as client:
            yield client
        return
    try:
        client = distributed.Client(address, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"Dask scheduler {address}: not reachable within {timeout:g} s ({reason})") from None
    with client:
        yield client


def _local_workers(address: str) -> int:
    count = address.partition(":")[2]
    if not count:
        return os.cpu_count() or 1
    if not count.isdigit() or int(count) < 1:
        raise UserError(f"Dask cluster {address!r}: expected local or local:N with N a positive number of workers")
    return int(count)


def run_job(client, job: BlockJob, progress: bool = False, report=None) -> dict:
    """Prepare every worker, predict the blocks not yet done (or whose chunks were lost or damaged
    since, said in one line through `report`), then the pyramid levels, then write the OME metadata.
    The summary's `seconds` and `voxels_per_second` are those of the blocks' pass."""
    store = job.store
    started = time.perf_counter()
    client.run(prepare_worker, job)
    prepare_store(store)
    done = done_blocks(store)
    repaired = recheck_done(client, store, done, progress, report)
    todo = [(index, block) for index, block in store.blocks() if not done[index]]
    began = time.perf_counter()
    shared = client.scatter(job, broadcast=True)
    statuses = _run(client, [(predict_block, shared, index, block) for index, block in todo], progress, "predict")
    seconds = time.perf_counter() - began
    levels = store.level_shapes()
    pyramid_began = time.perf_counter()
    for level in range(1, len(levels)):
        _run(client, [(downsample_block, store, level, block) for _, block in store.blocks(level)], progress,
             f"level {level}")
    write_metadata(store)
    pyramid_seconds = time.perf_counter() - pyramid_began
    predicted = sum(int(np.prod([b.stop - b.start for b in block])) for _, block in todo)
    return {
        "shape": store.shape,
        "block": store.block,
        "blocks": len(done.flat),
        "already_done": int(done.sum()),
        "repaired": repaired,
        "predicted": statuses.count("predicted"),
        "empty": statuses.count("empty"),
        "levels": len(levels),
        "input_tile": job.plan.input_shape,
        "output_tile": job.plan.output_shape,
        "seconds": seconds,
        "pyramid_seconds": pyramid_seconds,
        "total_seconds": time.perf_counter() - started,
        "voxels_per_second": predicted / max(seconds, 1e-9),
        "workers": len(client.scheduler_info()["workers"]),
    }


def recheck_done(client, store: PredictionStore, done: np.ndarray, progress: bool, report=None) -> int:
    """Unmark the blocks marked done whose chunks are missing or corrupt, naming them in one line;
    returns how many blocks are to be predicted again."""
    calls = [(_checked_block, store, index, block) for index, block in store.blocks() if done[index]]
    broken = {index: keys for index, keys in _run(client, calls, progress, "check") if keys}
    for index in broken:
        done[index] = False
    if broken and report is not None:
        keys = [key for keys in broken.values() for key in sorted(keys)]
        shown = ", ".join(keys[:MAX_NAMED]) + (f" and {len(keys) - MAX_NAMED} more" if len(keys) > MAX_NAMED else "")
        report(f"{store.path}: {len(keys)} chunk(s) of {len(broken)} block(s) missing or corrupt, predicted again: "
               f"{shown}")
    return len(broken)


def _checked_block(store: PredictionStore, index, block: Block) -> tuple[tuple[int, ...], list[str]]:
    """Task: (the block's index, its broken chunks); results arrive in any order."""
    return tuple(index), broken_chunks(store, index, block)


def _run(client, calls: list[tuple], progress: bool, what: str) -> list:
    """Submit every call, wait for all with a progress bar; on the first failure cancel the rest.
    A worker lost mid-task costs only a retry: Dask runs its tasks again elsewhere."""
    import distributed

    futures = [client.submit(function, *args, pure=False) for function, *args in calls]
    results = []
    try:
        with progress_bar(len(futures), unit="block", desc=what, disable=not progress) as bar:
            for future in distributed.as_completed(futures):
                results.append(future.result())
                bar.update()
    except distributed.KilledWorker as exc:
        raise UserError(f"workers died repeatedly on one block ({exc}); they probably ran out of memory: give them "
                        "more, or lower --max-memory or --block") from None
    finally:
        client.cancel([f for f in futures if not f.done()])
    return results


def predict_block(job: BlockJob, index, block: Block) -> str:
    """Task: predict one block and write it with its marker; 'predicted' or 'empty'."""
    with open_volume(job.image, "image", job.channel_axis) as volume:
        if job.skip_empty is not None and float(volume.read(block).max()) <= job.skip_empty:
            probabilities = np.zeros((len(job.store.class_values), *(b.stop - b.start for b in block)), np.float32)
            probabilities[0] = 1
            status = "empty"
        else:
            net, device = _network(job.model_path, job.model_digest, job.device)
            forest = None if job.forest_normalization is None else _forest(job.model_path, job.model_digest)
            read, forest_at = network_and_forest(volume, job.normalization, job.input_features, forest,
                                                 per_region=True, batch_size=job.batch_size,
                                                 forest_normalization=job.forest_normalization)
            blend = None if forest is None else lambda part, region: forest.blend_region(part, region, forest_at)
            plan = replace(job.plan, starts=block_starts(job.axis_starts, job.plan.output_shape, block))
            probabilities = block_probabilities(net, read, plan, block, device, job.batch_size, job.tta, blend)
            status = "predicted"
    labels = np.asarray(job.store.class_values)[probabilities.argmax(axis=0)].astype(job.store.label_dtype)
    write_block(job.store, index, block, probabilities.astype(np.float16), labels)
    return status


def prepare_worker(job: BlockJob) -> None:
    """Run on every worker before any block: load the network (kept for the whole run) and pass one
    tile through it, so that a worker that cannot read the model fails the run before anything is
    written, and PyTorch's first pass of the tile's shape (seconds) is not paid inside a block."""
    net, device = _network(job.model_path, job.model_digest, job.device)
    tile_probabilities(net, torch.zeros((1, net.config.in_channels, *job.plan.input_shape)), device)


@functools.lru_cache(maxsize=2)
def _network(path: str, digest: str, device: str):
    """(prepared network, device), loaded once per worker process; a file changed since the client
    planned the run is refused rather than mixed into its blocks."""
    fix_mmap_threshold()  # otherwise the heap grows block after block
    model, _, _ = load_predictor(path)
    if model_digest(model) != digest:
        raise UserError(f"{path}: changed since the prediction was planned (or differs on this worker)")
    device = resolve_device(device)
    return prepare_network(model, device), device


@functools.lru_cache(maxsize=2)
def _forest(path: str, digest: str):
    """The model's forest, loaded once per worker process (`digest`: the network's, which the
    client checked when it planned; it keys the cache to the file planned)."""
    return load_forest(path)


def raw_reader(volume, features: dict | None):
    """box → the network's input there before normalization (with its filter bank, if it has one)."""
    if features is None:
        return volume.read
    shape = tuple(volume.shape[1:])
    return lambda box: region_with_input_features(volume.read, shape, box, features)


def block_starts(axis_starts, size, block: Block) -> list[tuple[int, int, int]]:
    """The tiles (output starts, in the plan's z, y, x order) whose output overlaps `block`."""
    per_axis = [[s for s in starts if s < b.stop and s + k > b.start] for starts, k, b in zip(axis_starts, size, block)]
    return list(itertools.product(*per_axis))


def block_probabilities(net, read, plan: TilePlan, block: Block, device, batch_size: int, tta: bool,
                        blend=None) -> np.ndarray:
    """Probabilities (K, *block) of one block from its tiles: a valid tile's output copied where it
    falls in the block, same-padding windows blended with the weights whole-volume prediction uses,
    accumulated in the same order. `blend(probabilities, region)` (the forest's, in place) is applied
    to each tile's part as it comes, where the tile's filter bank is still at hand (`SharedBank`),
    or to the whole block once windows are averaged."""
    shape = tuple(b.stop - b.start for b in block)
    probabilities = torch.zeros((net.config.num_classes, *shape), device=device)
    total = torch.zeros(shape, device=device) if plan.blended else None
    weight = gaussian_weight(plan.output_shape, device) if plan.blended else None
    everything = (slice(None),)
    for start, probs in tile_outputs(net, read, plan, device, batch_size, tta, False):
        inside = [(max(r.start, b.start), min(r.stop, b.stop)) for r, b in zip(plan.output_region(start), block)]
        source = tuple(slice(low - s, high - s) for (low, high), s in zip(inside, start))
        target = tuple(slice(low - b.start, high - b.start) for (low, high), b in zip(inside, block))
        if plan.blended:
            probabilities[everything + target].addcmul_(weight[source], probs[everything + source])
            total[target].add_(weight[source])
        elif blend is None:
            probabilities[everything + target] = probs[everything + source]
        else:
            part = probs[everything + source].cpu().numpy()
            region = tuple(slice(low, high) for low, high in inside)
            probabilities[everything + target] = torch.from_numpy(blend(part, region)).to(device)
    if not plan.blended:
        return probabilities.cpu().numpy()
    probabilities = (probabilities / total).cpu().numpy()
    return probabilities if blend is None else blend(probabilities, block)
