"""The OME-Zarr 0.5 (Zarr v3) store that block-wise prediction writes, block by block from many
processes at once.

Layout of `out.zarr`:

    zarr.json                     the image: class probabilities (c, z, y, x) float16, levels 0, 1, ...
    0/ 1/ ...                     probability levels (each half the previous along z, y and x)
    labels/segmentation/0/ 1/ ... the label map (z, y, x), integer, nearest-neighbour levels,
                                  `image-label` metadata with one colour per class
    unet3d_done/                  one uint8 per block of level 0, set once the block is written

Every block of every array is exactly one chunk, so no two writers ever touch the same chunk and
rewriting a block writes the same bytes (a lost worker's blocks are simply written again). A
block's marker is written after its data; Zarr's local store replaces files atomically, so a
marker never claims a half-written block. Every chunk is written, even one holding only zeros,
and carries a CRC-32C checksum, so a chunk lost or damaged afterwards is found
(`broken_chunks`) and its block predicted again. The OME metadata is removed when a run starts and
written last, after every level: a store that viewers see as an image is complete.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import asdict, dataclass

import numpy as np

from unet3d.errors import UserError

LABELS = "labels"
SEGMENTATION = "labels/segmentation"
DONE = "unet3d_done"
STATE = "unet3d"  # root attribute: what the store holds, to refuse resuming into a different one
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))

Block = tuple[slice, slice, slice]


@dataclass(frozen=True)
class PredictionStore:
    """Where a prediction goes and the geometry its blocks share; picklable, so workers get it whole."""

    path: str
    shape: tuple[int, int, int]
    block: tuple[int, int, int]
    class_values: tuple[int, ...]
    label_dtype: str
    model: str  # digest of the network's weights
    spacing: tuple[float, float, float] | None = None

    def level_shapes(self) -> list[tuple[int, int, int]]:
        """Level 0 and halvings (rounded up) until one block holds a level."""
        shapes = [self.shape]
        while any(n > b for n, b in zip(shapes[-1], self.block)):
            shapes.append(tuple(-(-n // 2) for n in shapes[-1]))
        return shapes

    def grid(self, level: int = 0) -> tuple[int, int, int]:
        return tuple(-(-n // b) for n, b in zip(self.level_shapes()[level], self.block))

    def blocks(self, level: int = 0) -> list[tuple[tuple[int, int, int], Block]]:
        """(grid index, region) of every block of a level, in z, y, x order."""
        shape = self.level_shapes()[level]
        return [(index, tuple(slice(i * b, min((i + 1) * b, n)) for i, b, n in zip(index, self.block, shape)))
                for index in itertools.product(*(range(g) for g in self.grid(level)))]

    def state(self) -> dict:
        state = asdict(self)
        del state["path"], state["spacing"]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in state.items()}


def prepare_store(store: PredictionStore) -> None:
    """Create the empty store, or check that an existing one holds this very prediction and mark it
    incomplete (its OME metadata removed) so it is resumed; anything else is a UserError."""
    import zarr

    try:
        root = zarr.open_group(store.path, mode="r+")
    except FileNotFoundError:
        _create(store)
        return
    except Exception as exc:  # a file, a Zarr v2 store, an array, unreadable metadata
        raise UserError(f"{store.path}: exists and is not a Zarr v3 group ({_first_line(exc)}); "
                        "remove it or choose another output") from None
    _check_state(store, root.attrs.get(STATE))
    for group in (root, root[LABELS], root[SEGMENTATION]):
        if "ome" in group.attrs:
            del group.attrs["ome"]


def _create(store: PredictionStore) -> None:
    """All arrays of all levels, built beside the target and renamed into place."""
    import zarr
    from zarr.codecs import Crc32cCodec, ZstdCodec

    from unet3d.io.writers import atomic_directory

    checked = {"fill_value": 0, "compressors": (ZstdCodec(), Crc32cCodec())}
    with atomic_directory(store.path, keep_existing=False) as tmp:
        root = zarr.open_group(tmp, mode="w", zarr_format=3)
        labels = root.create_group(SEGMENTATION)
        classes = len(store.class_values)
        for level, shape in enumerate(store.level_shapes()):
            chunks = tuple(min(b, n) for b, n in zip(store.block, shape))
            root.create_array(str(level), shape=(classes, *shape), chunks=(1, *chunks), dtype=np.float16,
                              dimension_names=list("czyx"), **checked)
            labels.create_array(str(level), shape=shape, chunks=chunks, dtype=store.label_dtype,
                                dimension_names=list("zyx"), **checked)
        root.create_array(DONE, shape=store.grid(), chunks=(1, 1, 1), dtype=np.uint8, fill_value=0)
        root.attrs[STATE] = store.state()


def _check_state(store: PredictionStore, found: dict | None) -> None:
    wanted = store.state()
    if found is None:
        raise UserError(f"{store.path}: exists and is not an output of block-wise prediction; "
                        "remove it or choose another output")
    if found == wanted:
        return
    if found.get("model") != wanted["model"] and {**found, "model": wanted["model"]} == wanted:
        raise UserError(f"{store.path}: was written by another model; remove it or choose another output")
    described = lambda s: (f"shape {tuple(s.get('shape', ()))}, blocks {tuple(s.get('block', ()))}, "  # noqa: E731
                           f"classes {tuple(s.get('class_values', ()))}, {s.get('label_dtype')} labels")
    raise UserError(f"{store.path}: exists with {described(found)}, this prediction needs {described(wanted)}; "
                    "remove it or choose another output")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def done_blocks(store: PredictionStore) -> np.ndarray:
    """Per block of level 0, whether it has been written (bool array of the block grid)."""
    import zarr

    return zarr.open_array(store.path, path=DONE, mode="r")[...] > 0


def write_block(store: PredictionStore, index, block: Block, probabilities: np.ndarray, labels: np.ndarray) -> None:
    """Level 0's data of one block, then its marker; chunks of zeros are written too, so that a
    missing chunk always means a lost one."""
    import zarr

    with zarr.config.set({"array.write_empty_chunks": True}):
        root = zarr.open_group(store.path, mode="r+")
        root["0"][(slice(None),) + block] = probabilities
        root[SEGMENTATION + "/0"][block] = labels
        root[DONE][tuple(index)] = 1


def broken_chunks(store: PredictionStore, index, block: Block) -> list[str]:
    """The level-0 chunks of a block marked done that are missing or do not decode (a checksum that
    does not match included), as 'KEY (missing)' or 'KEY (corrupt)', KEY relative to the store."""
    import zarr

    root = zarr.open_group(store.path, mode="r")
    chunk = "c/" + "/".join(map(str, index))
    parts = [(f"0/c/{k}/{chunk[2:]}", root["0"], (slice(k, k + 1),) + block) for k in range(len(store.class_values))]
    parts.append((f"{SEGMENTATION}/0/{chunk}", root[SEGMENTATION + "/0"], block))
    found = []
    for key, array, region in parts:
        if not os.path.isfile(os.path.join(store.path, key)):
            found.append(f"{key} (missing)")
            continue
        try:
            array[region]
        except Exception:  # codecs raise their own types
            found.append(f"{key} (corrupt)")
    return found


def downsample_block(store: PredictionStore, level: int, block: Block) -> None:
    """One block of `level` from every second voxel of the level above (nearest neighbour: label
    values stay values, and probabilities stay those of a voxel)."""
    import zarr

    root = zarr.open_group(store.path, mode="r+")
    source = tuple(slice(2 * b.start, 2 * b.stop, 2) for b in block)
    for group in (root, root[SEGMENTATION]):
        prefix = (slice(None),) if group is root else ()
        group[str(level)][prefix + block] = group[str(level - 1)][prefix + source]


def write_metadata(store: PredictionStore) -> None:
    """OME-Zarr 0.5 metadata, innermost first; the image's own multiscales go last, so a store that
    opens as an image in a viewer is complete."""
    import zarr
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import add_metadata, write_label_metadata, write_multiscales_metadata

    fmt = FormatV05()
    root = zarr.open_group(store.path, mode="r+")
    spacing = store.spacing or (1.0, 1.0, 1.0)
    levels = range(len(store.level_shapes()))
    spatial = [[s * 2**level for s in spacing] for level in levels]
    space = [{"name": a, "type": "space"} for a in "zyx"]
    write_multiscales_metadata(root[SEGMENTATION], _datasets(spatial), fmt, axes=space, name="segmentation")
    colors = [{"label-value": v, "rgba": _colour(i)} for i, v in enumerate(store.class_values)]
    properties = [{"label-value": v, "class": f"class {v}"} for v in store.class_values]
    write_label_metadata(root[LABELS], "segmentation", colors=colors, properties=properties, fmt=fmt)
    add_metadata(root[LABELS], {"version": fmt.version}, fmt)  # 0.5 asks for it; write_label_metadata omits it
    omero = {"channels": [{"label": f"class {v}", "color": "%02X%02X%02X" % tuple(_colour(i)[:3]),
                           "window": {"min": 0.0, "max": 1.0, "start": 0.0, "end": 1.0}, "active": True}
                          for i, v in enumerate(store.class_values)]}
    write_multiscales_metadata(root, _datasets([[1.0, *s] for s in spatial]), fmt,
                               axes=[{"name": "c", "type": "channel"}, *space], name="probabilities",
                               metadata={"omero": omero})


def _datasets(scales: list[list[float]]) -> list[dict]:
    return [{"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
            for level, scale in enumerate(scales)]


def _colour(rank: int) -> list[int]:
    """The first class (background) transparent white, the others from a palette of distinct colours."""
    if rank == 0:
        return [255, 255, 255, 0]
    return [*PALETTE[(rank - 1) % len(PALETTE)], 255]
