"""BioImage.IO packages: the Model Zoo's own check passes for every weight format, the package
predicts what unet3d predicts, and bad exports or altered packages are refused in one line."""

import zipfile

import numpy as np
import pytest
import torch

from conftest import EXAMPLE
from test_export import random_model, run_export
from unet3d.cli.main import main
from unet3d.data.normalization import apply_normalization, fit_normalization
from unet3d.errors import UserError
from unet3d.model import UNetConfig, load_model, save_model

bioimageio_core = pytest.importorskip("bioimageio.core", reason="bioimageio.core not installed "
                                      "(pip install 'unet3d[bioimageio]')")
from unet3d.export.bioimageio import export_bioimageio  # noqa: E402
from unet3d.model.package import load_package  # noqa: E402

VALID = UNetConfig(num_classes=3, width=4, levels=2, padding="valid")
SAME = UNetConfig(num_classes=3, width=4, levels=3, padding="same")


def info_for(image: np.ndarray, method: str, per_volume: bool) -> dict:
    return {"class_values": [0, 1, 2], "ignore_label": 255, "spacing": [1.0, 1.0, 1.0],
            "normalization": fit_normalization([image], method, per_volume=per_volume),
            "training": {"iterations": 1, "seconds": 1.0, "sources": ["image.tif"]}}


def nuclei_image(nuclei) -> np.ndarray:
    return nuclei[0][None].astype(np.float32)


ALL_FORMATS = ("pytorch_state_dict", "torchscript", "onnx")


# Every weight format for both paddings; the pre-processing (the same for every weight format, run
# by bioimageio.core before the network) in each of its forms: fixed statistics of either method as a
# linear scaling, and per-volume z-score and percentiles.
@pytest.mark.parametrize("config, method, per_volume, weight_formats", [
    (VALID, "zscore", False, ALL_FORMATS), (SAME, "percentile", True, ALL_FORMATS),
    (VALID, "percentile", False, ("onnx",)), (SAME, "zscore", True, ("pytorch_state_dict",)),
], ids=["valid-zscore", "same-percentile-per-volume", "valid-percentile", "same-zscore-per-volume"])
def test_model_zoo_check_passes_for_every_weight_format(tmp_path, nuclei, config, method, per_volume, weight_formats):
    image = nuclei_image(nuclei)
    package = tmp_path / "model.zip"
    export_bioimageio(random_model(config), info_for(image, method, per_volume), package, sample=image,
                      name="nuclei", authors=["A. Author"])
    for weight_format in weight_formats:
        summary = bioimageio_core.test_model(package, weight_format=weight_format, devices=["cpu"])
        assert summary.status == "passed", (weight_format, summary.format())


def test_package_prediction_equals_unet3d_on_a_trained_model(tmp_path):
    """Trained for a few steps on the example, exported with its defaults (the training image as
    sample); `unet3d predict` on the package equals it on the model file, and bioimageio.core's
    prediction equals unet3d's probabilities inside the valid network's margin."""
    image, labels = EXAMPLE / "image.tif", EXAMPLE / "labels.tif"
    model_file = tmp_path / "m.safetensors"
    assert main(["train", "--images", str(image), "--labels", str(labels), "--ignore-label", "255", "-o",
                 str(model_file), "--iterations", "4", "--width", "4", "--levels", "2", "--padding", "valid",
                 "--filter-features", "off", "--forest", "off", "--quiet"]) == 0
    assert main(["export", str(model_file), "--bioimageio", str(tmp_path / "m.zip"), "--author", "A. Author"]) == 0
    for source, out in ((model_file, "from_model"), (tmp_path / "m.zip", "from_package")):
        assert main(["predict", str(source), str(image), "-o", str(tmp_path / f"{out}.npy"),
                     "--probabilities", str(tmp_path / f"{out}_p.npy"), "--quiet"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "from_model.npy"), np.load(tmp_path / "from_package.npy"))

    model, info = load_model(model_file)
    import tifffile
    raw = tifffile.imread(image).astype(np.float32)[None]
    crop = raw[:, :30, :58, :54]  # valid sizes of the 2-level network
    margin = model.config.geometry.margin_1d()
    output = bioimageio_core.predict(model=tmp_path / "m.zip", inputs={"raw": crop[None]})
    probabilities = output.members["probabilities"].data.values[0]
    with torch.inference_mode():
        expected = torch.softmax(model(torch.from_numpy(apply_normalization(crop, info.normalization))[None]), 1)
    np.testing.assert_allclose(probabilities, expected[0].numpy(), atol=1e-4)
    assert probabilities.shape[1:] == tuple(n - 2 * margin for n in crop.shape[1:])


def test_refusals_leave_nothing_behind(tmp_path, nuclei):
    image = nuclei_image(nuclei)
    info = info_for(image, "zscore", False)
    existing = tmp_path / "exists.zip"
    existing.write_bytes(b"keep")
    with pytest.raises(UserError, match="already exists"):
        export_bioimageio(random_model(VALID), info, existing, sample=image, name="nuclei model", authors=["A"])
    assert existing.read_bytes() == b"keep"
    with pytest.raises(UserError, match="filter bank"):
        export_bioimageio(random_model(VALID), {**info, "input_features": {"scales": [1.0]}}, tmp_path / "f.zip",
                          sample=image, name="nuclei model", authors=["A"])
    with pytest.raises(UserError, match="smaller than the network's smallest input"):
        export_bioimageio(random_model(VALID), info, tmp_path / "s.zip", sample=image[:, :8], name="nuclei model", authors=["A"])
    save_model(tmp_path / "m.safetensors", random_model(VALID), info)
    with pytest.raises(UserError, match="training images are not at hand"):
        run_export(tmp_path / "m.safetensors", "--bioimageio", tmp_path / "d.zip")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.zip", "m.safetensors"]


def test_an_altered_package_is_refused_by_predict(tmp_path, nuclei):
    image = nuclei_image(nuclei)
    package = tmp_path / "m.zip"
    export_bioimageio(random_model(VALID), info_for(image, "zscore", False), package, sample=image,
                      name="nuclei model", authors=["A"])
    assert load_package(package)[1].class_values == [0, 1, 2]
    altered = tmp_path / "altered.zip"
    with zipfile.ZipFile(package) as source, zipfile.ZipFile(altered, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            target.writestr(item, data[:-1] + bytes([data[-1] ^ 1]) if item.filename == "weights.pt" else data)
    with pytest.raises(UserError, match="altered.zip.*SHA256 mismatch"):
        load_package(altered)
    with pytest.raises(UserError, match="not found"):
        load_package(tmp_path / "missing.zip")
