"""IoU and Dice per class from a confusion matrix, and the evaluation of a predicted volume.

The paper's measure for learning from sparse annotation is the IoU on the voxels that were *not*
annotated: `evaluate_volumes(..., exclude=sparse_labels, ignore_label=N)` evaluates exactly the
voxels where the sparse label volume holds the ignore label.

A class that appears neither in the truth nor in the prediction (of the evaluated voxels) has no
IoU or Dice (None: 0/0, and JSON has no NaN) and is left out of the means; a class present in the
truth but never predicted has IoU 0 and counts in the means.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from unet3d.data.labels import present_values, value_indices

_CHUNK = 1 << 22  # voxels per bincount call, so large volumes need little temporary memory


def confusion_matrix(pred, truth, num_classes: int, mask=None) -> np.ndarray:
    """(K, K) int64 counts, rows = true class index, columns = predicted class index.

    pred and truth hold class indices 0..K-1; `mask` (bool, same shape) selects the voxels counted.
    """
    pred, truth = np.asarray(pred).ravel(), np.asarray(truth).ravel()
    if pred.shape != truth.shape:
        raise ValueError(f"prediction has {pred.size} voxels, truth {truth.size}")
    keep = None if mask is None else np.asarray(mask, dtype=bool).ravel()
    counts = np.zeros(num_classes * num_classes, dtype=np.int64)
    for start in range(0, truth.size, _CHUNK):
        part = slice(start, start + _CHUNK)
        t, p = truth[part].astype(np.int64), pred[part].astype(np.int64)
        if keep is not None:
            t, p = t[keep[part]], p[keep[part]]
        if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
            raise ValueError(f"class indices must lie in 0..{num_classes - 1}")
        counts += np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def scores(confusion: np.ndarray, class_values: Sequence[int] | None = None, background: int | None = 0) -> dict:
    """Per-class IoU and Dice, and mean IoU / Dice over all classes and over foreground classes.

    `class_values` names the rows (default 0..K-1); foreground = every class except the
    `background` value (None: all classes are foreground).
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    values = list(range(confusion.shape[0])) if class_values is None else [int(v) for v in class_values]
    true_positives = np.diag(confusion)
    truth_voxels, predicted_voxels = confusion.sum(axis=1), confusion.sum(axis=0)
    classes = []
    for value, tp, n_truth, n_pred in zip(values, true_positives, truth_voxels, predicted_voxels):
        union = int(n_truth + n_pred - tp)
        classes.append({
            "value": value,
            "iou": float(tp / union) if union else None,
            "dice": float(2 * tp / (n_truth + n_pred)) if union else None,
            "truth_voxels": int(n_truth),
            "predicted_voxels": int(n_pred),
        })
    foreground = [c for c in classes if c["value"] != background]
    return {
        "classes": classes,
        "mean_iou": _mean(classes, "iou"),
        "mean_dice": _mean(classes, "dice"),
        "mean_iou_foreground": _mean(foreground, "iou"),
        "mean_dice_foreground": _mean(foreground, "dice"),
        "background": background,
        "voxels": int(confusion.sum()),
        "accuracy": float(true_positives.sum() / confusion.sum()) if confusion.sum() else None,
    }


def _mean(classes: list[dict], key: str) -> float | None:
    defined = [float(c[key]) for c in classes if c[key] is not None]
    return float(np.mean(defined)) if defined else None


def evaluate_volumes(
    prediction: np.ndarray,
    truth: np.ndarray,
    exclude: np.ndarray | None = None,
    ignore_label: int | None = None,
    background: int | None = 0,
) -> dict:
    """Scores of a predicted label volume against a dense truth, both holding label values.

    The classes are the values found in the truth or the prediction at the evaluated voxels.
    With `exclude` (the sparse label volume the network was trained on) only the voxels where
    exclude == ignore_label — those nobody annotated — are evaluated: the paper's protocol.
    """
    prediction, truth = np.asarray(prediction), np.asarray(truth)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from truth shape {truth.shape}")
    mask = _unannotated(exclude, ignore_label, truth.shape)
    if mask is not None:
        prediction, truth = prediction[mask], truth[mask]
    values = np.union1d(present_values(truth), present_values(prediction))
    confusion = confusion_matrix(value_indices(prediction, values), value_indices(truth, values), values.size)
    return scores(confusion, values.tolist(), background)


def _unannotated(exclude, ignore_label, shape) -> np.ndarray | None:
    if exclude is None:
        return None
    if ignore_label is None:
        raise ValueError("evaluating with an exclusion volume needs its ignore label")
    exclude = np.asarray(exclude)
    if exclude.shape != shape:
        raise ValueError(f"exclusion volume shape {exclude.shape} differs from truth shape {shape}")
    return exclude == ignore_label
