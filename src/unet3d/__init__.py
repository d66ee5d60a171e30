"""unet3d: dense volumetric segmentation learned from sparse annotation."""

__version__ = "0.1.0"
