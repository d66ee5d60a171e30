"""The interactive loop without a GUI: rounds, warm start, napari's label convention, previews,
stopping and full-quality segmentation, on the bundled nuclei volume."""

import threading

import numpy as np
import pytest

from unet3d.data.sparse import sparsify
from unet3d.errors import UserError
from unet3d.evaluation.metrics import confusion_matrix, scores
from unet3d.inference.predictor import predict_array, predict_image
from unet3d.interactive.session import UNPAINTED, Session, painted_classes
from unet3d.data.normalization import apply_normalization
from unet3d.model import UNet, load_forest, load_model
from unet3d.workflows.densify import default_config


def painted_from_truth(truth: np.ndarray, slices) -> np.ndarray:
    """A napari painting of the truth's classes (as values 1, 2, 3) on a few slices; 0 elsewhere."""
    sparse = sparsify(truth.astype(np.int64), slices, -1)
    return np.where(sparse >= 0, sparse + 1, UNPAINTED).astype(np.uint8)


def unpainted_iou(labels: np.ndarray, truth: np.ndarray, painted: np.ndarray) -> float:
    mask = painted == UNPAINTED
    confusion = confusion_matrix(labels[mask].astype(np.int64) - 1, truth[mask].astype(np.int64), 3)
    return scores(confusion, [0, 1, 2], background=0)["mean_iou_foreground"]


def unpainted_iou_slab(preview, truth: np.ndarray, painted: np.ndarray) -> float:
    """unpainted_iou of a preview's box."""
    return unpainted_iou(preview.labels, truth[preview.box], painted[preview.box])


def untrained_iou(session: Session, painted: np.ndarray, truth: np.ndarray) -> float:
    """The IoU an untrained network of the recipe gets: what training must beat."""
    untrained = UNet(default_config(session.training_set(painted), max_time=1).network).eval()
    labels = np.asarray([1, 2, 3])[predict_array(untrained, session.normalized).argmax(0)]
    return unpainted_iou(labels, truth, painted)


def test_painted_classes_follow_napari_and_refuse_what_cannot_train():
    assert painted_classes(np.array([[[0, 2, 5]]])) == [2, 5]
    with pytest.raises(UserError, match="nothing is painted"):
        painted_classes(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(UserError, match="only class 3 is painted"):
        painted_classes(np.array([[[0, 3]]]))
    with pytest.raises(UserError, match="value.s. 7 are not classes of the model"):
        painted_classes(np.array([[[1, 7]]]), known=[1, 2])


def test_rounds_learn_preview_continue_and_stop(tmp_path, nuclei):
    image, truth = nuclei
    session = Session(image)
    painted = painted_from_truth(truth, (1, 1, 1))
    untrained = untrained_iou(session, painted, truth)

    progress, previews = [], []
    # Steps bound the round (the time is generous): what it learns does not depend on the machine.
    first = session.train_round(painted, 600.0, iterations=50, on_progress=progress.append,
                                on_preview=previews.append, view_z=lambda: 15)
    assert first.stopped_by == "iterations" and not first.warm_start and first.class_values == [1, 2, 3]
    assert progress and progress[-1].iteration == first.iterations == 50 and progress[-1].round == 1
    assert previews and all(p.labels.shape == (p.stop - p.start, *image.shape[1:]) for p in previews)
    assert previews[0].start <= 15 < previews[0].stop and set(np.unique(previews[-1].labels)) <= {1, 2, 3}
    # The first preview is the forest's, shown before the network's first step: already a segmentation.
    assert unpainted_iou_slab(previews[0], truth, painted) > untrained + 0.1
    labels, uncertainty = session.preview_volume()
    assert unpainted_iou(labels, truth, painted) > untrained + 0.1
    assert uncertainty.shape == truth.shape and 0 <= uncertainty.min() and uncertainty.max() <= 1

    more = painted_from_truth(truth, (3, 3, 2))
    before = session.network
    second = session.train_round(more, 600.0, iterations=20)
    assert second.warm_start and session.network is before  # continued from the same weights
    assert np.count_nonzero(session.training_set(more).labels[0].numpy() >= 0) > np.count_nonzero(painted)

    stop = threading.Event()
    stop.set()
    stopped = session.train_round(more, 30.0, stop=stop)
    assert stopped.stopped_by == "request" and stopped.iterations == 1

    session.save(tmp_path / "m.safetensors")
    model, info = load_model(tmp_path / "m.safetensors")
    assert info.class_values == [1, 2, 3]
    forest = load_forest(tmp_path / "m.safetensors", info)
    # The weight was decided on painted blocks held out of both models; weight 1 stores no forest.
    assert session.forest.evidence["on"] == "painted blocks held out of both models"
    assert (forest is None) == (session.forest.network_weight == 1)
    # The saved model segments as the loop shows: the network blended with the round's forest.
    saved = np.asarray(info.class_values)[predict_image(model, info, image[None], forest=forest).argmax(0)]
    np.testing.assert_array_equal(saved, session.preview_volume()[0])
    if forest is not None:
        assert forest.network_weight == session.forest.network_weight
        network_alone = np.asarray(info.class_values)[predict_array(model, apply_normalization(
            image[None].astype(np.float32), info.normalization)).argmax(0)]
        assert not np.array_equal(network_alone, saved)

    segmentation = session.segment(more)
    assert set(np.unique(segmentation)) <= {1, 2, 3}
    assert unpainted_iou(segmentation, truth, more) > 0.4

    new_class = more.copy()
    new_class[0, 0, 0] = 4
    assert not session.train_round(new_class, 2.0).warm_start and session.class_values == [1, 2, 3, 4]
    session.close()


def test_the_loop_shows_the_forest_until_the_network_beats_it_on_held_out_painting(nuclei):
    """After one training step the network is far below the forest on the painted blocks held
    out of both models, so the blend the loop shows is (all but) the forest's alone: a weight
    that would let the network pull it down scores below the forest there and is not chosen."""
    image, truth = nuclei
    session = Session(image)
    painted = painted_from_truth(truth, (3, 3, 2))
    previews = []
    session.train_round(painted, 30.0, iterations=1, on_preview=previews.append, view_z=lambda: 15)
    evidence = session.forest.evidence["mean_iou"]
    assert evidence["network"] < evidence["forest"] - 0.1 and evidence["blend"] >= evidence["forest"]
    labels, _ = session.preview_volume()
    forest_alone = np.asarray(session.class_values)[session._forest_probabilities(session._everything()).argmax(0)]
    assert np.mean(labels == forest_alone) > 0.95
    session.close()


def test_the_background_filter_bank_gives_the_forest_what_region_by_region_gives():
    """The whole image's bank made when the session opens, and the bank made around each region
    (images too large for it), give the round's forest the same probabilities."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(20, 40, 36)).astype(np.float32)
    painted = np.zeros(image.shape, np.uint8)
    painted[5, :20], painted[5, 20:], painted[:, 10, :5] = 1, 2, 1
    session = Session(image)
    session.wait_for_features()
    assert session.features is not None
    session.train_round(painted, 5.0, iterations=1)
    box = (slice(3, 11), slice(0, 40), slice(4, 30))
    from_bank = session._forest_probabilities(box)
    session.features, session._forest_cache = None, {}
    np.testing.assert_allclose(session._forest_probabilities(box), from_bank, atol=1e-6)
    session.close()


class CountingArray:
    """An image that is not in memory as far as the session can tell (like a Dask or Zarr array),
    counting the voxels read from it."""

    def __init__(self, data: np.ndarray):
        self.data, self.shape, self.ndim, self.dtype, self.voxels_read = data, data.shape, data.ndim, data.dtype, 0

    def __getitem__(self, index):
        part = self.data[index]
        self.voxels_read += part.size
        return part


@pytest.mark.slow
def test_a_lazily_opened_volume_runs_box_by_box_and_segments_into_a_file_as_predict_does(tmp_path, nuclei,
                                                                                         monkeypatch):
    """A lazily opened image (Zarr through Dask, as napari opens a large OME-Zarr) is never held:
    the round trains on blocks around the painting with the forest fitted on their bank, the
    previews cover a bounded box around the view, whole-volume requests say what to do instead,
    and the volume is segmented tile by tile into a Zarr array exactly as `predict` segments it
    with the saved model."""
    import dask.array as da
    import zarr

    from unet3d.instances import KINDS, instances_from_probabilities
    from unet3d.interactive import large
    from unet3d.io import open_volume, write_volume
    from unet3d.model import load_predictor
    from unet3d.inference.predictor import predict_volume

    monkeypatch.setattr(large, "PREVIEW_PLANE", 32)
    image, truth = nuclei
    stored = zarr.open_array(str(tmp_path / "image.zarr"), mode="w", shape=image.shape, chunks=(8, 32, 32),
                             dtype=image.dtype)
    stored[:] = image
    session = Session(da.from_zarr(stored), seed=1)
    assert session.large and session.image is None and session.normalized is None
    painted = painted_from_truth(truth, (3, 3, 2))
    untrained = untrained_iou(Session(image), painted, truth)
    previews = []
    # 60 s: the blocks take their share (9 s), the steps bound the rest on a quiet machine.
    result = session.train_round(painted, 60.0, iterations=60, on_preview=previews.append, view_z=lambda: 15,
                                 view_yx=lambda: (30, 50))
    assert result.iterations > 0 and session.forest is not None
    assert session.forest.evidence["on"] == "painted blocks held out of both models"
    box = previews[0].box
    assert [b.stop - b.start for b in box] == [16, 32, 32] and box[0].start <= 15 < box[0].stop
    assert box[2].stop == image.shape[2] and all(p.labels.shape == (16, 32, 32) for p in previews)
    with pytest.raises(UserError, match="whole volume's probabilities in memory"):
        session.preview_volume()

    target = zarr.open_array(str(tmp_path / "segmentation.zarr"), mode="w", shape=image.shape, chunks=(8, 32, 32),
                             dtype=np.uint8)
    written = []
    session.segment_into(target, on_written=lambda done, total: written.append((done, total)))
    assert written[-1] == (image.size, image.size) and all(a[0] < b[0] for a, b in zip(written, written[1:]))
    segmentation = target[:]
    assert unpainted_iou(segmentation, truth, painted) > untrained + 0.1
    session.save(tmp_path / "m.safetensors")
    write_volume(str(tmp_path / "image.tif"), image)
    model, info, forest = load_predictor(tmp_path / "m.safetensors")
    predicted, probabilities = np.empty(image.shape, np.uint8), np.empty((3, *image.shape), np.float16)
    with open_volume(str(tmp_path / "image.tif")) as volume:
        predict_volume(model, info, volume, predicted, probabilities, forest=forest)
    np.testing.assert_array_equal(predicted, segmentation)
    # Objects: the probabilities tile by tile into a store, then block by block, as `unet3d instances`
    # cuts what `unet3d predict --probabilities` writes with the saved model.
    objects, count = session.objects_into(
        lambda dtype: zarr.open_array(str(tmp_path / "objects.zarr"), mode="w", shape=image.shape, chunks=(8, 32, 32),
                                      dtype=dtype), KINDS["nuclei"], 2, 3)
    expected = instances_from_probabilities(probabilities, [1, 2, 3], KINDS["nuclei"], 2, 3)
    assert type(objects).__module__.startswith("zarr") and count == expected.max() > 10
    np.testing.assert_array_equal(objects[:], expected)
    session.close()


def test_a_round_on_a_volume_run_box_by_box_reads_the_same_voxels_at_any_depth():
    """What a round reads of the image follows the painting, not the volume: the same painting
    in a stack 4 times deeper reads exactly as many voxels (the shallower stack is deep enough
    that no block or filter halo around the painting reaches its end)."""
    rng = np.random.default_rng(0)
    reads = []
    for depth in (96, 384):
        image = rng.normal(size=(depth, 48, 48)).astype(np.float32)
        painted = np.zeros(image.shape, np.uint8)
        painted[10, :24], painted[10, 24:], painted[:20, 20, :8] = 1, 2, 1
        source = CountingArray(image)
        session = Session(source)
        assert session.large
        source.voxels_read = 0  # the normalization's planes are read once, when the session opens
        session.train_round(painted, 1.0, iterations=2)  # a second: the blocks' minimum, whatever the clock
        reads.append(source.voxels_read)
        session.close()
    assert reads[0] == reads[1] and 0 < reads[0]


def test_the_preview_box_keeps_its_filter_bank_from_round_to_round(monkeypatch):
    """On a volume run box by box, the bank of the box in view is made once while the view stays:
    only the forest changes between rounds, and its probabilities there are what it gives region by
    region."""
    from unet3d.interactive import session as module

    rng = np.random.default_rng(1)
    image = rng.normal(size=(40, 48, 48)).astype(np.float32)
    painted = np.zeros(image.shape, np.uint8)
    painted[10, :24], painted[10, 24:], painted[:20, 20, :8] = 1, 2, 1
    session, made, previews = Session(CountingArray(image)), [], []
    real = module.region_bank
    monkeypatch.setattr(module, "region_bank", lambda *args, **kwargs: made.append(args[2]) or real(*args, **kwargs))
    for _ in range(2):
        session.train_round(painted, 1.0, iterations=1, on_preview=previews.append, view_z=lambda: 10)
    box = previews[-1].box
    assert made == [box] and len(previews) >= 2
    expected = session.forest.region_probabilities(session.source.read, session.shape)(box)
    np.testing.assert_allclose(session._forest_probabilities(box), expected, atol=1e-6)
    session.close()


def test_bad_input_is_one_line(nuclei):
    image, truth = nuclei
    session = Session(image)
    with pytest.raises(UserError, match="labels have shape"):
        session.train_round(np.zeros((3, 3, 3), np.uint8), 1.0)
    with pytest.raises(UserError, match="no network yet"):
        session.save("unused.safetensors")
    with pytest.raises(UserError, match="budget must be positive"):
        session.train_round(painted_from_truth(truth, (1, 1, 1)), 0)
