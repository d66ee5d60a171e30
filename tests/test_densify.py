"""densify end to end on the bundled nuclei example: it must beat the random forest on the same slices."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tifffile

from conftest import DEMO_ITERATIONS
from unet3d.data.sparse import sparsify
from unet3d.evaluation import evaluate_volumes
from unet3d.training.dataset import prepare_training_set
from unet3d.workflows.densify import DensifyResult, default_config, densify

IGNORE = 255
SLICES = (3, 3, 2)
CLASSES = [0, 1, 2]


@pytest.fixture
def sparse_nuclei(nuclei):
    image, truth = nuclei
    return image[None].astype(np.float32), truth.astype(np.int64), sparsify(truth, SLICES, IGNORE)


def foreground_iou(prediction, truth, sparse) -> dict:
    scores = evaluate_volumes(prediction, truth, exclude=sparse, ignore_label=IGNORE)
    return {"mean": scores["mean_iou_foreground"], **{c["value"]: c["iou"] for c in scores["classes"]}}


@pytest.mark.slow
def test_densify_beats_the_random_forest_on_the_unannotated_voxels(demo_run, sparse_nuclei):
    """By default densify blends its network with the random forest; both the blend and the network
    alone must beat the forest (which densify fits on the same voxels, so it is scored here too).
    The densify run is the demo's (the same example, slices and seed; conftest's `demo_run`)."""
    _, truth, sparse = sparse_nuclei
    folder, _, result = demo_run
    blend = foreground_iou(result.segmentation, truth, sparse)
    network = foreground_iou(result.components["network"], truth, sparse)
    forest = foreground_iou(result.components["forest"], truth, sparse)

    assert isinstance(result, DensifyResult) and result.iterations == DEMO_ITERATIONS
    assert result.segmentation.shape == truth.shape and set(np.unique(result.segmentation)) <= set(CLASSES)
    assert np.array_equal(tifffile.imread(folder / "sparse.tif"), sparse)  # the slices scored here
    assert (folder / "segmentation.model.safetensors").exists()
    assert np.array_equal(result.segmentation, np.asarray(CLASSES)[result.probabilities.argmax(0)])
    # Measured at the demo's 200 steps: blend 0.584 (nucleus boundary 0.417), network alone 0.580, forest
    # 0.476 (boundary 0.280); at 120 steps (seeds 0, 1) the blend scored 0.554 / 0.544, the network alone
    # 0.535. The margins sit well below those.
    assert forest["mean"] == pytest.approx(0.476, abs=0.02)
    assert network["mean"] > forest["mean"] + 0.02
    assert blend["mean"] > forest["mean"] + 0.04
    assert blend[2] > forest[2]  # the thin class: nucleus boundary


def test_default_recipe_trains_same_padding_patches_inside_the_volume(sparse_nuclei):
    image, truth, sparse = sparse_nuclei
    data = prepare_training_set([image], [sparse], IGNORE)
    config = default_config(data, max_time=30.0)
    assert config.network.padding == "same"
    assert all(p <= n for p, n in zip(config.patch_shape, truth.shape))
    assert config.max_time == 30.0 and config.network.num_classes == 3 and config.loss == "dice_ce"
    assert config.augmentation.flip and config.augmentation.rotation_deg == 0 and config.augmentation.elastic_sigma == 0


def test_filter_feature_inputs_are_remade_by_predict(sparse_nuclei, tmp_path, monkeypatch):
    """A densify model trained on filter-bank channels segments a volume file with `unet3d predict`."""
    import tifffile

    from unet3d.data.features import region_with_input_features
    from unet3d.cli import main
    from unet3d.io import read_labels

    image, _, sparse = sparse_nuclei
    result = densify(image, sparse, IGNORE, tmp_path / "m.safetensors", iterations=5, max_time=None,
                     progress=False, filter_features=True, forest=False)
    assert result.model.config.in_channels == 1 + 61  # the image and ilastik's 61 filters
    assert result.info.input_features["bank"] == "ilastik"
    tifffile.imwrite(tmp_path / "image.tif", image[0])

    def predict(name: str, *options: str) -> np.ndarray:
        assert main.main(["predict", str(tmp_path / "m.safetensors"), str(tmp_path / "image.tif"),
                          "-o", str(tmp_path / name), *options]) == 0
        return read_labels(str(tmp_path / name))[0]

    # Same network, same inputs; only the tiling may differ (blended windows), so a few voxels may flip.
    assert (predict("seg.tif") == result.segmentation).mean() > 0.99
    # Short of memory for the whole volume's bank, predict makes it tile by tile: the same inputs.
    # Two tiles (split along Y): each makes the bank of its box grown by the bank's reach.
    whole_volume = predict("whole.tif", "--tile", "32,32,64")
    from unet3d.inference import predictor

    regions = []
    monkeypatch.setattr(predictor, "feature_memory_shortfall", lambda *args: "short of memory")
    monkeypatch.setattr(predictor, "region_with_input_features",
                        lambda *args: regions.append(args[2]) or region_with_input_features(*args))
    assert (predict("tiles.tif", "--tile", "32,32,64") == whole_volume).mean() > 0.999
    assert len(regions) > 1


def test_filter_features_too_large_for_memory_are_named():
    from unet3d.data.features import feature_memory_shortfall, input_feature_spec

    spec = input_feature_spec(None)
    assert feature_memory_shortfall("small.tif", (1, 31, 61, 57), spec) is None  # a few MiB: fine
    problem = feature_memory_shortfall("huge.tif", (1, 4096, 4096, 4096), spec)
    assert problem.startswith("huge.tif: filter-bank inputs for 4096×4096×4096 voxels need about")


def test_filter_features_by_default_only_with_enough_annotation_and_memory(sparse_nuclei):
    from unet3d.workflows.densify import FILTER_FEATURES_MIN_ANNOTATED, choose_inputs

    image, _, sparse = sparse_nuclei
    few = choose_inputs(None, image.shape, sparse, IGNORE, None, "nuclei.tif")
    assert few[0] is None and "annotated voxels" in few[1]  # about 18k annotated: the image alone
    painted = np.zeros((20, 100, 100), np.uint8)  # every voxel annotated: 200k
    assert painted.size >= FILTER_FEATURES_MIN_ANNOTATED
    spec, why = choose_inputs(None, (1, *painted.shape), painted, IGNORE, (2.0, 1.0, 1.0), "big.tif")
    assert spec["bank"] == "ilastik" and spec["spacing"] == [2.0, 1.0, 1.0] and "200,000" in why
    huge = (1, 4096, 4096, 4096)  # the bank is kept, made per training block instead of for the volume
    spec, why = choose_inputs(None, huge, painted, IGNORE, None, "huge.tif")
    assert spec["bank"] == "ilastik" and "made per block (filter-bank inputs for 4096×4096×4096 voxels" in why
    assert choose_inputs(True, huge, painted, IGNORE, None, "huge.tif")[0] is not None
    assert choose_inputs(False, (1, *painted.shape), painted, IGNORE, None, "big.tif")[0] is None


def test_geometric_mean_blend_is_normalized_and_lets_a_confident_model_win():
    from unet3d.workflows.blend import geometric_mean

    sure = np.array([[0.9, 0.5, 0.0], [0.1, 0.5, 1.0]], np.float32)
    unsure = np.array([[0.4, 0.5, 1.0], [0.6, 0.5, 0.0]], np.float32)
    blended = geometric_mean(sure, unsure)
    assert blended.dtype == np.float32 and np.allclose(blended.sum(0), 1)
    # Voxel 0: 0.9 × 0.4 against 0.1 × 0.6, the confident model wins; voxel 1: a tie stays a tie.
    assert blended[0, 0] > 0.5 and np.allclose(blended[:, 1], 0.5)
    # Voxel 2: each model is certain of a different class; the floor keeps it a tie, not 0 / 0.
    assert np.allclose(blended[:, 2], 0.5)


def test_the_forest_is_blended_in_at_any_size(sparse_nuclei):
    """Where the whole filter bank fits in memory it is made at once; elsewhere block by block."""
    from unet3d.workflows.densify import BLOCKWISE, WHOLE, choose_forest

    image, _, _ = sparse_nuclei
    assert choose_forest(None, image.shape, None, "nuclei.tif")[0] == WHOLE
    assert choose_forest(False, image.shape, None, "nuclei.tif")[0] is None
    huge = (1, 4096, 4096, 4096)
    route, why = choose_forest(None, huge, None, "huge.tif")
    assert route == BLOCKWISE and why.startswith("the network and a random forest on ilastik's filter bank made "
                                                 "block by block (filter-bank inputs for 4096×4096×4096 voxels")
    assert choose_forest(True, huge, None, "huge.tif")[0] == BLOCKWISE


def test_the_forest_time_comes_out_of_the_training_budget(sparse_nuclei, tmp_path):
    image, _, sparse = sparse_nuclei
    crop = (slice(None), slice(0, 16), slice(0, 32), slice(0, 32))
    result = densify(image[crop], sparse[crop[1:]], IGNORE, tmp_path / "m.safetensors", max_time=60.0, iterations=2,
                     progress=False, threads=1)
    assert result.forest_seconds > 0 and set(result.components) == {"network", "forest"}
    training_budget = result.info.training["config"]["max_time"]
    assert training_budget == pytest.approx(60.0 - result.forest_seconds, abs=1.0)
    alone = densify(image[crop], sparse[crop[1:]], IGNORE, tmp_path / "n.safetensors", max_time=60.0, iterations=2,
                    progress=False, threads=1, forest=False)
    assert alone.components == {} and alone.forest_seconds < result.forest_seconds
    assert alone.info.training["config"]["max_time"] > training_budget
    # A budget too short for ilastik's 100 trees (a quarter of it is the forest's) cuts the forest.
    assert result.forest_trees == 100
    hurried = densify(image[crop], sparse[crop[1:]], IGNORE, tmp_path / "h.safetensors", max_time=0.2, iterations=2,
                      progress=False, threads=1)
    assert hurried.forest_trees == 10


def test_densify_command_reports_the_blend_and_each_model_alone(sparse_nuclei, tmp_path, capsys):
    import tifffile

    from unet3d.cli import main

    image, truth, sparse = sparse_nuclei
    crop = (slice(0, 16), slice(0, 32), slice(0, 32))
    for name, volume in (("image", image[0][crop]), ("sparse", sparse[crop]), ("truth", truth[crop])):
        tifffile.imwrite(tmp_path / f"{name}.tif", volume)
    args = [str(tmp_path / "image.tif"), str(tmp_path / "sparse.tif"), "-o", str(tmp_path / "seg.tif"),
            "--ignore-label", str(IGNORE), "--iterations", "3", "--truth", str(tmp_path / "truth.tif"), "--quiet"]
    assert main.main(["densify", *args]) == 0
    report = capsys.readouterr().out
    assert "result: the network and a random forest" in report
    assert "predicted the 8 mirrored volumes, averaged" in report  # a small volume: seconds of 120
    assert "foreground IoU of the parts: network " in report and ", forest " in report
    assert all((tmp_path / f).exists() for f in ("seg.tif", "seg.model.safetensors", "seg.overlay.png"))
    assert main.main(["densify", *args, "--forest", "off", "--tta", "off"]) == 0
    report = capsys.readouterr().out
    assert "result: the network alone (forest off)" in report and "foreground IoU of the parts" not in report
    assert "predicted once" in report
    model = str(tmp_path / "seg.model.safetensors")
    assert main.main(["densify", *args, "--init", model, "--model", str(tmp_path / "tuned.safetensors")]) == 0
    assert f"input: the image alone, as the model it starts from ({model})" in capsys.readouterr().out


def test_test_time_flips_are_added_when_cheap_against_the_budget(nuclei):
    from itertools import count

    from unet3d.inference import predict_array
    from unet3d.model import UNet, UNetConfig
    from unet3d.workflows.densify import predict_with_tta

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = UNet(UNetConfig(in_channels=1, num_classes=3, width=4, levels=2, padding="same")).eval()
    image = nuclei[0][None, :8, :24, :24].astype(np.float32)
    one_second_per_call = count().__next__  # the timed prediction "takes" 1 s
    flipped = predict_array(model, image, tta=True)
    plain = predict_array(model, image)
    assert not np.allclose(flipped, plain)
    probabilities, used = predict_with_tta(model, image, None, 80.0, one_second_per_call, "cpu", False)
    assert used and np.allclose(probabilities, flipped)  # 8 more seconds ≤ 10 % of 80
    probabilities, used = predict_with_tta(model, image, None, 79.0, one_second_per_call, "cpu", False)
    assert not used and np.allclose(probabilities, plain)
    assert not predict_with_tta(model, image, None, None, one_second_per_call, "cpu", False)[1]  # no budget
    assert predict_with_tta(model, image, True, 1.0, one_second_per_call, "cpu", False)[1]
    assert not predict_with_tta(model, image, False, 1e9, one_second_per_call, "cpu", False)[1]


@pytest.mark.parametrize("filter_features", [False, True])
def test_the_blended_forest_is_ilastiks_forest_whether_or_not_the_network_shares_its_bank(sparse_nuclei, tmp_path,
                                                                                          filter_features):
    from unet3d.baselines import random_forest_segment
    from unet3d.data.labels import encode_labels

    image, _, sparse = sparse_nuclei
    crop = (slice(None), slice(0, 12), slice(0, 32), slice(0, 32))
    result = densify(image[crop], sparse[crop[1:]], IGNORE, tmp_path / "m.safetensors", iterations=2, max_time=None,
                     progress=False, seed=4, filter_features=filter_features)
    assert (result.model.config.in_channels > 1) == filter_features and result.forest_trees == 100
    alone = random_forest_segment(image[crop], encode_labels(sparse[crop[1:]], CLASSES, IGNORE), seed=4)
    np.testing.assert_array_equal(result.components["forest"], np.asarray(CLASSES)[alone.labels])


def test_densify_fine_tunes_a_trained_model_with_its_classes_and_inputs(sparse_nuclei, tmp_path):
    import torch

    from unet3d.model import load_model
    from unet3d.workflows.densify import FINE_TUNING_LEARNING_RATE, LEARNING_RATE, StartingModel

    image, _, sparse = sparse_nuclei
    crop = (slice(None), slice(0, 16), slice(0, 32), slice(0, 32))
    first = densify(image[crop], sparse[crop[1:]], IGNORE, tmp_path / "first.safetensors", iterations=3,
                    progress=False, threads=1, forest=False, tta=False, filter_features=True, seed=1)
    # Annotation without the boundary class and too few voxels for the bank by default: the model's
    # three classes and its filter bank are kept all the same.
    interior_only = np.where(sparse == 2, IGNORE, sparse)
    unchanged = densify(image, interior_only, IGNORE, tmp_path / "same.safetensors", iterations=0, progress=False,
                        threads=1, forest=False, tta=False, init=StartingModel.load(tmp_path / "first.safetensors"))
    assert unchanged.info.class_values == CLASSES and unchanged.probabilities.shape[0] == 3
    assert unchanged.info.input_features == first.info.input_features
    assert "as the model it starts from" in unchanged.inputs
    start = first.model.state_dict()
    assert all(torch.equal(start[k], v) for k, v in unchanged.model.state_dict().items())
    tuned = densify(image, interior_only, IGNORE, tmp_path / "tuned.safetensors", iterations=2, progress=False,
                    threads=1, forest=False, tta=False, init=StartingModel.load(tmp_path / "first.safetensors"))
    written, _ = load_model(tmp_path / "tuned.safetensors")
    assert not torch.equal(written.state_dict()["head.weight"], start["head.weight"])
    assert tuned.iterations == 2
    assert tuned.info.training["config"]["learning_rate"] == FINE_TUNING_LEARNING_RATE < LEARNING_RATE


def test_a_model_to_fine_tune_must_fit_the_volume_and_keeps_its_normalization(sparse_nuclei, tmp_path):
    from unet3d.errors import UserError
    from unet3d.model import load_model, save_model
    from unet3d.workflows.densify import StartingModel

    image, _, sparse = sparse_nuclei
    crop = (slice(None), slice(0, 16), slice(0, 32), slice(0, 32))
    densify(image[crop], sparse[crop[1:]], IGNORE, tmp_path / "m.safetensors", iterations=1, progress=False,
            threads=1, forest=False, tta=False)
    start = StartingModel.load(tmp_path / "m.safetensors")
    with pytest.raises(UserError, match="m.safetensors: the model was trained without the filter bank"):
        densify(image[crop], sparse[crop[1:]], IGNORE, tmp_path / "n.safetensors", iterations=1, progress=False,
                forest=False, filter_features=True, init=start)
    two_channels = np.concatenate([image[crop], image[crop]])
    with pytest.raises(UserError, match="m.safetensors: the model reads 1 input channel"):
        densify(two_channels, sparse[crop[1:]], IGNORE, tmp_path / "n.safetensors", iterations=1, progress=False,
                forest=False, init=start)
    # A model normalized per volume (train --per-volume) stays so.
    network, info = load_model(tmp_path / "m.safetensors")
    save_model(tmp_path / "pv.safetensors", network,
               dataclasses.replace(info, normalization={"method": "zscore", "channels": 1, "per_volume": True}))
    tuned = densify(image[crop], sparse[crop[1:]], IGNORE, tmp_path / "t.safetensors", iterations=1, progress=False,
                    forest=False, tta=False, init=StartingModel.load(tmp_path / "pv.safetensors"))
    assert tuned.info.normalization["per_volume"] is True
    with pytest.raises(UserError, match="missing.safetensors: model file not found"):
        StartingModel.load(tmp_path / "missing.safetensors")


@pytest.mark.slow
def test_a_network_trained_on_other_nuclei_gives_densify_a_head_start(nuclei, tmp_path):
    """Trained on the densely labelled left half of the example, then fine-tuned on three slices of
    the right half, the network beats one trained on those slices alone for as many steps."""
    from unet3d.training import train
    from unet3d.workflows.densify import StartingModel

    image, truth = nuclei
    image, truth = image[None].astype(np.float32), truth.astype(np.int64)
    left, right = (slice(None), slice(None), slice(0, 28)), (slice(None), slice(None), slice(28, None))
    data = prepare_training_set([image[left]], [truth[left[1:]]], IGNORE, class_values=CLASSES)
    train(default_config(data, iterations=150, max_time=None), data, tmp_path / "left.safetensors", progress=False)
    sparse = sparsify(truth[right[1:]], (1, 1, 1), IGNORE)
    scores = {}
    for name, init in (("fresh", None), ("fine-tuned", StartingModel.load(tmp_path / "left.safetensors"))):
        result = densify(image[right], sparse, IGNORE, tmp_path / f"{name}.safetensors", iterations=20,
                         max_time=None, progress=False, threads=1, forest=False, tta=False, init=init)
        scores[name] = foreground_iou(result.segmentation, truth[right[1:]], sparse)["mean"]
    assert scores["fine-tuned"] > scores["fresh"] + 0.08, scores  # measured 0.547 against 0.395


@pytest.mark.slow
def test_with_enough_annotation_the_blend_is_weighed_on_held_out_blocks(sparse_nuclei, tmp_path, monkeypatch):
    import unet3d.workflows.densify as workflow

    image, truth, sparse = sparse_nuclei
    monkeypatch.setattr(workflow, "HOLD_OUT_MIN_ANNOTATED", 1_000)
    result = densify(image, sparse, IGNORE, tmp_path / "m.safetensors", iterations=3, max_time=None, progress=False,
                     threads=1)
    assert "held-out annotated voxels" in result.weighing
    assert set(result.components) == {"network", "forest"} and len(result.held_out) > 0
    # The held-out voxels are annotated ones, and the weighing was decided on them alone.
    held_values = sparse.reshape(-1)[result.held_out.voxels]
    assert np.all(held_values != IGNORE) and np.array_equal(held_values, np.asarray(CLASSES)[result.held_out.classes])
    weight = float(result.weighing.split("network weight ")[1].split()[0])
    assert 0.0 <= weight <= 1.0
    monkeypatch.setattr(workflow, "HOLD_OUT_MIN_ANNOTATED", 10**9)
    plain = densify(image, sparse, IGNORE, tmp_path / "n.safetensors", iterations=3, max_time=None, progress=False,
                    threads=1)
    assert plain.weighing == "geometric mean with equal weights" and plain.held_out is None


def test_the_time_plan_times_a_tile_of_the_plan_prediction_uses_and_bounds_the_weighing():
    """The prediction set aside from --max-time is one tile of the very plan `predict_volume` will
    run, times its tiles; the blend is weighed on as many held-out blocks as WEIGHING_SHARE of the
    budget pays for."""
    from itertools import count

    from unet3d.inference.predictor import make_plan
    from unet3d.model import UNet
    from unet3d.workflows import densify as module

    config = module.densify_network(1, 3)
    shape, budget = (24, 96, 200), 64 * 2**20
    image = np.random.default_rng(0).random((1, *shape), np.float32)
    clock = count().__next__  # one "second" per reading
    cost = module.prediction_cost(config, lambda box: image[(slice(None),) + box], None, shape, clock, "cpu", budget)
    tiles = len(make_plan(UNet(config), shape, max_memory=budget).starts)
    assert tiles > 1 and cost.tiles == tiles
    assert cost.seconds == pytest.approx(module.PREDICTION_MARGIN * tiles)  # the tile took one clock tick
    block = module.training_patch(shape)
    box = np.prod([min(2 * b, n) for b, n in zip(block, shape)])
    assert cost.weighing(block, shape, None) == (module.WEIGHING_BLOCKS, pytest.approx(64 * box * cost.per_voxel))
    assert cost.weighing(block, shape, 1e-9)[0] == module.MIN_WEIGHING_BLOCKS
    affordable = module.WEIGHING_SHARE * 1000.0 // (cost.per_voxel * box)
    assert cost.weighing(block, shape, 1000.0)[0] == np.clip(affordable, module.MIN_WEIGHING_BLOCKS,
                                                              module.WEIGHING_BLOCKS)
