"""Prediction of whole volumes of any size by tiling (seamless for valid-padding networks)."""

from unet3d.inference.predictor import (
    normalized_entropy,
    predict_array,
    predict_volume,
    tile_probabilities,
)
from unet3d.inference.memory import estimate_tile_bytes
from unet3d.inference.tiling import TilePlan, choose_output_tile, plan_tiles, reflect_index

__all__ = [
    "TilePlan", "choose_output_tile", "estimate_tile_bytes", "normalized_entropy",
    "plan_tiles", "predict_array", "predict_volume", "reflect_index", "tile_probabilities",
]
