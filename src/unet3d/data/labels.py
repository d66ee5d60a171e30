"""Sparse label volumes: class values, the unlabeled value, and class indices for training.

A sparse label volume holds class values and one *ignore label* that marks unannotated voxels.
The ignore label is always given explicitly (0 when painting in napari or ilastik, 3 in the paper,
255, ...), so "unlabeled" is never confused with "background".

Class values rule: the classes are the first K non-negative integers other than the ignore label.
    ignore 3,   K 3 → classes 0, 1, 2        (the paper: 0, 1, 2 and 3 = unlabeled)
    ignore 0,   K 2 → classes 1, 2           (painting tools, 0 = not painted)
    ignore 255, K 2 → classes 0, 1
When K is not given it is inferred as the number of such integers up to the largest labeled value.
The network predicts class *indices* 0..K-1; `decode_labels` maps them back to class values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from unet3d.errors import UserError

UNLABELED = -1  # class index of unannotated voxels after encoding
WEIGHT_MODES = ("inverse_sqrt", "inverse", "none")


def class_values(num_classes: int, ignore_label: int) -> list[int]:
    """The first `num_classes` non-negative integers other than `ignore_label`."""
    if num_classes < 1:
        raise ValueError(f"the number of classes must be at least 1, got {num_classes}")
    values = [v for v in range(num_classes + 1) if v != ignore_label]
    return values[:num_classes]


def present_values(labels: np.ndarray) -> np.ndarray:
    """Sorted distinct values (int64) of an integer array."""
    return np.unique(_compact(np.asarray(labels))).astype(np.int64)


def value_indices(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Position of every voxel's value in the sorted `values` (intp), -1 where it is not one of them.

    Small non-negative labels use a lookup table, several times faster than a binary search on
    volumes of tens of millions of voxels.
    """
    labels, values = _compact(np.asarray(labels)), np.asarray(values, dtype=np.int64)
    if labels.dtype.kind == "u" and labels.dtype.itemsize <= 2:
        table = np.full(int(labels.max(initial=0)) + 1, -1, dtype=np.intp)
        inside = values[(values >= 0) & (values < table.size)]
        table[inside] = np.searchsorted(values, inside)
        return np.take(table, labels)
    position = np.searchsorted(values, labels).clip(0, max(values.size - 1, 0))
    found = values[position] == labels if values.size else np.zeros(labels.shape, dtype=bool)
    return np.where(found, position, UNLABELED)


def _compact(labels: np.ndarray) -> np.ndarray:
    """The same integers in the smallest dtype that holds them: sorting and indexing get faster."""
    if labels.size == 0 or labels.dtype.kind not in "iub":
        return labels
    smallest = np.result_type(np.min_scalar_type(int(labels.min())), np.min_scalar_type(int(labels.max())))
    return labels.astype(smallest, copy=False)


def infer_class_values(
    labels_list: Sequence[np.ndarray],
    ignore_label: int,
    num_classes: int | None = None,
    sources: Sequence[str] | None = None,
) -> list[int]:
    """Class values of a set of sparse label volumes (K given or inferred), checked against them.

    Every class must have at least one annotated voxel somewhere: a class without any example
    cannot be learned, and its absence usually means a wrong --ignore-label or --num-classes.
    """
    sources = list(sources) if sources is not None else [f"labels[{i}]" for i in range(len(labels_list))]
    present = {name: present_values(labels) for name, labels in zip(sources, labels_list)}
    labeled = {name: values[values != ignore_label] for name, values in present.items()}
    if not any(values.size for values in labeled.values()):
        raise UserError(f"{', '.join(sources)}: no annotated voxel (every voxel has the ignore label {ignore_label})")
    for name, values in labeled.items():
        if values.size and values[0] < 0:
            raise UserError(f"{name}: label value {values[0]} is negative and not the ignore label {ignore_label}")
    if num_classes is None:
        largest = max(int(values[-1]) for values in labeled.values() if values.size)
        num_classes = sum(1 for v in range(largest + 1) if v != ignore_label)
    classes = class_values(num_classes, ignore_label)
    for name, values in labeled.items():
        unknown = np.setdiff1d(values, classes)
        if unknown.size:
            raise UserError(_unknown_value_message(name, int(unknown[0]), classes, ignore_label))
    found = set(np.concatenate(list(labeled.values())).tolist())
    missing = [v for v in classes if v not in found]
    if missing:
        raise UserError(
            f"{', '.join(sources)}: no annotated voxel of class {_listing(missing)} "
            f"(classes {_listing(classes)}, ignore label {ignore_label}); {_ignore_label_hint(labels_list, ignore_label)}"
        )
    return classes


def check_painting_shape(image_shape, painting_shape, name: str, image_name: str) -> None:
    """One line naming the painting whose (Z, Y, X) shape is not that of its (C, Z, Y, X) image."""
    if tuple(image_shape[1:]) != tuple(painting_shape):
        raise UserError(f"{name}: shape {tuple(painting_shape)} differs from the shape {tuple(image_shape[1:])} "
                        f"of its image {image_name}")


def painted_classes(paintings: Sequence[np.ndarray], names: Sequence[str], ignore_label: int,
                    num_classes: int | None = None, classes: Sequence[int] | None = None) -> list[int]:
    """The class values of the paintings named `names` (`classes` when declared, else inferred),
    refused in one line naming the paintings when they give fewer than two: a segmentation needs
    the background annotated too."""
    if num_classes is not None and num_classes < 2:
        raise UserError(f"--num-classes {num_classes}: a segmentation needs at least two classes")
    if classes is None:
        classes = infer_class_values(paintings, ignore_label, num_classes, names)
    if len(classes) < 2:
        raise UserError(f"{', '.join(names)}: only one class ({classes[0]}) besides the ignore label "
                        f"{ignore_label}; a segmentation needs at least two (annotate the background too)")
    return list(classes)


_ENCODE_CHUNK = 1 << 24  # voxels encoded at a time


def encode_labels(
    labels: np.ndarray, class_values: Sequence[int], ignore_label: int, source: str = "labels"
) -> np.ndarray:
    """Class values → class indices 0..K-1, and UNLABELED (-1) where labels == ignore_label, in the
    smallest signed type that holds them (int8 below 128 classes: a volume of 10⁹ voxels keeps 1 GB
    of training labels, not the 8 GB of int64; patches are cast to int64 as they are cut)."""
    known = np.array(sorted([*class_values, ignore_label]), dtype=np.int64)
    dtype = np.min_scalar_type(-max(len(class_values), 1))
    code = np.array([UNLABELED if v == ignore_label else list(class_values).index(v) for v in known], dtype=dtype)
    labels = np.asarray(labels)
    encoded = np.empty(labels.shape, dtype)
    flat_labels, flat = labels.reshape(-1), encoded.reshape(-1)
    for start in range(0, flat.size, _ENCODE_CHUNK):  # the positions are intp: 8 bytes a voxel, a chunk at a time
        part = slice(start, start + _ENCODE_CHUNK)
        position = value_indices(flat_labels[part], known)
        if (position < 0).any():
            value = int(present_values(flat_labels[part][position < 0])[0])
            raise UserError(_unknown_value_message(source, value, class_values, ignore_label))
        flat[part] = np.take(code, position)
    return encoded


def decode_labels(indices: np.ndarray, class_values: Sequence[int]) -> np.ndarray:
    """Class indices → class values, in the smallest unsigned dtype that holds them (uint8 usually)."""
    values = np.asarray(class_values)
    indices = np.asarray(indices)
    if indices.size and (indices.min() < 0 or indices.max() >= values.size):
        raise ValueError(f"class indices must lie in 0..{values.size - 1}, got {indices.min()}..{indices.max()}")
    return values.astype(np.min_scalar_type(int(values.max())))[indices]


def class_counts(encoded_list: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Annotated voxels per class (int64, length K) over encoded volumes; unlabeled voxels not counted."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for encoded in encoded_list:
        labeled = encoded[encoded >= 0]
        counts += np.bincount(labeled.ravel(), minlength=num_classes)[:num_classes]
    return counts


def class_weights(counts, mode: str = "inverse_sqrt", manual: Sequence[float] | None = None) -> np.ndarray:
    """Per-class loss weights (float64, length K) that balance frequent and rare classes.

    inverse_sqrt: 1/sqrt(count), a moderate rebalancing; inverse: 1/count, every class then weighs
    as much as any other in total; none: all 1. `manual` weights (one per class, ≥ 0) replace the
    mode. Weights are scaled so that their mean over the annotated voxels is 1 — the scale does not
    change the weighted cross-entropy (it divides by the summed weights), it only makes weights
    readable. A class with no annotated voxel gets weight 0: it has no voxel to weigh.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if manual is not None:
        weights = _manual_weights(manual, counts.size)
    elif mode not in WEIGHT_MODES:
        raise ValueError(f"class weight mode must be one of {WEIGHT_MODES}, got {mode!r}")
    else:
        exponent = {"inverse_sqrt": 0.5, "inverse": 1.0, "none": 0.0}[mode]
        weights = np.zeros_like(counts)
        present = counts > 0
        weights[present] = counts[present] ** -exponent
    total = float((counts * weights).sum())
    if total <= 0:
        raise UserError("class weights: the annotated voxels have a total weight of 0; give some class a positive weight")
    return weights * (counts.sum() / total)


def _manual_weights(manual: Sequence[float], num_classes: int) -> np.ndarray:
    weights = np.asarray(manual, dtype=np.float64)
    if weights.shape != (num_classes,) or not np.isfinite(weights).all() or (weights < 0).any():
        raise UserError(f"class weights {list(manual)}: expected {num_classes} finite non-negative numbers, one per class")
    return weights


def _listing(values: Sequence[int], most: int = 6) -> str:
    """Values separated by commas; a long run shows its first and last few only."""
    values = [str(v) for v in values]
    if len(values) > most:
        values = [*values[: most // 2], f"… ({len(values) - most} more) …", *values[-(most // 2):]]
    return ", ".join(values)


def _ignore_label_hint(labels_list: Sequence[np.ndarray], ignore_label: int) -> str:
    """What the label values say about the ignore label: how many there are, and which fills most voxels."""
    counts: dict[int, int] = {}
    for labels in labels_list:
        values, numbers = np.unique(_compact(np.asarray(labels)), return_counts=True)
        for value, number in zip(values.tolist(), numbers.tolist()):
            counts[value] = counts.get(value, 0) + number
    commonest = max(counts, key=counts.get)
    share = 100 * counts[commonest] / sum(counts.values())
    if commonest == ignore_label:
        return (f"the labels hold {len(counts)} distinct value(s); a class without examples cannot be learned: "
                "check --num-classes, or annotate that class")
    return (f"the labels hold {len(counts)} distinct value(s), and {commonest} fills {share:.0f} % of the voxels: "
            f"if that is the unlabeled value, pass --ignore-label {commonest}")


def _unknown_value_message(source: str, value: int, classes: Sequence[int], ignore_label: int) -> str:
    return f"{source}: label value {value} is neither a class ({_listing(classes)}) nor the ignore label {ignore_label}"
