"""ilastik's forest as the second half of a trained model: what it reads, how much the blend
trusts it, and how it travels inside the model file without pickle.

A network trained for minutes can trail the random forest on its filter bank within one
microscopy volume, and lead it by far across scans; which case a user is in shows only on
annotation neither model trained on. So a model file holds both, with the network's weight in
their geometric mean chosen there (`workflows.blend`), and prediction applies the blend region by
region (`region_probabilities`), with the filter bank computed per region from the image.

The forest is serialized with skops (the scikit-learn project's format for sharing estimators):
loading reads a declared tree structure and refuses any type outside a fixed allow-list, so a
model file can never run code, unlike a pickled forest. It rides in the safetensors file as one
uint8 tensor, beside the network's weights.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from unet3d.data.features import region_bank
from unet3d.data.normalization import apply_normalization, for_volume
from unet3d.errors import UserError
from unet3d.workflows.blend import weighted_geometric_mean

if TYPE_CHECKING:
    from sklearn.ensemble import RandomForestClassifier

TENSOR = "forest.skops"  # the safetensors key holding the serialized forest
# The only type skops does not trust by itself that a forest needs: the trees' node arrays.
TRUSTED_TYPES = ("sklearn.tree._tree.Tree",)
# Voxels per block of forest prediction: bounds the filter bank held at once (61 float32 values a
# voxel per image channel, so about 0.5 GiB) whatever the region's size.
BLOCK_VOXELS = 1 << 21
_PREDICT_CHUNK = 1 << 18  # voxels per predict_proba call


@dataclass
class ForestModel:
    """A fitted forest, the filter bank it reads, and its share of the blend with the network."""
    forest: RandomForestClassifier
    num_classes: int
    bank: dict  # the filter-bank spec (data.features.input_feature_spec) of the image it reads
    normalization: dict  # of the raw image channels before the bank, as in training
    network_weight: float  # the network's weight in the geometric mean (1: the network alone)
    evidence: dict = field(default_factory=dict)  # held-out scores behind the weight, for the record

    def describe(self) -> dict:
        """The JSON part stored in the model's description."""
        return {"num_classes": self.num_classes, "bank": self.bank, "normalization": self.normalization,
                "network_weight": self.network_weight, "trees": int(self.forest.n_estimators),
                "evidence": self.evidence}

    def to_bytes(self) -> bytes:
        import skops.io

        return skops.io.dumps(self.forest, compression=zipfile.ZIP_DEFLATED)

    @classmethod
    def from_parts(cls, description: dict, data: bytes, source: str) -> "ForestModel":
        return cls(load_forest_bytes(data, source), int(description["num_classes"]), description["bank"],
                   description["normalization"], float(description["network_weight"]),
                   description.get("evidence") or {})

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """(K, N) class probabilities of (F, N) features; classes the forest never saw stay 0."""
        out = np.zeros((self.num_classes, features.shape[1]), dtype=np.float32)
        for start in range(0, features.shape[1], _PREDICT_CHUNK):
            chunk = np.ascontiguousarray(features[:, start:start + _PREDICT_CHUNK].T)
            out[self.forest.classes_, start:start + chunk.shape[0]] = self.forest.predict_proba(chunk).T
        return out

    def blend(self, network: np.ndarray, forest: np.ndarray) -> np.ndarray:
        """The blend of the network's and the forest's (K, ...) probabilities this model was weighed for."""
        return weighted_geometric_mean(network, forest, self.network_weight)

    def blend_region(self, network: np.ndarray, box: tuple[slice, ...], forest_at) -> np.ndarray:
        """`network`'s (K, z, y, x) probabilities of `box` blended in place with the forest's there
        (`forest_at`: `region_probabilities`), block by block: the blend's temporaries stay the
        size of a block however large the region (a slab of 1024×1024 planes is tens of millions)."""
        for block in split_box(box, BLOCK_VOXELS):
            inside = (slice(None),) + tuple(slice(b.start - o.start, b.stop - o.start) for b, o in zip(block, box))
            network[inside] = self.blend(network[inside], forest_at(block))
        return network

    def volume_normalization(self, read, shape) -> dict:
        """The forest's normalization for one volume (`read`: box → raw (C, z, y, x)): a per-volume
        one is fitted on the whole volume, so every region shares it."""
        return for_volume(self.normalization, read, shape)

    def region_probabilities(self, read, shape, normalization: dict | None = None):
        """box → the forest's (K, z, y, x) probabilities there, block by block (`read` as in
        `volume_normalization`, whose result `normalization` is, when the caller has it already)."""
        fitted = normalization or self.volume_normalization(read, shape)
        normalized = lambda box: apply_normalization(read(box), fitted)  # noqa: E731

        def predict(box: tuple[slice, ...]) -> np.ndarray:
            out = np.empty((self.num_classes,) + tuple(b.stop - b.start for b in box), dtype=np.float32)
            for block in split_box(box, BLOCK_VOXELS):
                bank = region_bank(normalized, shape, block, self.bank)
                inside = (slice(None),) + tuple(slice(b.start - o.start, b.stop - o.start) for b, o in zip(block, box))
                out[inside] = self.probabilities(bank.reshape(bank.shape[0], -1)).reshape(out[inside].shape)
            return out

        return predict


def split_box(box: tuple[slice, ...], max_voxels: int) -> list[tuple[slice, ...]]:
    """`box` cut into blocks of at most `max_voxels` voxels, halving the longest axis each time
    (cubic blocks keep the filter bank's halo small against the block)."""
    sizes = [b.stop - b.start for b in box]
    if int(np.prod(sizes)) <= max_voxels or max(sizes) == 1:
        return [box]
    axis = int(np.argmax(sizes))
    middle = box[axis].start + sizes[axis] // 2
    halves = (slice(box[axis].start, middle), slice(middle, box[axis].stop))
    return [block for half in halves
            for block in split_box(box[:axis] + (half,) + box[axis + 1:], max_voxels)]


def load_forest_bytes(data: bytes, source: str):
    """The forest in skops `data`, refusing files that need any type beyond TRUSTED_TYPES."""
    import skops.io

    try:
        untrusted = skops.io.get_untrusted_types(data=data)
    except (zipfile.BadZipFile, ValueError, KeyError, io.UnsupportedOperation) as exc:
        raise UserError(f"{source}: the stored forest is not readable ({exc})") from None
    refused = sorted(set(untrusted) - set(TRUSTED_TYPES))
    if refused:
        raise UserError(f"{source}: the stored forest needs types unet3d does not load ({', '.join(refused)})")
    return skops.io.loads(data, trusted=list(TRUSTED_TYPES))
