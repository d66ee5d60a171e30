import numpy as np
import pytest

from unet3d.data.labels import (
    UNLABELED,
    class_counts,
    class_values,
    class_weights,
    decode_labels,
    encode_labels,
    infer_class_values,
    present_values,
    value_indices,
)
from unet3d.data.sparse import sparsify
from unet3d.errors import UserError


@pytest.mark.parametrize(
    "num_classes, ignore_label, expected",
    [(3, 3, [0, 1, 2]), (2, 0, [1, 2]), (2, 255, [0, 1]), (3, 1, [0, 2, 3]), (2, -1, [0, 1])],
)
def test_class_values_are_the_first_non_negative_integers_other_than_the_ignore_label(num_classes, ignore_label, expected):
    assert class_values(num_classes, ignore_label) == expected


@pytest.mark.parametrize("values", [[0, 1, 2, 255], [-5, 0, 3], [70000, 2], [7]])
def test_present_values_agree_with_unique(values):
    rng = np.random.default_rng(0)
    labels = rng.choice(values, size=(4, 5, 6)).astype(np.int64)
    assert present_values(labels).tolist() == np.unique(labels).tolist()


@pytest.mark.parametrize("values", [[0, 1, 2, 255], [-5, 0, 3], [70000, 2], [7]])
def test_value_indices_find_each_voxels_value_or_minus_one(values):
    rng = np.random.default_rng(0)
    labels = rng.choice(values, size=(4, 5, 6)).astype(np.int64)
    known = sorted(values[1:] + [1000])  # the first value is missing from the known values
    expected = np.vectorize(lambda v: known.index(v) if v in known else -1)(labels)
    assert np.array_equal(value_indices(labels, known), expected)


def test_infer_class_values_on_the_papers_convention(nuclei):
    _, truth = nuclei
    sparse = sparsify(truth, (1, 1, 1), ignore_label=3)
    assert infer_class_values([sparse], ignore_label=3) == [0, 1, 2]
    assert infer_class_values([sparse], ignore_label=3, num_classes=3) == [0, 1, 2]


def test_infer_class_values_with_painting_convention(nuclei):
    _, truth = nuclei
    painted = sparsify(truth + 1, (2, 1, 1), ignore_label=0)  # classes 1, 2, 3; 0 = not painted
    assert infer_class_values([painted], ignore_label=0) == [1, 2, 3]


def test_a_value_outside_the_classes_is_an_error_naming_file_and_value(nuclei):
    _, truth = nuclei
    sparse = sparsify(truth, (1, 1, 1), ignore_label=255)
    with pytest.raises(UserError, match=r"^b\.tif: label value 2 is neither a class \(0, 1\) nor the ignore label 255$"):
        infer_class_values([sparse[:, :1, :1] * 0, sparse], 255, num_classes=2, sources=["a.tif", "b.tif"])


def test_labels_without_annotation_are_an_error(nuclei):
    _, truth = nuclei
    unpainted = np.full_like(truth, 3)
    with pytest.raises(UserError, match=r"^a\.tif, b\.tif: no annotated voxel \(every voxel has the ignore label 3\)"):
        infer_class_values([unpainted, unpainted[:4]], 3, sources=["a.tif", "b.tif"])


def test_a_class_without_any_annotated_voxel_is_an_error(nuclei):
    _, truth = nuclei
    sparse = sparsify(np.where(truth == 1, 0, truth), (1, 1, 1), ignore_label=3)  # values 0 and 2 only
    with pytest.raises(UserError, match="no annotated voxel of class 1 "):
        infer_class_values([sparse], 3, sources=["s.tif"])
    with pytest.raises(UserError, match="no annotated voxel of class 1, 4 "):
        infer_class_values([sparse], 3, num_classes=4, sources=["s.tif"])


def test_negative_values_other_than_the_ignore_label_are_an_error():
    labels = np.array([[[0, 1, -2, 255]]])
    with pytest.raises(UserError, match="x.tif: label value -2 is negative"):
        infer_class_values([labels], 255, sources=["x.tif"])


def test_encode_marks_exactly_the_unannotated_voxels_and_decodes_back(nuclei):
    _, truth = nuclei
    painted = sparsify(truth + 1, (1, 2, 1), ignore_label=0)
    classes = infer_class_values([painted], 0)
    encoded = encode_labels(painted, classes, 0)
    assert encoded.dtype == np.int8 and encoded.shape == truth.shape  # a byte a voxel for any volume size
    assert np.array_equal(encoded == UNLABELED, painted == 0)
    labeled = encoded >= 0
    assert np.array_equal(encoded[labeled], truth[labeled])
    decoded = decode_labels(encoded[labeled], classes)
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, painted[labeled])


def test_encode_names_the_first_unknown_value():
    labels = np.array([[[0, 1, 2, 3, 9, 7]]], dtype=np.uint8)
    with pytest.raises(UserError, match=r"^l\.tif: label value 7 is neither a class \(0, 1, 2\) nor the ignore label 3$"):
        encode_labels(labels, [0, 1, 2], 3, source="l.tif")


def test_decode_uses_the_smallest_unsigned_dtype():
    assert decode_labels(np.array([0, 1]), [0, 300]).dtype == np.uint16
    assert decode_labels(np.array([1, 0]), [1, 2]).tolist() == [2, 1]
    with pytest.raises(ValueError, match="class indices must lie in 0..1"):
        decode_labels(np.array([-1, 0]), [1, 2])


def test_class_counts_count_annotated_voxels_per_class(nuclei):
    _, truth = nuclei
    sparse = sparsify(truth, (1, 1, 1), ignore_label=3)
    encoded = [encode_labels(sparse, [0, 1, 2], 3), encode_labels(sparse[:5], [0, 1, 2], 3)]
    expected = [np.count_nonzero(sparse == v) + np.count_nonzero(sparse[:5] == v) for v in (0, 1, 2)]
    assert class_counts(encoded, 3).tolist() == expected


def test_class_weights_balance_classes_and_average_to_one_over_annotated_voxels():
    counts = np.array([900, 100, 0])
    inverse = class_weights(counts, "inverse")
    assert inverse[2] == 0 and inverse[0] * 900 == pytest.approx(inverse[1] * 100)
    root = class_weights(counts, "inverse_sqrt")
    assert root[1] / root[0] == pytest.approx(3.0)
    for weights in (inverse, root, class_weights(counts, "none"), class_weights(counts, manual=[1, 4, 2])):
        assert (weights * counts).sum() / counts.sum() == pytest.approx(1.0)
    assert class_weights(counts, "none")[:2].tolist() == [1.0, 1.0]
    assert class_weights(counts, manual=[1, 4, 2]).tolist() == pytest.approx([1 / 1.3, 4 / 1.3, 2 / 1.3])


@pytest.mark.parametrize("manual", [[1, 2], [1, -1, 1], [1, float("nan"), 1], [0, 0, 5]])
def test_unusable_manual_weights_are_a_user_error(manual):
    with pytest.raises(UserError, match="class weights"):
        class_weights(np.array([900, 100, 0]), manual=manual)


def test_a_wrong_ignore_label_gets_a_short_hint_naming_the_likely_one():
    """Labels whose unlabeled value is 255, read with --ignore-label 1: 252 classes seem to miss
    examples. The message stays one short line and names 255, which fills most of the volume."""
    sparse = np.full((8, 16, 16), 255, np.uint8)
    sparse[2] = np.arange(16)[:, None] % 3  # classes 0, 1, 2 on one slice
    with pytest.raises(UserError) as error:
        infer_class_values([sparse], 1, sources=["s.tif"])
    message = str(error.value)
    assert message.startswith("s.tif: no annotated voxel of class 3, 4, 5, … (246 more) …, 252, 253, 254 ")
    assert "4 distinct value(s), and 255 fills 88 % of the voxels" in message
    assert message.endswith("pass --ignore-label 255") and len(message) < 300 and "\n" not in message
