import argparse
import os
import re

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
import zarr

from conftest import EXAMPLE, shared_volume
from unet3d.cli import main, predict
from unet3d.data.normalization import apply_normalization, fit_normalization
from unet3d.errors import UserError
from unet3d.inference import choose_output_tile, estimate_tile_bytes, predict_array
from unet3d.inference.predictor import region_reader
from unet3d.inference.tiling import blend_bytes
from unet3d.io import open_volume, read_image, write_volume
from unet3d.model import UNet, UNetConfig, load_model, save_model
from unet3d.model import unet


def run_predict(*argv: str) -> None:
    parser = argparse.ArgumentParser()
    predict.register(parser.add_subparsers())
    args = parser.parse_args(["predict", *map(str, argv)])
    args.run(args)


def make_model(path, image: np.ndarray, class_values, in_channels: int = 1, padding: str = "valid") -> tuple[UNet, dict]:
    """A small random network with non-trivial batch-norm statistics, saved as training would."""
    torch.manual_seed(0)
    model = UNet(UNetConfig(in_channels=in_channels, num_classes=len(class_values), width=2, levels=3, padding=padding))
    for module in model.modules():
        if isinstance(module, unet.TestTimeBatchNorm):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)
    info = {
        "class_values": list(class_values),
        "ignore_label": 255,
        "normalization": fit_normalization([image.astype(np.float32)]),
        "spacing": None,
        "patch_shape": [44, 44, 44],
    }
    save_model(path, model, info)
    return model.eval(), info


@pytest.fixture(params=["nuclei example", "ovule crop"])
def ovule_crop(tmp_path, request):
    """A volume in an HDF5 file, (path spec, (1, Z, Y, X) array): the bundled nuclei example (in
    every checkout, so the streaming claims are tested everywhere) and a real 24×96×80 crop of
    the ovule stack (skipped without the shared data)."""
    if request.param == "nuclei example":
        import tifffile

        raw = tifffile.imread(EXAMPLE / "image.tif")
    else:
        with h5py.File(shared_volume("ovule", "ovule.h5"), "r") as f:
            raw = f["raw"][20:44, 50:146, 60:140]
    path = tmp_path / "crop.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("raw", data=raw, chunks=(8, 32, 32))
    return f"{path}:/raw", raw[None]


def expected_labels(model, info, image, **options) -> tuple[np.ndarray, np.ndarray]:
    probs = predict_array(model, apply_normalization(image, info["normalization"]), **options)
    return np.asarray(info["class_values"])[probs.argmax(0)], probs


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_hdf5_streaming_equals_in_memory_prediction(tmp_path, ovule_crop, capsys, padding):
    spec, image = ovule_crop
    model, info = make_model(tmp_path / "m.safetensors", image, [1, 2], padding=padding)
    out = tmp_path / "pred.h5"
    run_predict(tmp_path / "m.safetensors", spec, "-o", f"{out}:/labels", "--probabilities", tmp_path / "probs.h5",
                "--max-memory", "24M", "--device", "cpu")
    tiles = int(re.search(r"in (\d+) tile", capsys.readouterr().out).group(1))
    assert tiles > 1  # the budget forced more than one tile
    with h5py.File(out, "r") as f:
        labels = f["labels"][...]
    with h5py.File(tmp_path / "probs.h5", "r") as f:
        probs = f["data"][...]
    budget_tile = choose_output_tile(model.config, image.shape[1:], 24 << 20)
    expected, expected_probs = expected_labels(model, info, image, tile=budget_tile)
    assert probs.dtype == np.float16 and probs.shape == (2, *image.shape[1:])
    np.testing.assert_allclose(probs, expected_probs, atol=1e-3)
    assert np.array_equal(labels, expected)


def test_zarr_streaming_with_uncertainty(tmp_path, ovule_crop):
    _, image = ovule_crop
    write_volume(str(tmp_path / "crop.zarr"), image[0])
    model, info = make_model(tmp_path / "m.safetensors", image, [1, 2])
    run_predict(tmp_path / "m.safetensors", tmp_path / "crop.zarr", "-o", tmp_path / "pred.zarr",
                "--uncertainty", tmp_path / "uncertainty.zarr", "--tile", "8,32,32", "--batch-size", "3")
    labels = np.asarray(zarr.open_group(str(tmp_path / "pred.zarr"), mode="r")["0"])
    uncertainty = np.asarray(zarr.open_group(str(tmp_path / "uncertainty.zarr"), mode="r")["0"])
    expected, probs = expected_labels(model, info, image, tile=image.shape[1:])
    assert np.array_equal(labels, expected)
    entropy = -(probs * np.log(np.clip(probs, 1e-12, 1))).sum(0) / np.log(2)
    np.testing.assert_allclose(uncertainty, entropy, atol=1e-4)
    assert 0 <= uncertainty.min() and uncertainty.max() <= 1


def test_a_per_volume_normalization_is_fitted_on_each_whole_volume_it_predicts(tmp_path, ovule_crop):
    """Streamed region by region, a brighter scan of the same tissue gets the same segmentation."""
    _, image = ovule_crop
    model = UNet(UNetConfig(in_channels=1, num_classes=2, width=2, levels=3, padding="same"))
    info = {"class_values": [1, 2], "normalization": fit_normalization([image], per_volume=True)}
    save_model(tmp_path / "m.safetensors", model, info)
    brighter = image.astype(np.float32) * 7.0 + 300.0
    for name, volume in (("plain", image), ("brighter", brighter)):
        write_volume(str(tmp_path / f"{name}.zarr"), volume[0])
        run_predict(tmp_path / "m.safetensors", tmp_path / f"{name}.zarr", "-o", tmp_path / f"{name}.npy",
                    "--probabilities", tmp_path / f"{name}_p.npy", "--tile", "8,32,32")
    plain, bright = (np.load(tmp_path / f"{name}_p.npy").astype(np.float32) for name in ("plain", "brighter"))
    np.testing.assert_allclose(plain, bright, atol=2e-3)
    # Every region is normalized with statistics of the whole volume (from planes spread over it),
    # not with its own.
    with open_volume(str(tmp_path / "brighter.zarr")) as source:
        read = region_reader(source, info["normalization"], None)
        whole = apply_normalization(brighter, fit_normalization([brighter]))
        far_corner = tuple(slice(n - k, n) for n, k in zip(brighter.shape[1:], (8, 32, 32)))
        for box in ((slice(0, 8), slice(0, 32), slice(0, 32)), far_corner):
            np.testing.assert_allclose(read(box), whole[(slice(None), *box)], atol=0.02)


def test_nifti_output_keeps_the_input_geometry(tmp_path):
    source = shared_volume("hippocampus", "images", "hippocampus_001.nii.gz")
    image, _ = read_image(str(source))
    make_model(tmp_path / "m.safetensors", image, [0, 1, 2])
    out = tmp_path / "labels.nii.gz"
    run_predict(tmp_path / "m.safetensors", source, "-o", out, "--probabilities", tmp_path / "probs.npy", "--tta")
    original, written = nib.load(source), nib.load(out)
    assert written.shape == original.shape
    np.testing.assert_array_equal(written.affine, original.affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2}
    probs = np.load(tmp_path / "probs.npy")
    assert probs.shape == (3, *image.shape[1:]) and np.allclose(probs.astype(np.float32).sum(0), 1, atol=3e-3)


@pytest.fixture
def nuclei_model(tmp_path, nuclei):
    make_model(tmp_path / "m.safetensors", nuclei[0][None], [0, 1, 2])
    return tmp_path / "m.safetensors"


def test_channel_mismatch_is_reported(tmp_path, nuclei):
    make_model(tmp_path / "two.safetensors", np.stack([nuclei[0]] * 2), [0, 1, 2], in_channels=2)
    with pytest.raises(UserError, match=r"image\.tif: 1 channel\(s\), but .*two\.safetensors expects 2"):
        run_predict(tmp_path / "two.safetensors", EXAMPLE / "image.tif", "-o", tmp_path / "out.tif")


def test_unwritable_output_is_refused_before_computing(tmp_path, nuclei_model):
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(UserError, match="afile is not a directory"):
        run_predict(nuclei_model, EXAMPLE / "image.tif", "-o", tmp_path / "out.tif",
                    "--probabilities", tmp_path / "afile" / "probs.h5")
    assert not (tmp_path / "out.tif").exists()
    (tmp_path / "folder.tif").mkdir()
    with pytest.raises(UserError, match="folder.tif: is a directory"):
        run_predict(nuclei_model, EXAMPLE / "image.tif", "-o", tmp_path / "folder.tif")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where no file can be created")
def test_output_in_a_folder_that_refuses_files_is_refused_before_computing(tmp_path, nuclei_model, monkeypatch):
    calls = []
    monkeypatch.setattr(predict, "predict_volume", lambda *args, **kwargs: calls.append(args))
    assert os.access("/proc", os.W_OK)  # permission bits alone would let it through
    with pytest.raises(UserError, match=r"/proc/x\.tif: cannot write to directory /proc"):
        run_predict(nuclei_model, EXAMPLE / "image.tif", "-o", "/proc/x.tif")
    assert calls == []
    before = set(tmp_path.iterdir())
    predict.check_outputs([str(tmp_path / "new" / "folder" / "out.tif")], str(EXAMPLE / "image.tif"))
    assert set(tmp_path.iterdir()) == before  # probed in the nearest existing folder, probe removed


def test_unknown_extension_and_overwriting_the_input_are_refused(tmp_path, nuclei_model):
    with pytest.raises(UserError, match=r"out\.xyz: unknown file extension"):
        run_predict(nuclei_model, EXAMPLE / "image.tif", "-o", tmp_path / "out.xyz")
    with pytest.raises(UserError, match="would overwrite the input image"):
        run_predict(nuclei_model, EXAMPLE / "image.tif", "-o", EXAMPLE / "image.tif")


def test_empty_image_is_refused(tmp_path, nuclei_model):
    np.save(tmp_path / "empty.npy", np.zeros((0, 40, 40), np.float32))
    with pytest.raises(UserError, match=r"empty\.npy: empty volume of shape \(0, 40, 40\)"):
        run_predict(nuclei_model, tmp_path / "empty.npy", "-o", tmp_path / "out.npy")


def test_memory_budget_too_small_is_reported(tmp_path, nuclei_model):
    with pytest.raises(UserError, match=r"--max-memory 1M: too small, the smallest tile needs about"):
        run_predict(nuclei_model, EXAMPLE / "image.tif", "-o", tmp_path / "out.tif", "--max-memory", "1M")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_missing_cuda_is_reported(tmp_path, nuclei_model):
    with pytest.raises(UserError, match="--device cuda: no CUDA device"):
        run_predict(nuclei_model, EXAMPLE / "image.tif", "-o", tmp_path / "out.tif", "--device", "cuda")


def test_memory_sizes_parse():
    assert predict.memory_size("2G") == 2 << 30 and predict.memory_size("512MiB") == 512 << 20
    assert predict.memory_size("1.5k") == 1536 and predict.memory_size("4096") == 4096
    with pytest.raises(argparse.ArgumentTypeError):
        predict.memory_size("lots")


def test_blending_beyond_the_budget_is_said(tmp_path, capsys):
    """Accumulators over a wide plane that no acceptable window fits: predict says by how much."""
    image = np.random.default_rng(0).normal(size=(8, 512, 512)).astype(np.float32)
    write_volume(str(tmp_path / "wide.npy"), image)
    make_model(tmp_path / "m.safetensors", image[None], [0, 1], padding="same")
    run_predict(tmp_path / "m.safetensors", tmp_path / "wide.npy", "-o", tmp_path / "labels.npy", "--max-memory", "32M",
                "--overlap", "0.25")
    said = re.search(r"note: blending windows over 512×512 planes takes about (\d+) MiB beyond --max-memory "
                     r"\(accumulators of (\d+) MiB", capsys.readouterr().err)
    config = load_model(tmp_path / "m.safetensors")[0].config
    window = choose_output_tile(config, image.shape, 32 << 20, overlap=0.25)
    accumulators = blend_bytes(config, image.shape, window)
    excess = estimate_tile_bytes(config, window) + accumulators - (32 << 20)
    assert said and (int(said[1]), int(said[2])) == (round(excess / 2**20), round(accumulators / 2**20))
    assert np.load(tmp_path / "labels.npy").shape == image.shape


@pytest.mark.parametrize("command", main.COMMANDS)
def test_every_subcommand_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.main([command, "--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0 and f"unet3d {command}" in text
    assert "(default: None)" not in text  # unset options say nothing rather than "None"
