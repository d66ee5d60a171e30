"""Prediction on a Dask cluster: equal to single-process prediction, resumable, robust to a lost
worker, and refusing bad input before any work, on a local cluster of two worker processes."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import zarr

from conftest import shared_volume
from unet3d.cli.main import main
from unet3d.data.normalization import fit_normalization
from unet3d.errors import UserError
from unet3d.inference import predict_volume
from unet3d.inference import distributed as dist
from unet3d.inference.distributed import predict_distributed
from unet3d.io import open_volume, write_volume
from unet3d.io.ome_zarr import DONE, SEGMENTATION, PredictionStore, prepare_store
from unet3d.model import UNet, UNetConfig, load_model, save_model
from unet3d.model import unet

pytest.importorskip("distributed", reason="prediction on Dask needs unet3d[distributed]")
pytest.importorskip("ome_zarr", reason="prediction on Dask needs unet3d[distributed]")

VALID_TILE = (16, 32, 32)  # output tiles of the 3-level valid network (grid step 4), one per block of 16×32×32
SAME_WINDOW = (16, 24, 24)


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="1GiB",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def save_network(path, image: np.ndarray, padding: str = "valid", in_channels: int = 1, per_volume: bool = False):
    """A small random network with non-trivial batch-norm statistics, saved as training would."""
    torch.manual_seed(1)
    model = UNet(UNetConfig(in_channels=in_channels, num_classes=3, width=4, levels=3, padding=padding))
    for module in model.modules():
        if isinstance(module, unet.TestTimeBatchNorm):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)
    normalization = fit_normalization([image.astype(np.float32)[None]], per_volume=per_volume)
    save_model(path, model, {"class_values": [0, 3, 7], "normalization": normalization})
    return str(path)


def blobs(shape, seed: int = 0) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    noise = np.random.default_rng(seed).normal(size=shape)
    return (gaussian_filter(noise, 2) * 400 + 1000).astype(np.uint16)


def single_process(tmp_path, model_path: str, image: str, tile, overlap=None) -> tuple[np.ndarray, np.ndarray]:
    """(labels, float16 probabilities) of predict_volume, the single-process reference."""
    model, info = load_model(model_path)
    labels, probabilities = tmp_path / "ref_labels.npy", tmp_path / "ref_probs.npy"
    with open_volume(image) as source:
        predict_volume(model, info, source, str(labels), str(probabilities), tile=tile, device="cpu", overlap=overlap)
    return np.load(labels), np.load(probabilities)


def stored(path) -> tuple[np.ndarray, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    return root[SEGMENTATION + "/0"][...], root["0"][...]


@pytest.fixture
def volume(tmp_path):
    """A (36, 72, 60) OME-Zarr image and a valid-padding network for it."""
    image = blobs((36, 72, 60))
    write_volume(str(tmp_path / "in.zarr"), image)
    return str(tmp_path / "in.zarr"), save_network(tmp_path / "valid.safetensors", image)


def test_valid_padding_equals_single_process_bit_for_bit(client, tmp_path, volume):
    image, model = volume
    out = tmp_path / "out.zarr"
    tile = (16, 16, 32)  # two tiles per block
    summary = predict_distributed(client, model, image, str(out), block=(16, 32, 32), tile=tile)
    assert summary["blocks"] == 3 * 3 * 2 and summary["predicted"] == summary["blocks"]
    labels, probabilities = stored(out)
    reference_labels, reference_probabilities = single_process(tmp_path, model, image, tile)
    np.testing.assert_array_equal(labels, reference_labels)
    np.testing.assert_array_equal(probabilities, reference_probabilities)
    assert set(np.unique(labels)) <= {0, 3, 7}


def test_output_is_valid_ome_zarr_with_labels_and_pyramids(client, tmp_path, volume):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05 import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    image, model = volume
    out = tmp_path / "out.zarr"
    predict_distributed(client, model, image, str(out), block=(16, 32, 32), tile=VALID_TILE)
    root = zarr.open_group(str(out), mode="r")
    Image.from_zarr(root)  # validates the image and its labels group against OME-Zarr 0.5
    label_image = ImageLabel.from_zarr(root[SEGMENTATION])
    assert [c.label_value for c in label_image.attributes.ome.image_label.colors] == [0, 3, 7]
    shapes = [root[SEGMENTATION][str(level)].shape for level in range(3)]
    assert shapes == [(36, 72, 60), (18, 36, 30), (9, 18, 15)]
    np.testing.assert_array_equal(root[SEGMENTATION]["2"][...], root[SEGMENTATION]["0"][::4, ::4, ::4])
    np.testing.assert_array_equal(root["1"][...], root["0"][:, ::2, ::2, ::2])
    assert root["0"].dtype == np.float16 and root["0"].chunks == (1, 16, 32, 32)
    images = [node for node in Reader(parse_url(str(out)))() if node.data]  # what napari's OME-Zarr reader sees
    assert [[level.shape for level in node.data] for node in images] == [
        [(3, 36, 72, 60), (3, 18, 36, 30), (3, 9, 18, 15)], [(36, 72, 60), (18, 36, 30), (9, 18, 15)]]
    assert "Label" in [type(spec).__name__ for spec in images[1].specs]


@pytest.mark.parametrize("overlap", [None, 0.25])
def test_same_padding_equals_single_process(client, tmp_path, overlap):
    """Seamless tiles (bit for bit) and blended windows (which straddle blocks not aligned with
    them; to float rounding); per-volume statistics are fitted once."""
    image = blobs((30, 56, 50), seed=2)
    write_volume(str(tmp_path / "in.zarr"), image)
    model = save_network(tmp_path / "same.safetensors", image, padding="same", per_volume=True)
    out = tmp_path / "out.zarr"
    predict_distributed(client, model, str(tmp_path / "in.zarr"), str(out), block=(12, 20, 20), tile=SAME_WINDOW,
                        overlap=overlap)
    labels, probabilities = stored(out)
    reference_labels, reference_probabilities = single_process(tmp_path, model, str(tmp_path / "in.zarr"), SAME_WINDOW,
                                                               overlap)
    if overlap is None:
        np.testing.assert_array_equal(probabilities, reference_probabilities)
        np.testing.assert_array_equal(labels, reference_labels)
        return
    np.testing.assert_allclose(probabilities.astype(np.float32), reference_probabilities.astype(np.float32), atol=1e-3)
    top = np.sort(reference_probabilities.astype(np.float32), axis=0)
    clear = top[-1] - top[-2] > 2e-3  # ties within float16 rounding may break either way
    np.testing.assert_array_equal(labels[clear], reference_labels[clear])


def test_interrupted_run_resumes_to_the_same_result(client, tmp_path, volume):
    image, model = volume
    out = tmp_path / "out.zarr"
    predict_distributed(client, model, image, str(out), block=(16, 32, 32), tile=VALID_TILE)
    expected = stored(out)
    # An interruption: half the blocks not marked done (their data half written), no OME metadata yet.
    root = zarr.open_group(str(out), mode="r+")
    done = root[DONE]
    undone = [index for index in np.ndindex(done.shape) if sum(index) % 2]
    for z, y, x in undone:
        done[z, y, x] = 0
        root[SEGMENTATION + "/0"][z * 16:(z + 1) * 16, y * 32:(y + 1) * 32, x * 32:x * 32 + 7] = 255
    del root.attrs["ome"]
    summary = predict_distributed(client, model, image, str(out), block=(16, 32, 32), tile=VALID_TILE)
    assert summary["predicted"] == len(undone) and summary["already_done"] == summary["blocks"] - len(undone)
    for got, want in zip(stored(out), expected):
        np.testing.assert_array_equal(got, want)
    assert "ome" in zarr.open_group(str(out), mode="r").attrs


def test_skip_empty_writes_background_where_the_raw_image_is_dark(client, tmp_path):
    image = blobs((16, 64, 64), seed=3)
    image[:, :, :32] = 0
    write_volume(str(tmp_path / "in.zarr"), image)
    model = save_network(tmp_path / "valid.safetensors", image)
    out = tmp_path / "out.zarr"
    summary = predict_distributed(client, model, str(tmp_path / "in.zarr"), str(out), block=(16, 32, 32),
                                  tile=VALID_TILE, skip_empty=0)
    assert (summary["empty"], summary["predicted"]) == (2, 2)
    labels, probabilities = stored(out)
    assert (labels[:, :, :32] == 0).all() and (probabilities[0, :, :, :32] == 1).all()
    reference_labels, _ = single_process(tmp_path, model, str(tmp_path / "in.zarr"), VALID_TILE)
    np.testing.assert_array_equal(labels[:, :, 32:], reference_labels[:, :, 32:])


def test_real_volume_crop_equals_single_process(client, tmp_path):
    import h5py

    with h5py.File(shared_volume("ovule", "ovule.h5"), "r") as f:
        raw = f["raw"][20:44, 50:146, 60:140]
    write_volume(str(tmp_path / "crop.zarr"), raw)
    model = save_network(tmp_path / "valid.safetensors", raw)
    out = tmp_path / "out.zarr"
    predict_distributed(client, model, str(tmp_path / "crop.zarr"), str(out), block=(16, 48, 48), tile=(8, 24, 24))
    reference = single_process(tmp_path, model, str(tmp_path / "crop.zarr"), (8, 24, 24))
    for got, want in zip(stored(out), reference):
        np.testing.assert_array_equal(got, want)


def test_filter_bank_inputs_equal_single_process_bit_for_bit(client, tmp_path, monkeypatch):
    """Each tile's filter bank is made from its box grown by the bank's reach, as single-process
    prediction does when the whole volume's bank does not fit in memory."""
    from unet3d.data.features import with_input_features
    from unet3d.inference import predictor

    image = blobs((16, 48, 48), seed=4)
    write_volume(str(tmp_path / "in.zarr"), image)
    features = {"bank": "ilastik", "scales": [1.0], "spacing": None}
    inputs = with_input_features(image[None].astype(np.float32), features)
    torch.manual_seed(2)
    model = UNet(UNetConfig(in_channels=inputs.shape[0], num_classes=3, width=4, levels=3, padding="valid"))
    info = {"class_values": [0, 3, 7], "normalization": fit_normalization([inputs]), "input_features": features}
    save_model(tmp_path / "bank.safetensors", model, info)
    out = tmp_path / "out.zarr"
    predict_distributed(client, str(tmp_path / "bank.safetensors"), str(tmp_path / "in.zarr"), str(out),
                        block=(16, 32, 32), tile=VALID_TILE)
    monkeypatch.setattr(predictor, "feature_memory_shortfall", lambda *args: "short of memory")
    reference = single_process(tmp_path, str(tmp_path / "bank.safetensors"), str(tmp_path / "in.zarr"), VALID_TILE)
    for got, want in zip(stored(out), reference):
        np.testing.assert_array_equal(got, want)


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_scheduler_is_one_line_after_the_timeout(tmp_path, volume):
    image, model = volume
    began = time.perf_counter()
    with pytest.raises(UserError, match=r"not reachable within 1 s"):
        predict_distributed(f"tcp://127.0.0.1:{unused_port()}", model, image, str(tmp_path / "out.zarr"),
                            connect_timeout=1)
    assert time.perf_counter() - began < 10
    assert not (tmp_path / "out.zarr").exists()


def test_channels_not_matching_the_model_are_refused(client, tmp_path, volume):
    image, _ = volume
    model = save_network(tmp_path / "two.safetensors", blobs((8, 8, 8)), in_channels=2)
    with pytest.raises(UserError, match=r"1 channel\(s\), but .* expects 2"):
        predict_distributed(client, model, image, str(tmp_path / "out.zarr"))
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize("change, message", [
    ({"shape": (36, 72, 61)}, r"exists with shape \(36, 72, 61\), blocks \(16, 32, 32\).*needs shape \(36, 72, 60\)"),
    ({"block": (16, 64, 64)}, r"exists with shape \(36, 72, 60\), blocks \(16, 64, 64\)"),
    ({"model": "0" * 64}, r"written by another model"),
])
def test_an_existing_different_store_is_refused_untouched(client, tmp_path, volume, change, message):
    image, model = volume
    out = tmp_path / "out.zarr"
    job = dist.plan_job(model, image, str(out), block=(16, 32, 32), tile=VALID_TILE)
    prepare_store(PredictionStore(**{**job.store.__dict__, **change}))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(UserError, match=message):
        predict_distributed(client, model, image, str(out), block=(16, 32, 32), tile=VALID_TILE)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert not zarr.open_group(str(out), mode="r")[DONE][...].any()


def test_a_foreign_store_is_refused(client, tmp_path, volume):
    image, model = volume
    write_volume(str(tmp_path / "other.zarr"), np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(UserError, match=r"not an output of block-wise prediction"):
        predict_distributed(client, model, image, str(tmp_path / "other.zarr"))


def test_cli_runs_on_a_scheduler_and_reports_errors_in_one_line(client, tmp_path, volume, capsys):
    image, model = volume
    out = tmp_path / "out.zarr"
    address = client.scheduler.address
    command = ["predict", model, image, "-o", str(out), "--dask", address, "--tile", "16,32,32", "--block", "16,32,32"]
    assert main(command) == 0
    assert "predicted 18 of 18 block(s) of 16x32x32 (0 already done" in capsys.readouterr().out
    assert main(command + ["--quiet"]) == 0
    assert "predicted 0 of 18 block(s) of 16x32x32 (18 already done" in capsys.readouterr().out
    assert main(["predict", model, image, "-o", str(tmp_path / "x.tif"), "--dask", address]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "OME-Zarr store" in error
    assert main(["predict", model, image, "-o", str(tmp_path / "x.tif"), "--skip-empty", "10"]) == 2
    assert "--skip-empty: only with --dask" in capsys.readouterr().err


def test_core_imports_without_dask_and_says_what_to_install(monkeypatch):
    code = ("import sys, unet3d.cli.predict; "
            "print(any(m.split('.')[0] in ('dask', 'distributed', 'ome_zarr') for m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(UserError, match=r"pip install 'unet3d\[distributed\]'"):
        dist.connect("local:1").__enter__()


def test_a_worker_lost_mid_run_leaves_the_result_unchanged(client, tmp_path, volume):
    """One worker process is killed once the first blocks are written; Dask redoes its blocks."""
    image, model = volume
    out = tmp_path / "out.zarr"
    killed = []

    def kill_a_worker_mid_run():
        deadline = time.perf_counter() + 60
        while not (out / DONE / "c").exists() and time.perf_counter() < deadline:
            time.sleep(0.005)
        worker = sorted(client.scheduler_info()["workers"])[0]
        os.kill(client.run(os.getpid, workers=[worker])[worker], signal.SIGKILL)
        killed.append(int(zarr.open_group(str(out), mode="r")[DONE][...].sum()))

    killer = threading.Thread(target=kill_a_worker_mid_run)
    killer.start()
    summary = predict_distributed(client, model, image, str(out), block=(16, 32, 32), tile=VALID_TILE)
    killer.join()
    assert killed and killed[0] < summary["blocks"]  # the kill did land mid-run
    reference = single_process(tmp_path, model, image, VALID_TILE)
    for got, want in zip(stored(out), reference):
        np.testing.assert_array_equal(got, want)


def test_a_model_with_a_forest_blends_it_block_by_block_as_single_process(client, tmp_path):
    """The forest's filter bank is made per block, its per-volume statistics fitted once on the client."""
    from unet3d.data.features import input_feature_spec
    from unet3d.model import load_forest
    from unet3d.workflows.forest import annotated, fit_model_forest

    image = blobs((24, 40, 36), seed=3)
    write_volume(str(tmp_path / "in.zarr"), image)
    raw = image.astype(np.float32)[None]
    sparse = np.full(image.shape, -1)
    sparse[::6] = np.digitize(image[::6], np.percentile(image, [40, 70]))  # three classes by brightness
    forest = fit_model_forest([annotated(raw, sparse)], input_feature_spec(None),
                              fit_normalization([raw], per_volume=True), 3, seconds=None, seed=0)
    forest.network_weight = 0.3
    model_path = save_network(tmp_path / "same.safetensors", image, padding="same")
    network, info = load_model(model_path)
    save_model(model_path, network, info, forest)
    out = tmp_path / "out.zarr"
    predict_distributed(client, model_path, str(tmp_path / "in.zarr"), str(out), block=(12, 20, 20), tile=SAME_WINDOW)
    labels, probabilities = stored(out)
    network, info = load_model(model_path)
    with open_volume(str(tmp_path / "in.zarr")) as source:
        predict_volume(network, info, source, str(tmp_path / "ref_labels.npy"), str(tmp_path / "ref_probs.npy"),
                       tile=SAME_WINDOW, forest=load_forest(model_path, info))
    reference = np.load(tmp_path / "ref_probs.npy").astype(np.float32)
    np.testing.assert_allclose(probabilities.astype(np.float32), reference, atol=2e-3)
    top = np.sort(reference, axis=0)
    clear = top[-1] - top[-2] > 4e-3
    np.testing.assert_array_equal(labels[clear], np.load(tmp_path / "ref_labels.npy")[clear])
