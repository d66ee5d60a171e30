"""Training from sparse annotation: configuration, patch batches, optimisation loop, checkpoints."""

from unet3d.training.config import TrainConfig
from unet3d.training.trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
