import argparse
import sys

import numpy as np
import pytest
import torch

from unet3d.cli import export as export_cli
from unet3d.data.normalization import apply_normalization, fit_normalization
from unet3d.errors import UserError
from unet3d.export import export_onnx, read_onnx_description
from unet3d.model import ModelInfo, UNet, UNetConfig, save_model
from unet3d.model import unet


def run_export(*argv) -> None:
    parser = argparse.ArgumentParser()
    export_cli.register(parser.add_subparsers())
    args = parser.parse_args(["export", *map(str, argv)])
    args.run(args)


def random_model(config: UNetConfig) -> UNet:
    """A random network whose batch norms hold non-trivial running statistics, so folding matters."""
    torch.manual_seed(0)
    model = UNet(config)
    for module in model.modules():
        if isinstance(module, unet.TestTimeBatchNorm):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.uniform_(module.bias, -0.2, 0.2)
    return model.eval()


def real_crops(nuclei, config: UNetConfig) -> list[np.ndarray]:
    """Two differently sized valid tiles of the normalized nuclei image, (1, C, Z, Y, X) float32."""
    image = nuclei[0][None].astype(np.float32)
    image = apply_normalization(image, fit_normalization([image]))
    crops = []
    for wanted in ((31, 61, 57), (24, 40, 48)):
        shape = config.geometry.valid_input_shape(wanted, "down")
        crops.append(np.ascontiguousarray(image[None, :, : shape[0], : shape[1], : shape[2]]))
    return crops


@pytest.mark.parametrize("config", [
    UNetConfig(num_classes=3, width=4, levels=3, padding="same"),
    UNetConfig(num_classes=3, width=4, levels=2, padding="valid"),
    UNetConfig(num_classes=3, width=4, levels=2, padding="same", dims=2, norm="group"),
], ids=["same-3d", "valid-3d", "same-2d-groupnorm"])
def test_onnx_runtime_agrees_with_pytorch_on_real_tiles_of_two_sizes(tmp_path, nuclei, config):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'unet3d[onnx]')")
    model = random_model(config)
    save_model(tmp_path / "m.safetensors", model, {"class_values": [0, 1, 2]})
    with torch.no_grad():  # the graph must still be the whole pass, not slabs of the traced tile's rows
        run_export(tmp_path / "m.safetensors", "--onnx", tmp_path / "m.onnx")

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for crop in real_crops(nuclei, config):
        (logits,) = session.run(None, {"image": crop})
        with torch.no_grad():
            expected = model(torch.from_numpy(crop)).numpy()
        assert logits.shape == expected.shape
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_description_travels_in_the_metadata(tmp_path):
    pytest.importorskip("onnx", reason="onnx not installed (pip install 'unet3d[onnx]')")
    config = UNetConfig(num_classes=3, width=2, levels=2, padding="valid")
    info = ModelInfo([0, 4, 9], {"method": "zscore"})
    export_onnx(random_model(config), tmp_path / "m.onnx", info=info)
    description = read_onnx_description(tmp_path / "m.onnx")
    assert UNetConfig.from_dict(description["config"]) == config
    assert description["info"] == info.to_dict()


def test_missing_onnx_is_one_line_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(UserError, match=r"m\.onnx: ONNX export needs the onnx package"):
        export_onnx(random_model(UNetConfig(width=2, levels=2)), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_batch_statistics_at_test_time_are_refused(tmp_path):
    pytest.importorskip("onnx", reason="onnx not installed (pip install 'unet3d[onnx]')")
    model = random_model(UNetConfig(width=2, levels=2, norm_at_test="batch"))
    with pytest.raises(UserError, match="cannot be exported"):
        export_onnx(model, tmp_path / "m.onnx")


def test_file_that_is_not_onnx_is_reported(tmp_path):
    pytest.importorskip("onnx", reason="onnx not installed (pip install 'unet3d[onnx]')")
    path = tmp_path / "m.onnx"
    path.write_bytes(b"not a protobuf at all")
    with pytest.raises(UserError, match=r"m\.onnx: not an ONNX file"):
        read_onnx_description(path)


def test_missing_model_is_reported(tmp_path):
    with pytest.raises(UserError, match="model file not found"):
        run_export(tmp_path / "absent.safetensors", "--onnx", tmp_path / "m.onnx")
