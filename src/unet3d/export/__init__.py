"""Trained networks for other software: ONNX graphs and BioImage.IO model packages."""

from unet3d.export.onnx import DEFAULT_OPSET, export_onnx, read_onnx_description

__all__ = ["DEFAULT_OPSET", "export_onnx", "read_onnx_description"]
