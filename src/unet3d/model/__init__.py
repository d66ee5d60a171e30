"""The network, its geometry, batch-norm folding, its summary table and its file format."""

from unet3d.model.folding import fold_batch_norm
from unet3d.model.geometry import Geometry
from unet3d.model.forest import ForestModel
from unet3d.model.info import ModelInfo
from unet3d.model.serialization import load_forest, load_model, load_predictor, read_description, save_model
from unet3d.model.unet import PRESETS, UNet, UNetConfig, count_parameters

__all__ = ["ForestModel", "Geometry", "PRESETS", "UNet", "UNetConfig", "count_parameters", "fold_batch_norm", "ModelInfo", "load_forest", "load_model",
           "load_predictor", "read_description", "save_model"]
