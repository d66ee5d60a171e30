"""Object-level scores of instance labels: predicted and true objects matched one to one by IoU.

As in the StarDist and Cellpose papers: a predicted object and a true one match when their IoU
reaches the threshold (0.5, 0.75), each object in at most one match, the matching that pairs the
most objects (then the highest total IoU); then precision TP/(TP+FP), recall TP/(TP+FN), F1 and
average precision AP = TP/(TP+FP+FN). Label 0 is no object in both volumes; other values are
object ids, compared as sets of voxels (an id need not be connected).

With a mask (the voxels nobody annotated) both volumes are cut to it first: objects are the parts
of them inside the mask, and an object wholly outside it does not count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

THRESHOLDS = (0.5, 0.75)


def overlap_table(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(truth object index, predicted object index, IoU) of every overlapping pair, and the number
    of true and predicted objects as (n_truth, n_pred) in the last array."""
    truth_ids, truth_index = np.unique(truth, return_inverse=True)
    pred_ids, pred_index = np.unique(prediction, return_inverse=True)
    truth_index, pred_index = truth_index.ravel(), pred_index.ravel()
    truth_size = np.bincount(truth_index, minlength=truth_ids.size)
    pred_size = np.bincount(pred_index, minlength=pred_ids.size)
    pairs, shared = np.unique(truth_index.astype(np.int64) * pred_ids.size + pred_index, return_counts=True)
    t, p = np.divmod(pairs, pred_ids.size)
    objects = (truth_ids[t] != 0) & (pred_ids[p] != 0)
    t, p, shared = t[objects], p[objects], shared[objects]
    iou = shared / (truth_size[t] + pred_size[p] - shared)
    # Object indices counted from 0 among the non-zero ids.
    t_shift, p_shift = int(truth_ids[0] == 0), int(pred_ids[0] == 0)
    counts = np.array([truth_ids.size - t_shift, pred_ids.size - p_shift])
    return t - t_shift, p - p_shift, iou, counts


def matched_pairs(t: np.ndarray, p: np.ndarray, iou: np.ndarray, threshold: float) -> np.ndarray:
    """IoUs of the one-to-one matches at `threshold`: the most matches, then the highest total IoU."""
    keep = iou >= threshold
    t, p, iou = t[keep], p[keep], iou[keep]
    if iou.size == 0:
        return iou
    rows, t = np.unique(t, return_inverse=True)
    columns, p = np.unique(p, return_inverse=True)
    weight = np.zeros((rows.size, columns.size))
    weight[t, p] = min(rows.size, columns.size) + 1 + iou  # one more match outweighs any IoU total
    chosen_t, chosen_p = linear_sum_assignment(weight, maximize=True)
    matched = weight[chosen_t, chosen_p] > 0
    return weight[chosen_t, chosen_p][matched] - min(rows.size, columns.size) - 1


def match_instances(prediction: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None,
                    thresholds: Sequence[float] = THRESHOLDS) -> dict:
    """Object counts and per-threshold TP, FP, FN, precision, recall, F1, AP and mean matched IoU
    (None where a ratio is 0/0, as JSON has no NaN)."""
    prediction, truth = np.asarray(prediction), np.asarray(truth)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from truth shape {truth.shape}")
    if mask is not None:
        prediction, truth = prediction[mask], truth[mask]
    t, p, iou, (n_truth, n_pred) = overlap_table(prediction, truth)
    return {"truth_objects": int(n_truth), "predicted_objects": int(n_pred), "voxels": int(truth.size),
            "thresholds": [_scores(matched_pairs(t, p, iou, th), th, n_truth, n_pred) for th in thresholds]}


def _scores(matched: np.ndarray, threshold: float, n_truth: int, n_pred: int) -> dict:
    tp = int(matched.size)
    fp, fn = int(n_pred) - tp, int(n_truth) - tp
    return {"threshold": float(threshold), "tp": tp, "fp": fp, "fn": fn,
            "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "ap": _ratio(tp, tp + fp + fn), "mean_matched_iou": float(matched.mean()) if tp else None}


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None
