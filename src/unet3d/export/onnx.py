"""ONNX export of a trained network, for ONNX Runtime and other inference engines.

The exported graph is the prediction network: batch norm folded into the convolutions, logits
out (softmax is left to the caller, as in PyTorch), batch and spatial axes dynamic so any valid
tile size runs. The model's description (configuration, classes, intensity normalization, patch
geometry) travels in the file's metadata under the key "unet3d", so the .onnx file is as
self-describing as the model file it came from.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch

import unet3d
from unet3d.atomic import atomic_path
from unet3d.errors import UserError
from unet3d.model.folding import fold_batch_norm
from unet3d.model.info import ModelInfo
from unet3d.model.unet import UNet

# Opset 17 is the newest the TorchScript exporter writes without warnings and runs on every
# ONNX Runtime since 1.14 (2023); nothing in the network needs a newer operator.
DEFAULT_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "logits"


def _require_onnx(path: Path):
    try:
        import onnx
    except ImportError:
        raise UserError(f"{path}: ONNX export needs the onnx package (pip install 'unet3d[onnx]')") from None
    return onnx


def _dynamic_axes() -> dict:
    return {
        INPUT_NAME: {0: "batch", 2: "z", 3: "y", 4: "x"},
        OUTPUT_NAME: {0: "batch", 2: "z_out", 3: "y_out", 4: "x_out"},
    }


def example_input(net: UNet) -> torch.Tensor:
    """A small valid input tile to trace `net` on (at least 16 voxels per axis, so even the
    coarsest level holds more than one value per normalization group)."""
    config = net.config
    return torch.zeros(1, config.in_channels, *config.geometry.valid_input_shape((16, 16, 16)))


def _trace_to_onnx(net: UNet, opset: int) -> bytes:
    """Serialized ONNX graph of `net`, traced on `example_input`.

    The TorchScript-based exporter is used on purpose: it records the crops and reshapes as shape
    arithmetic, so the graph stays valid for every tile size, needs no onnxscript, and exports
    in about a second (the torch.export-based one took 30 s for the same graph). It traces with
    gradients on, whatever the caller's mode: without them the network runs its levels in
    slabs of rows, a loop the trace would fix to the example tile's size.
    """
    example = example_input(net)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The exporter's own deprecation notices, and tracer notes on input-size checks (a norm
        # layer's "more than one value" test): the graph is verified at other sizes in the tests.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        with torch.enable_grad():
            torch.onnx.export(net, (example,), buffer, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_axes=_dynamic_axes(), do_constant_folding=True)
    return buffer.getvalue()


def check_exportable(model: UNet, path) -> None:
    """Refuse a network whose prediction is not a fixed function of its input tile."""
    if model.config.norm == "batch" and model.config.norm_at_test == "batch":
        raise UserError(f"{path}: a model that normalizes with each batch's own statistics at test time "
                        "cannot be exported (its batch norm cannot be folded)")


def export_onnx(model: UNet, path, info: ModelInfo | None = None, opset: int = DEFAULT_OPSET) -> None:
    """Write `model` (any mode; exported as it predicts) to an ONNX file atomically, with the
    model's configuration and `info` in the metadata."""
    path = Path(path)
    onnx = _require_onnx(path)
    check_exportable(model, path)
    net = fold_batch_norm(model).cpu().float().eval()
    graph = onnx.load_from_string(_trace_to_onnx(net, opset))
    description = {"config": model.config.to_dict(), "info": info.to_dict() if info is not None else {},
                   "unet3d": unet3d.__version__}
    onnx.helper.set_model_props(graph, {"unet3d": json.dumps(description)})
    onnx.checker.check_model(graph)
    with atomic_path(path) as tmp:
        onnx.save(graph, str(tmp))


def read_onnx_description(path) -> dict:
    """The unet3d description stored in an exported file ({'config', 'info', 'unet3d'})."""
    path = Path(path)
    onnx = _require_onnx(path)
    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types for corrupt files
        raise UserError(f"{path}: not an ONNX file ({exc})") from None
    props = {p.key: p.value for p in graph.metadata_props}
    if "unet3d" not in props:
        raise UserError(f"{path}: ONNX file without a unet3d description")
    return json.loads(props["unet3d"])
