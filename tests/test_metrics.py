import json

import numpy as np
import pytest

from unet3d.data.sparse import sparsify
from unet3d.evaluation import confusion_matrix, evaluate_volumes, scores
from unet3d.evaluation import metrics

TRUTH = np.array([0, 0, 1, 1, 2, 2]).reshape(1, 2, 3)
PRED = np.array([0, 1, 1, 1, 0, 0]).reshape(1, 2, 3)


def by_value(result):
    return {c["value"]: c for c in result["classes"]}


def test_confusion_matrix_rows_are_truth_columns_are_prediction():
    expected = [[1, 1, 0], [0, 2, 0], [2, 0, 0]]
    assert confusion_matrix(PRED, TRUTH, 3).tolist() == expected
    mask = np.array([1, 1, 1, 0, 0, 1], dtype=bool).reshape(TRUTH.shape)
    assert confusion_matrix(PRED, TRUTH, 3, mask=mask).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
    assert confusion_matrix(PRED, TRUTH, 3).dtype == np.int64


def test_confusion_matrix_refuses_indices_out_of_range():
    with pytest.raises(ValueError, match="class indices must lie in 0..1"):
        confusion_matrix(PRED, TRUTH, 2)


def test_iou_and_dice_by_hand_including_a_class_never_predicted():
    result = evaluate_volumes(PRED, TRUTH)
    classes = by_value(result)
    assert classes[0]["iou"] == pytest.approx(1 / 4) and classes[0]["dice"] == pytest.approx(2 / 5)
    assert classes[1]["iou"] == pytest.approx(2 / 3) and classes[1]["dice"] == pytest.approx(4 / 5)
    assert classes[2]["iou"] == 0 and classes[2]["dice"] == 0  # in the truth, never predicted
    assert classes[2]["truth_voxels"] == 2 and classes[2]["predicted_voxels"] == 0
    assert result["mean_iou"] == pytest.approx((1 / 4 + 2 / 3 + 0) / 3)
    assert result["mean_iou_foreground"] == pytest.approx((2 / 3 + 0) / 2)
    assert result["mean_dice"] == pytest.approx((2 / 5 + 4 / 5 + 0) / 3)
    assert result["accuracy"] == pytest.approx(3 / 6) and result["voxels"] == 6


def test_a_class_absent_from_truth_and_prediction_has_no_score_and_is_left_out():
    confusion = np.zeros((4, 4), dtype=np.int64)
    confusion[:3, :3] = confusion_matrix(PRED, TRUTH, 3)
    result = scores(confusion, class_values=[0, 1, 2, 5])
    assert by_value(result)[5]["iou"] is None and by_value(result)[5]["dice"] is None
    assert result["mean_iou"] == pytest.approx((1 / 4 + 2 / 3) / 3)
    json.dumps(result)  # None instead of NaN keeps the result valid JSON


def test_a_predicted_value_missing_from_the_truth_is_a_class_with_iou_zero():
    pred = np.where(PRED == 0, 7, PRED)
    classes = by_value(evaluate_volumes(pred, TRUTH))
    assert sorted(classes) == [0, 1, 2, 7]
    assert classes[7]["iou"] == 0 and classes[0]["iou"] == 0


def test_background_is_a_parameter():
    result = evaluate_volumes(PRED, TRUTH, background=2)
    assert result["mean_iou_foreground"] == pytest.approx((1 / 4 + 2 / 3) / 2)
    assert evaluate_volumes(PRED, TRUTH, background=None)["mean_iou_foreground"] == pytest.approx(
        evaluate_volumes(PRED, TRUTH)["mean_iou"]
    )


def test_exclude_evaluates_only_the_unannotated_voxels_by_hand():
    sparse = np.array([0, 3, 3, 1, 3, 2]).reshape(TRUTH.shape)  # voxels 0, 3, 5 annotated
    result = evaluate_volumes(PRED, TRUTH, exclude=sparse, ignore_label=3)
    classes = by_value(result)  # evaluated: truth 0, 1, 2 vs prediction 1, 1, 0
    assert [classes[v]["iou"] for v in (0, 1, 2)] == pytest.approx([0, 1 / 2, 0])
    assert result["voxels"] == 3 and result["mean_iou"] == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="needs its ignore label"):
        evaluate_volumes(PRED, TRUTH, exclude=sparse)


def test_matches_set_based_iou_on_a_real_volume_in_small_chunks(nuclei, monkeypatch):
    _, truth = nuclei
    prediction = np.roll(truth, 1, axis=2)  # a segmentation off by one voxel
    sparse = sparsify(truth, (1, 1, 1), ignore_label=255)
    monkeypatch.setattr(metrics, "_CHUNK", 1000)  # exercise the chunked counting
    result = evaluate_volumes(prediction, truth, exclude=sparse, ignore_label=255)
    unannotated = sparse == 255
    for value, entry in by_value(result).items():
        t, p = (truth == value) & unannotated, (prediction == value) & unannotated
        assert entry["iou"] == pytest.approx(np.count_nonzero(t & p) / np.count_nonzero(t | p))
        assert entry["dice"] == pytest.approx(2 * np.count_nonzero(t & p) / (t.sum() + p.sum()))
    assert result["voxels"] == np.count_nonzero(unannotated)
    assert 0.3 < result["mean_iou_foreground"] < result["mean_iou"] < 1


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="differs from truth shape"):
        evaluate_volumes(PRED[:, :1], TRUTH)
