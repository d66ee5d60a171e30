"""Instance labels from class probabilities, object matching, and `unet3d instances` / `evaluate --instances`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unet3d.cli.main import main
from unet3d.evaluation import match_instances
from unet3d.instances import KINDS, InstanceMethod, instances_blockwise, instances_from_probabilities
from unet3d.io import read_labels, write_volume


def one_hot(classes: np.ndarray, count: int = 3) -> np.ndarray:
    return np.stack([(classes == c).astype(np.float32) for c in range(count)])


def touching_spheres() -> tuple[np.ndarray, np.ndarray]:
    """Two spheres of radius 7 whose centres are 11 voxels apart, each voxel to the nearer centre;
    classes: 0 outside, 2 on each sphere's outer layer and where the two meet, 1 inside."""
    z, y, x = np.mgrid[:20, :24, :36]
    distances = [np.sqrt((z - 10) ** 2 + (y - 12) ** 2 + (x - cx) ** 2) for cx in (12, 23)]
    objects = np.where(distances[0] <= distances[1], 1, 2)
    objects[np.minimum(*distances) > 7] = 0
    return objects, surface_classes(objects)


def walled_cells(hole: int) -> tuple[np.ndarray, np.ndarray]:
    """A 20×30×30 box of two cells split by a wall at x = 15 (class 2, cell 1's voxels) with a
    `hole`×`hole` gap in its middle; no background."""
    objects = np.ones((20, 30, 30), np.int64)
    objects[:, :, 16:] = 2
    classes = np.ones_like(objects)
    classes[:, :, 15] = 2
    if hole:
        low = 15 - hole // 2
        classes[10 - hole // 2:10 - hole // 2 + hole, low:low + hole, 15] = 1
    return objects, classes


def random_blobs(seed: int, count: int = 30, shape=(24, 40, 40)) -> np.ndarray:
    """`count` balls of radius 2.5-5 at random (later ones over earlier ones), as classes: 0 outside,
    2 on each ball's outer layer and where two meet, 1 inside."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    objects = np.zeros(shape, np.int64)
    for value in range(1, count + 1):
        centre, radius = rng.uniform(0, shape), rng.uniform(2.5, 5)
        objects[(z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius ** 2] = value
    return surface_classes(objects)


def surface_classes(objects: np.ndarray) -> np.ndarray:
    classes = (objects > 0).astype(np.int64)
    for axis in range(3):
        for shift in (1, -1):
            classes[(objects > 0) & (np.roll(objects, shift, axis) != objects)] = 2
    return classes


def blurred(probabilities: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    smooth = np.stack([ndimage.gaussian_filter(p, 1.0) for p in probabilities])
    return smooth / smooth.sum(0)


def ap(result: dict, threshold: float) -> float:
    return next(row["ap"] for row in result["thresholds"] if row["threshold"] == threshold)


def test_touching_nuclei_are_two_objects():
    truth, classes = touching_spheres()
    labels = instances_from_probabilities(one_hot(classes), [0, 1, 2], KINDS["nuclei"])
    result = match_instances(labels, truth)
    assert (result["truth_objects"], result["predicted_objects"]) == (2, 2)
    assert ap(result, 0.75) == 1.0
    assert not labels[truth == 0].any()  # nothing grows into the background


def test_blurred_probabilities_still_give_two_nuclei():
    truth, classes = touching_spheres()
    labels = instances_from_probabilities(blurred(one_hot(classes)), [0, 1, 2], KINDS["nuclei"])
    assert ap(match_instances(labels, truth), 0.75) == 1.0


@pytest.mark.parametrize("hole", [0, 3])
def test_a_wall_splits_two_cells_even_with_a_gap(hole):
    truth, classes = walled_cells(hole)
    probabilities = one_hot(classes)[1:]  # interior and boundary only, as when no background was painted
    labels = instances_from_probabilities(probabilities, [1, 2], KINDS["cells"])
    result = match_instances(labels, truth)
    assert result["predicted_objects"] == 2
    assert ap(result, 0.75) == 1.0


def test_labels_are_numbered_in_raster_order_whatever_the_seed_order():
    truth, classes = touching_spheres()
    labels = instances_from_probabilities(one_hot(classes)[:, :, :, ::-1].copy(), [0, 1, 2], KINDS["nuclei"])
    first = [np.flatnonzero(labels.ravel() == value)[0] for value in (1, 2)]
    assert first[0] < first[1] and labels.dtype == np.uint16


BLOCKS = [(8, 8, 8), (7, 11, 13), (5, 5, 5), (64, 64, 64)]  # cutting the objects every way, and one block
BLOCKWISE_CASES = {  # probabilities, class values, kind, halo (at least the largest object)
    "touching spheres": lambda: (one_hot(touching_spheres()[1]), [0, 1, 2], "nuclei", 8),
    "30 blobs": lambda: (one_hot(random_blobs(0)), [0, 1, 2], "nuclei", 16),
    "30 blurred blobs": lambda: (blurred(one_hot(random_blobs(1))), [0, 1, 2], "nuclei", 16),
    "walled cells": lambda: (one_hot(walled_cells(0)[1])[1:], [1, 2], "cells", 8),
    "walled cells, a hole": lambda: (one_hot(walled_cells(3)[1])[1:], [1, 2], "cells", 8),
}


@pytest.mark.parametrize("case", sorted(BLOCKWISE_CASES))
def test_blockwise_labels_equal_the_whole_volume_ones(case):
    probabilities, values, kind, halo = BLOCKWISE_CASES[case]()
    whole = instances_from_probabilities(probabilities, values, KINDS[kind], values[-2], values[-1])
    assert whole.max() > 1
    for block in BLOCKS:
        labels = instances_blockwise(probabilities, values, KINDS[kind], values[-2], values[-1], block=block, halo=halo)
        assert labels.dtype == whole.dtype and np.array_equal(labels, whole), block


def test_a_seed_across_many_blocks_is_one_object_even_if_each_part_is_small():
    # A rod of interior along x: its seed (the part more than 1 voxel inside) is 3×3 voxels thick, so
    # each 1-voxel-thick block holds 9 seed voxels, fewer than the 10 a seed needs, the rod 36 blocks.
    classes = np.zeros((7, 7, 40), np.int64)
    classes[1:6, 1:6, 2:38] = 1
    probabilities = one_hot(classes)
    labels = instances_blockwise(probabilities, [0, 1, 2], KINDS["nuclei"], block=(7, 7, 1), halo=8)
    assert labels.max() == 1 and np.array_equal(labels, instances_from_probabilities(probabilities, [0, 1, 2],
                                                                                    KINDS["nuclei"]))


def test_blockwise_labels_go_into_a_zarr_array(tmp_path):
    import zarr

    probabilities = one_hot(random_blobs(2))
    whole = instances_from_probabilities(probabilities, [0, 1, 2], KINDS["nuclei"])
    made = []

    def zarr_labels(dtype):
        made.append(zarr.create_array(str(tmp_path / "objects.zarr"), shape=whole.shape, dtype=dtype, chunks=(8, 16, 16)))
        return made[-1]

    instances_blockwise(probabilities, [0, 1, 2], KINDS["nuclei"], out=zarr_labels, block=(10, 16, 16))
    stored = zarr.open_array(str(tmp_path / "objects.zarr"), mode="r")
    assert len(made) == 1 and stored.dtype == whole.dtype and np.array_equal(stored[:], whole)


def test_blockwise_refuses_what_blocks_cannot_reproduce():
    probabilities = one_hot(touching_spheres()[1])
    plantseg = InstanceMethod("not_boundary", 0.3, "maxima", 8.0, 50, True, 0.5)
    with pytest.raises(ValueError, match="'core' seed rule"):
        instances_blockwise(probabilities, [0, 1, 2], plantseg)
    with pytest.raises(ValueError, match="the 7 the seeds need"):
        instances_blockwise(probabilities, [0, 1, 2], KINDS["cells"], halo=4)


def row(values) -> np.ndarray:
    return np.asarray(values).reshape(1, 1, -1)


def test_matching_counts_by_hand():
    # truth: A (4 voxels), B (5), C (2); prediction: A exact, B' overlapping B by 3 of a union of 5
    # (IoU 0.6), a false object, C missed.
    truth = row([1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0, 3, 3, 0])
    pred = row([7, 7, 7, 7, 0, 0, 5, 5, 5, 0, 9, 0, 0, 0])
    result = match_instances(pred, truth)
    assert (result["truth_objects"], result["predicted_objects"]) == (3, 3)
    half, three_quarters = result["thresholds"]
    assert (half["tp"], half["fp"], half["fn"]) == (2, 1, 1)
    assert half["precision"] == pytest.approx(2 / 3) and half["recall"] == pytest.approx(2 / 3)
    assert half["f1"] == pytest.approx(2 / 3) and half["ap"] == pytest.approx(2 / 4)
    assert half["mean_matched_iou"] == pytest.approx((1 + 0.6) / 2)
    assert (three_quarters["tp"], three_quarters["fp"], three_quarters["fn"]) == (1, 2, 2)
    assert three_quarters["ap"] == pytest.approx(1 / 5)


def test_an_object_matches_at_most_once_at_a_tie():
    # Two predicted halves of one true object: IoU exactly 0.5 each, one match only.
    result = match_instances(row([1, 1, 2, 2]), row([4, 4, 4, 4]))
    half = result["thresholds"][0]
    assert (half["tp"], half["fp"], half["fn"]) == (1, 1, 0)


def test_the_mask_drops_objects_outside_it():
    truth = row([1, 1, 0, 0, 0])
    pred = row([1, 1, 0, 2, 2])
    mask = row([True, True, True, False, False])
    assert match_instances(pred, truth)["thresholds"][0]["fp"] == 1
    masked = match_instances(pred, truth, mask)
    assert masked["thresholds"][0]["fp"] == 0 and masked["voxels"] == 3


def test_no_objects_anywhere_has_no_scores():
    half = match_instances(np.zeros((2, 2, 2), int), np.zeros((2, 2, 2), int))["thresholds"][0]
    assert half["ap"] is None and half["precision"] is None


def test_blobs_without_a_boundary_class(tmp_path, capsys):
    # Two separate balls (mitochondria-like): classes 0 outside, 1 inside, and a third class elsewhere.
    z, y, x = np.mgrid[:12, :20, :40]
    truth = np.zeros((12, 20, 40), np.uint16)
    for value, cx in ((1, 10), (2, 28)):
        truth[(z - 6) ** 2 + (y - 10) ** 2 + (x - cx) ** 2 <= 25] = value
    classes = np.where(truth > 0, 1, np.where(x < 20, 0, 2))
    probabilities = tmp_path / "p.npy"
    write_volume(str(probabilities), one_hot(classes))
    output = str(tmp_path / "o.npy")
    assert main(["instances", str(probabilities), "-o", output, "--boundary", "none"]) == 0
    assert ap(match_instances(np.load(output), truth), 0.75) == 1.0
    assert main(["instances", str(probabilities), "-o", output, "--boundary", "none", "--kind", "cells"]) == 2
    assert "a boundary class is needed" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".tif", ".h5", ".nii.gz", ".zarr", ".npy"])
def test_instances_command_round_trip(tmp_path, capsys, suffix):
    truth, classes = touching_spheres()
    probabilities, output, truth_file = tmp_path / "p.npy", str(tmp_path / f"objects{suffix}"), tmp_path / "truth.tif"
    write_volume(str(probabilities), one_hot(classes).astype(np.float16))
    write_volume(str(truth_file), truth.astype(np.uint16))
    assert main(["instances", str(probabilities), "-o", output, "--kind", "nuclei"]) == 0
    labels = read_labels(output)[0]
    assert labels.shape == truth.shape and labels.max() == 2
    capsys.readouterr()
    assert main(["evaluate", output, str(truth_file), "--instances", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["thresholds"][1]["ap"] == 1.0


def test_evaluate_instances_on_the_unannotated_voxels(tmp_path, capsys):
    truth, _ = touching_spheres()
    prediction = truth.copy()
    prediction[:, :, :12] = 0  # the left sphere's left half is lost ...
    sparse = np.full(truth.shape, 255, np.uint8)
    sparse[:, :, :12] = 1  # ... where it was annotated, so it does not count
    files = {name: str(tmp_path / f"{name}.tif") for name in ("prediction", "truth", "sparse")}
    for name, array in zip(files, (prediction.astype(np.uint16), truth.astype(np.uint16), sparse)):
        write_volume(files[name], array)
    assert main(["evaluate", files["prediction"], files["truth"], "--instances", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["thresholds"][1]["tp"] == 1
    assert main(["evaluate", files["prediction"], files["truth"], "--instances", "--exclude", files["sparse"],
                 "--ignore-label", "255"]) == 0
    table = capsys.readouterr().out
    assert "1.0000" in table.splitlines()[2] and "those holding the ignore label 255" in table


def test_instances_command_refuses_labels_and_unknown_channels(tmp_path, capsys):
    _, classes = touching_spheres()
    labels_file = tmp_path / "labels.npy"
    write_volume(str(labels_file), np.stack([classes, classes, classes]).astype(np.float32) * 2)
    assert main(["instances", str(labels_file), "-o", str(tmp_path / "o.tif")]) == 2
    error = capsys.readouterr().err.strip()
    assert "labels.npy" in error and "not class probabilities" in error and "\n" not in error
    probabilities = tmp_path / "p.npy"
    write_volume(str(probabilities), one_hot(classes)[1:])
    assert main(["instances", str(probabilities), "-o", str(tmp_path / "o.tif")]) == 2
    assert "no channel holds the boundary class 2" in capsys.readouterr().err
    assert main(["instances", str(probabilities), "-o", str(tmp_path / "o.tif"), "--classes", "1,2,3"]) == 2
    assert "2 channel(s), but --classes names 3" in capsys.readouterr().err
    write_volume(str(tmp_path / "labels.tif"), classes.astype(np.uint8))
    assert main(["instances", str(tmp_path / "labels.tif"), "-o", str(tmp_path / "o.tif")]) == 2
    assert "labels.tif: a single channel, not class probabilities" in capsys.readouterr().err
    assert not (tmp_path / "o.tif").exists()
    assert main(["instances", str(probabilities), "-o", str(tmp_path / "o.tif"), "--classes", "1,2",
                 "--kind", "cells"]) == 0


@pytest.mark.parametrize("suffix", [".zarr", ".h5", ".tif"])
def test_instances_command_block_by_block(tmp_path, capsys, monkeypatch, suffix):
    probabilities, whole_file = str(tmp_path / "p.h5:/probabilities"), str(tmp_path / "whole.npy")
    write_volume(probabilities, blurred(one_hot(random_blobs(0))).astype(np.float16))
    assert main(["instances", probabilities, "-o", whole_file]) == 0
    whole = np.load(whole_file)
    blocks = str(tmp_path / f"blocks{suffix}")
    assert main(["instances", probabilities, "-o", blocks, "--block", "8,16,16"]) == 0
    assert f"{whole.max()} objects (nuclei)" in capsys.readouterr().out
    assert np.array_equal(read_labels(blocks)[0], whole)
    monkeypatch.setattr("unet3d.cli.instances.IN_MEMORY_VOXELS", 1000)  # a "large" volume: blocks by default
    large = str(tmp_path / f"large{suffix}")
    assert main(["instances", probabilities, "-o", large]) == 0 and np.array_equal(read_labels(large)[0], whole)


def test_instances_command_block_by_block_refuses_what_is_not_probabilities(tmp_path, capsys):
    values = one_hot(random_blobs(0)) * 2
    write_volume(str(tmp_path / "p.zarr"), values)
    assert main(["instances", str(tmp_path / "p.zarr"), "-o", str(tmp_path / "o.zarr"), "--block", "8"]) == 2
    assert "p.zarr: values from 0 to 2 are not class probabilities" in capsys.readouterr().err
    assert not (tmp_path / "o.zarr").exists()


def test_densify_and_predict_write_the_objects_of_their_probabilities(tmp_path, nuclei, capsys):
    image, truth = nuclei
    crop = (slice(0, 16), slice(0, 32), slice(0, 32))
    sparse = np.full(truth[crop].shape, 255, np.uint8)
    sparse[4], sparse[11] = truth[crop][4], truth[crop][11]  # two annotated planes of background, interior, boundary
    files = {name: str(tmp_path / f"{name}.tif") for name in ("image", "sparse", "classes", "probabilities")}
    write_volume(files["image"], image[crop])
    write_volume(files["sparse"], sparse)
    # one step: the forest (10-odd trees in a quarter of 15 s) gives the objects
    quick = ["--iterations", "1", "--max-time", "15", "--tta", "off", "--filter-features", "off", "--quiet"]
    assert main(["densify", files["image"], files["sparse"], "-o", files["classes"], "--ignore-label", "255", *quick,
                 "--probabilities", files["probabilities"], "--objects", str(tmp_path / "objects.tif")]) == 0
    assert "objects, nuclei)" in capsys.readouterr().out
    assert main(["instances", files["probabilities"], "-o", str(tmp_path / "check.tif")]) == 0
    assert np.array_equal(read_labels(str(tmp_path / "objects.tif"))[0], read_labels(str(tmp_path / "check.tif"))[0])
    model = str(tmp_path / "classes.model.safetensors")
    predicted = [str(tmp_path / "p.h5"), str(tmp_path / "objects.zarr"), str(tmp_path / "alone.npy")]
    assert main(["predict", model, files["image"], "-o", str(tmp_path / "c.tif"), "--quiet",
                 "--probabilities", predicted[0], "--objects", predicted[1]]) == 0
    assert main(["predict", model, files["image"], "-o", str(tmp_path / "c.tif"), "--quiet", "--objects", predicted[2]]) == 0
    assert main(["instances", predicted[0], "-o", str(tmp_path / "check.npy")]) == 0
    expected = np.load(tmp_path / "check.npy")
    assert expected.max() > 0
    assert all(np.array_equal(read_labels(spec)[0], expected) for spec in predicted[1:])
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no temporary probabilities left
    capsys.readouterr()
    assert main(["predict", model, files["image"], "-o", str(tmp_path / "c2.tif"), "--objects",
                 str(tmp_path / "o2.tif"), "--boundary", "7"]) == 2
    assert "classes.model.safetensors: no channel holds the boundary class 7 (channels: 0,1,2; set --boundary)" in \
        capsys.readouterr().err
    assert main(["densify", files["image"], files["sparse"], "-o", files["classes"], "--ignore-label", "255", *quick,
                 "--objects", str(tmp_path / "o2.tif"), "--kind", "cells", "--boundary", "none"]) == 2
    assert "cells are bounded by walls" in capsys.readouterr().err
    assert not (tmp_path / "o2.tif").exists() and not (tmp_path / "c2.tif").exists()


class _TrainedSession:
    """What the napari widget asks of a trained session held in memory: its classes (painted values)
    and the probabilities of the whole volume."""

    large = False

    def __init__(self, probabilities: np.ndarray):
        self.class_values, self.network, self._probabilities = [1, 2, 3], object(), probabilities

    def probabilities(self) -> np.ndarray:
        return self._probabilities


def test_napari_objects_become_a_labels_layer(request):
    import os

    pytest.importorskip("napari")
    pytest.importorskip("pytestqt")
    if not os.environ.get("DISPLAY") and not os.environ.get("CI"):  # pytest-xvfb sets DISPLAY; CI must have one
        pytest.skip("no display (Debian: apt-get install xvfb)")
    from unet3d.napari.widget import OBJECTS_LAYER, InteractiveWidget

    viewer, qtbot = request.getfixturevalue("make_napari_viewer_proxy")(), request.getfixturevalue("qtbot")
    truth, classes = touching_spheres()
    widget = InteractiveWidget(viewer)
    widget.session, widget._session_layer = _TrainedSession(one_hot(classes)), "image"
    viewer.add_image(classes.astype(np.float32), name="image")
    viewer.add_labels(np.zeros(classes.shape, np.uint8), name="painting")
    viewer.window.add_dock_widget(widget)
    widget.reset_choices()
    widget.image.value, widget.painting.value = viewer.layers["image"], viewer.layers["painting"]
    widget.objects.clicked()
    qtbot.waitUntil(lambda: OBJECTS_LAYER in viewer.layers and not widget.busy, timeout=30_000)
    assert ap(match_instances(np.asarray(viewer.layers[OBJECTS_LAYER].data), truth), 0.75) == 1.0
    assert widget.status.value == "2 objects (nuclei)"
    widget.boundary.value = 7
    widget.objects.clicked()
    assert "interior 2 and boundary 7" in widget.status.value
