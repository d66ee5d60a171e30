"""What a model file says about its network besides the weights, as one typed record.

Prediction, export, Dask, napari and suggest read a model's classes, normalization and inputs
from here, with the defaults for what a file leaves out decided in one place (`ModelInfo.of`),
not at every reader.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from unet3d.data.features import raw_channels
from unet3d.model.unet import UNetConfig


@dataclass
class ModelInfo:
    class_values: list[int]  # the label value of each output channel
    normalization: dict  # fitted intensity normalization of the network's input channels
    input_features: dict | None = None  # ilastik's filter bank the network reads beside the image, if any
    ignore_label: int | None = None  # the value of unannotated voxels in the training labels
    spacing: list[float] | None = None  # (Z, Y, X) voxel spacing of the training volumes
    patch_shape: list[int] | None = None  # training input patch (Z, Y, X)
    output_shape: list[int] | None = None  # and its output
    training: dict = field(default_factory=dict)  # provenance: iterations, seconds, sources, configuration
    forest: dict | None = None  # the random forest blended with the network (`ForestModel.describe`), if any

    @classmethod
    def of(cls, info: dict | ModelInfo, config: UNetConfig) -> ModelInfo:
        """The record of a stored description (older files and packages leave fields out: the
        classes are then 0..K-1 and the input is not normalized)."""
        if isinstance(info, ModelInfo):
            return info
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {key: value for key, value in info.items() if key in known}
        fields.setdefault("class_values", list(range(config.num_classes)))
        fields["class_values"] = [int(v) for v in fields["class_values"]]
        fields["normalization"] = fields.get("normalization") or {"method": "none", "channels": config.in_channels}
        fields["training"] = fields.get("training") or {}
        return cls(**fields)

    def to_dict(self) -> dict:
        """The JSON-serialisable description stored in model files and packages."""
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}

    def without_forest(self) -> ModelInfo:
        return dataclasses.replace(self, forest=None)

    def image_channels(self, config: UNetConfig) -> int:
        """Channels of the image the network is given (before its filter-bank channels)."""
        return raw_channels(config.in_channels, self.input_features)
