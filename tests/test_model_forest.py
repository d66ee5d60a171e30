"""The forest inside a model file: the filter bank region by region, storage without pickle, the
blend applied tile by tile by `predict`, and `train` fitting, weighing and storing it."""

import json

import h5py
import numpy as np
import pytest
import safetensors.torch
import tifffile
import torch

from unet3d.cli import main
from unet3d.data.features import bank_at, filter_features, input_feature_spec, region_bank
from unet3d.data.normalization import fit_normalization
from unet3d.errors import UserError
from unet3d.inference import predict_volume
from unet3d.inference.predictor import predict_image
from unet3d.io import open_volume
from unet3d.model import UNet, UNetConfig, load_forest, load_model, save_model
from unet3d.model import forest as forest_module
from unet3d.model.forest import TENSOR, split_box
from unet3d.workflows.forest import annotated, fit_model_forest

IGNORE = 255


def blobs(shape=(24, 48, 40), seed=0):
    """A synthetic two-class volume: bright blobs on a noisy background, (1, Z, Y, X) and truth."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(shape)
    truth = np.zeros(shape, np.int64)
    for _ in range(12):
        c = [rng.integers(0, n) for n in shape]
        truth[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < rng.integers(16, 50)] = 1
    image = (100 + 60 * truth + rng.normal(0, 20, shape)).astype(np.float32)
    return image[None], truth


def slices_of(truth: np.ndarray) -> np.ndarray:
    sparse = np.full(truth.shape, IGNORE, np.uint8)
    for z in (5, 12, 19):
        sparse[z] = truth[z]
    sparse[:, 20] = truth[:, 20]
    sparse[:, :, 17] = truth[:, :, 17]
    return sparse


@pytest.mark.parametrize("spacing", [None, (4.0, 1.0, 1.0)])
def test_the_bank_of_a_region_is_the_whole_volumes_bank_there(spacing):
    image, _ = blobs((20, 40, 36))
    image = np.concatenate([image, image[:, :, ::-1] * 0.5])  # two channels
    spec = input_feature_spec(spacing)
    whole = filter_features(image, spacing=spacing)
    read = lambda box: image[(slice(None),) + box]  # noqa: E731
    box = (slice(3, 11), slice(0, 17), slice(20, 36))
    np.testing.assert_array_equal(region_bank(read, image.shape[1:], box, spec), whole[(slice(None),) + box])
    voxels = np.random.default_rng(1).choice(image[0].size, 300, replace=False)
    np.testing.assert_array_equal(bank_at(read, image.shape[1:], spec, voxels, block=(7, 16, 16)),
                                  whole.reshape(whole.shape[0], -1)[:, voxels])


def test_split_box_covers_the_box_once_in_small_blocks():
    box = (slice(2, 30), slice(5, 70), slice(0, 41))
    blocks = split_box(box, 5000)
    cover = np.zeros((30, 70, 41), int)
    for block in blocks:
        assert np.prod([b.stop - b.start for b in block]) <= 5000
        cover[block] += 1
    assert (cover[box] == 1).all() and cover.sum() == cover[box].size


def fitted_forest(image, truth, weight=0.5):
    forest = fit_model_forest([annotated(image, np.where(slices_of(truth) == IGNORE, -1, truth))],
                              input_feature_spec(None), fit_normalization([image]), 2, seconds=None, seed=0)
    forest.network_weight = weight
    return forest


def small_network(classes=2):
    torch.manual_seed(0)
    return UNet(UNetConfig(in_channels=1, num_classes=classes, width=2, levels=2, padding="same", norm="batch")).eval()


def info_for(image):
    return {"class_values": [0, 1], "ignore_label": IGNORE, "normalization": fit_normalization([image]),
            "spacing": [1.0, 1.0, 1.0]}


def test_a_model_file_holds_the_forest_and_loads_it_without_pickle(tmp_path):
    image, truth = blobs()
    forest = fitted_forest(image, truth, 0.3)
    path = tmp_path / "m.safetensors"
    save_model(path, small_network(), info_for(image), forest)
    network, info = load_model(path)  # the network's weights alone, the forest's tensor left aside
    loaded = load_forest(path, info)
    assert loaded.network_weight == 0.3 and info.forest["trees"] == forest.forest.n_estimators
    features = filter_features(image).reshape(61, -1)
    np.testing.assert_array_equal(loaded.probabilities(features), forest.probabilities(features))
    # A model file without a forest (every file written before) is the network alone.
    save_model(tmp_path / "plain.safetensors", network, info_for(image))
    assert load_forest(tmp_path / "plain.safetensors") is None


def test_a_forest_needing_untrusted_types_is_refused(tmp_path):
    import skops.io
    from fractions import Fraction

    image, truth = blobs()
    path = tmp_path / "m.safetensors"
    save_model(path, small_network(), info_for(image), fitted_forest(image, truth))
    state = safetensors.torch.load_file(str(path))
    state[TENSOR] = torch.frombuffer(bytearray(skops.io.dumps(Fraction(1, 3))), dtype=torch.uint8)
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    safetensors.torch.save_file(state, str(path), metadata=metadata)
    with pytest.raises(UserError, match="types unet3d does not load.*fractions.Fraction"):
        load_forest(path)
    state[TENSOR] = torch.zeros(10, dtype=torch.uint8)
    safetensors.torch.save_file(state, str(path), metadata=metadata)
    with pytest.raises(UserError, match="stored forest is not readable"):
        load_forest(path)


def test_predict_blends_tile_by_tile_as_on_the_whole_volume(tmp_path, monkeypatch):
    """Streaming from HDF5 in small tiles, with forest blocks smaller still, gives the blend of the
    whole volume in memory: the filter bank made per region is the whole volume's there."""
    image, truth = blobs()
    forest = fitted_forest(image, truth, 0.4)
    network, info = small_network(), info_for(image)
    whole = predict_image(network, info, image[0:1], forest=forest)
    monkeypatch.setattr(forest_module, "BLOCK_VOXELS", 3000)
    with h5py.File(tmp_path / "in.h5", "w") as f:
        f.create_dataset("raw", data=image[0], chunks=(8, 16, 16))
    in_memory = np.zeros(whole.shape, np.float16)  # an array target (a Zarr store, say) with the channels in front
    with open_volume(f"{tmp_path / 'in.h5'}:/raw") as source:
        summary = predict_volume(network, info, source, prob_out=f"{tmp_path / 'p.h5'}:/p", tile=(8, 16, 16),
                                 forest=forest)
        predict_volume(network, info, source, prob_out=in_memory, tile=(8, 16, 16), forest=forest)
    assert summary["forest"] and summary["tiles"] > 1
    with h5py.File(tmp_path / "p.h5", "r") as f:
        streamed = f["p"][:].astype(np.float32)
    np.testing.assert_allclose(streamed, whole, atol=2e-3)  # float16 output
    np.testing.assert_array_equal(in_memory.astype(np.float32), streamed)
    network_alone = predict_image(network, info, image)
    assert np.abs(whole - network_alone).max() > 0.05  # the forest changed the result


def bank_reading_model(image, truth):
    """(network, info, forest): a small network whose inputs hold the forest's filter bank beside
    the image, and the forest (network weight 0.4)."""
    spec = input_feature_spec(None)
    forest = fit_model_forest([annotated(image, np.where(slices_of(truth) == IGNORE, -1, truth))], spec,
                              {"method": "none", "channels": 1}, 2, seconds=None, seed=0)
    forest.network_weight = 0.4
    inputs = np.concatenate([image, filter_features(image, spec["scales"], spec["spacing"])])
    torch.manual_seed(0)
    network = UNet(UNetConfig(in_channels=inputs.shape[0], num_classes=2, width=2, levels=2, padding="same",
                              norm="batch")).eval()
    info = {**info_for(image), "normalization": fit_normalization([inputs]), "input_features": spec}
    return network, info, forest


def test_a_network_reading_the_forests_bank_shares_it_tile_by_tile(tmp_path, monkeypatch):
    """A network whose inputs hold the forest's filter bank, predicted tile by tile, lends the forest
    each tile's bank (no bank made for the forest's blocks) and gives the whole volume's blend."""
    from unet3d.inference import predictor

    image, truth = blobs()
    network, info, forest = bank_reading_model(image, truth)
    whole = predict_image(network, info, image, forest=forest)
    monkeypatch.setattr(predictor, "feature_memory_shortfall", lambda *args: "the bank does not fit")
    made = []
    monkeypatch.setattr(forest_module, "region_bank", lambda *args: made.append(args) or region_bank(*args))
    with h5py.File(tmp_path / "in.h5", "w") as f:
        f.create_dataset("raw", data=image[0])
    with open_volume(f"{tmp_path / 'in.h5'}:/raw") as source:
        summary = predict_volume(network, info, source, prob_out=f"{tmp_path / 'p.h5'}:/p", tile=(8, 24, 24),
                                 forest=forest)
    assert summary["tiles"] > 1 and not made  # the forest never made a bank of its own
    with h5py.File(tmp_path / "p.h5", "r") as f:
        np.testing.assert_allclose(f["p"][:].astype(np.float32), whole, atol=2e-3)


def test_on_dask_the_forest_takes_each_tiles_bank_too(tmp_path, monkeypatch):
    """`predict --dask` blends the forest tile by tile inside each block, from the bank the tile's
    network input holds: no bank of the forest's own, the single-process result."""
    pytest.importorskip("distributed", reason="prediction on Dask needs unet3d[distributed]")
    from distributed import Client, LocalCluster

    from unet3d.inference.distributed import predict_distributed
    from unet3d.io import write_volume

    image, truth = blobs()
    network, info, forest = bank_reading_model(image, truth)
    whole = predict_image(network, info, image, forest=forest)
    save_model(tmp_path / "m.safetensors", network, info, forest)
    write_volume(str(tmp_path / "in.zarr"), image[0])
    made = []
    monkeypatch.setattr(forest_module, "region_bank", lambda *args: made.append(args) or region_bank(*args))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:  # threads of this process: the count above sees the workers' calls
        predict_distributed(client, str(tmp_path / "m.safetensors"), str(tmp_path / "in.zarr"),
                            str(tmp_path / "out.zarr"), block=(12, 24, 20), tile=(6, 12, 10))
    assert not made
    import zarr
    probabilities = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["0"][...].astype(np.float32)
    np.testing.assert_allclose(probabilities, whole, atol=2e-3)


def test_tiles_whose_bank_is_made_for_them_are_planned_in_a_share_of_max_memory(tmp_path, monkeypatch):
    """`predict --max-memory` plans tiles that make their own filter bank in BANK_TILE_SHARE of it
    (the plan counts a tile's inputs once; they are held about three times)."""
    from unet3d.inference import predictor

    image, truth = blobs((24, 96, 96))
    network, info, forest = bank_reading_model(image, truth)
    budget = 64 * 2**20  # below the whole bank's 0.1 GiB: the bank is made per tile
    monkeypatch.setattr(predictor, "iter_regions", lambda *args, **kwargs: iter(()))  # the plan is what is checked
    with open_volume(write_case(tmp_path, "case", image, slices_of(truth))[0]) as source:
        summary = predict_volume(network, info, source, np.empty(image.shape[1:], np.uint8), max_memory=budget,
                                 forest=forest)
    expected = predictor.make_plan(network, image.shape[1:], max_memory=int(predictor.BANK_TILE_SHARE * budget))
    assert summary["output_tile"] == expected.output_shape
    assert summary["output_tile"] != predictor.make_plan(network, image.shape[1:], max_memory=budget).output_shape


def write_case(folder, name, image, sparse):
    tifffile.imwrite(folder / f"{name}.tif", image[0])
    tifffile.imwrite(folder / f"{name}_s.tif", sparse)
    return str(folder / f"{name}.tif"), str(folder / f"{name}_s.tif")


@pytest.mark.slow
def test_train_fits_weighs_and_stores_the_forest_and_predict_applies_it(tmp_path, capsys):
    from unet3d.workflows.forest import HOLD_OUT_MIN_ANNOTATED

    image, truth = blobs((24, 128, 128))  # 54,507 annotated voxels on slices_of's planes
    sparse = slices_of(truth)
    assert np.count_nonzero(sparse != IGNORE) >= HOLD_OUT_MIN_ANNOTATED  # enough to hold blocks out for the weighing
    img, lab = write_case(tmp_path, "a", image, sparse)
    model = tmp_path / "m.safetensors"
    assert main.main(["train", "--images", img, "--labels", lab, "--ignore-label", str(IGNORE), "-o", str(model),
                      "--iterations", "3", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "forest: 100 trees on ilastik's filter bank" in printed
    assert "chosen on" in printed and "held out of both models' training" in printed
    network, info = load_model(model)
    evidence = info.forest["evidence"]
    assert evidence["voxels"] > 1000 and set(evidence["mean_iou"]) == {"forest", "network", "blend"}
    # The weight chosen is the best of those tried on the held-out voxels, so never below either model there.
    assert evidence["mean_iou"]["blend"] >= max(evidence["mean_iou"]["forest"], evidence["mean_iou"]["network"]) - 0.002
    forest = load_forest(model, info)
    assert main.main(["predict", str(model), img, "-o", str(tmp_path / "seg.npy"), "--quiet"]) == 0
    assert "blended with the model's forest" in capsys.readouterr().out
    expected = predict_image(network, info, image, forest=forest).argmax(0)
    np.testing.assert_array_equal(np.load(tmp_path / "seg.npy"), expected)
    # Three steps of a network against a forest on blobs: the blend beats the untrained network.
    assert (expected == truth).mean() > (predict_image(network, info, image).argmax(0) == truth).mean()


def test_train_without_the_forest_and_export_of_a_blended_model(tmp_path, capsys):
    image, truth = blobs()
    img, lab = write_case(tmp_path, "a", image, slices_of(truth))
    plain, blended = tmp_path / "plain.safetensors", tmp_path / "blended.safetensors"
    common = ["--images", img, "--labels", lab, "--ignore-label", str(IGNORE), "--iterations", "2", "--quiet"]
    assert main.main(["train", *common, "-o", str(plain), "--forest", "off"]) == 0
    assert load_model(plain)[1].forest is None
    assert main.main(["train", *common, "-o", str(blended)]) == 0
    assert "too few annotated voxels to hold any out" in capsys.readouterr().out
    assert load_forest(blended).network_weight == 0.5
    onnx = tmp_path / "m.onnx"
    assert main.main(["export", str(blended), "--onnx", str(onnx)]) == 2
    assert "blends its network with a random forest" in capsys.readouterr().err and not onnx.exists()
    pytest.importorskip("onnx")
    assert main.main(["export", str(blended), "--onnx", str(onnx), "--network-alone"]) == 0
    assert "exporting the network alone" in capsys.readouterr().out
    import onnx as onnx_lib

    stored = json.loads({p.key: p.value for p in onnx_lib.load(str(onnx)).metadata_props}["unet3d"])
    assert "forest" not in stored["info"]


@pytest.mark.slow
def test_densify_of_a_volume_beyond_max_memory_reads_the_image_box_by_box(tmp_path, monkeypatch, capsys):
    """`--max-memory` below what the whole filter bank needs sends densify the blockwise route, and
    there the image file is only ever read box by box (training blocks, held-out blocks, tiles)."""
    from unet3d.inference import predictor as predictor_module
    from unet3d.io.volume import Volume

    image, truth = blobs((24, 96, 96))  # its whole bank needs about 110 MB, the smallest tile 51
    with h5py.File(tmp_path / "in.h5", "w") as f:
        f.create_dataset("raw", data=image[0], chunks=(8, 32, 32))
    _, sparse = write_case(tmp_path, "case", image, slices_of(truth))
    whole_reads, read = [], Volume.read

    def recorded(self, region=None):
        if region is None and self.kind == "image":
            whole_reads.append(self.meta.path)
        return read(self, region)

    monkeypatch.setattr(Volume, "read", recorded)
    monkeypatch.setattr(predictor_module, "BANK_TILE_SHARE", 1.0)  # the smallest tile of this network: 51 MiB
    out = tmp_path / "seg.tif"
    code = main.main(["densify", f"{tmp_path / 'in.h5'}:/raw", sparse, "-o", str(out),
                      "--ignore-label", str(IGNORE), "--max-time", "3600", "--iterations", "3", "--max-memory", "64M",
                      "--filter-features", "on", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0 and "allowed (--max-memory)" in printed and "blocks of" in printed
    assert not whole_reads and tifffile.imread(out).shape == truth.shape


def test_densifys_model_file_segments_as_densify_did(tmp_path):
    """densify stores its forest and the blend's weight with the network: `predict` with its model
    gives densify's own segmentation (test-time flips off, which predict does not apply by default)."""
    from unet3d.workflows.densify import densify

    image, truth = blobs()
    sparse = slices_of(truth)
    model = tmp_path / "m.safetensors"
    result = densify(image, sparse, IGNORE, model, iterations=3, max_time=None, tta=False, progress=False)
    network, info = load_model(model)
    forest = load_forest(model, info)
    assert forest is not None and forest.network_weight == 0.5  # few annotated voxels: equal weights
    np.testing.assert_array_equal(predict_image(network, info, image, forest=forest).argmax(0), result.segmentation)


@pytest.mark.slow
def test_densify_keeps_the_forest_when_the_whole_filter_bank_would_not_fit(tmp_path, monkeypatch, capsys):
    """The blockwise route: the forest's bank made around the annotated voxels and per region at
    prediction, the blend weighed on held-out blocks and streamed into the segmentation; the model
    file segments as densify did."""
    from unet3d.workflows import densify as module

    monkeypatch.setattr(module, "feature_memory_shortfall", lambda source, *_: f"{source}: needs 99 GiB")
    image, truth = blobs((32, 96, 96))
    sparse = slices_of(truth)
    sparse[[9, 26, 29]] = truth[[9, 26, 29]]  # enough annotation to hold blocks out (HOLD_OUT_MIN_ANNOTATED)
    model = tmp_path / "m.safetensors"
    lines = []
    # Steps bound the training (the time plan still runs): the same on a fast or a slow machine.
    result = module.densify(image, sparse, IGNORE, model, max_time=200, iterations=40, progress=False,
                            report=lines.append, probabilities_out=str(tmp_path / "p.npy"),
                            segmentation_out=f"{tmp_path / 's.h5'}:/s")
    assert "made block by block" in result.blend and result.probabilities is None
    assert result.segmentation is None  # written tile by tile, never held whole
    with h5py.File(tmp_path / "s.h5", "r") as f:
        segmentation = f["s"][:]
    assert lines and lines[0].startswith("time plan:") and "to train" in lines[0]
    assert "chosen on" in result.weighing and "held-out annotated blocks" in result.weighing
    network, info = load_model(model)
    forest = load_forest(model, info)
    assert forest is not None and info.forest["evidence"]["voxels"] > 1000
    expected = predict_image(network, info, image, forest=forest)
    assert (expected.argmax(0) == segmentation).mean() > 0.999
    np.testing.assert_allclose(np.load(tmp_path / "p.npy").astype(np.float32), expected, atol=2e-3)
    assert (segmentation == truth).mean() > 0.9
    # A budget that prediction alone would exhaust is refused before training, saying what would do.
    with pytest.raises(UserError, match=r"predicting its 294,912 voxels takes about .* give --max-time \d+ or more"):
        module.densify(image, sparse, IGNORE, tmp_path / "n.safetensors", max_time=0.5, progress=False)
