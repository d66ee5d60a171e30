"""Scores as the text tables `unet3d evaluate`, densify and demo print."""

from __future__ import annotations


def score_table(result: dict, where: str = "") -> str:
    """The per-class IoU/Dice table printed by evaluate, densify and demo."""
    lines = [f"{'class':>8} {'IoU':>7} {'Dice':>7} {'truth voxels':>14} {'predicted voxels':>17}"]
    for entry in result["classes"]:
        lines.append(f"{entry['value']:>8} {_score(entry['iou']):>7} {_score(entry['dice']):>7} "
                     f"{entry['truth_voxels']:>14,} {entry['predicted_voxels']:>17,}")
    values = [entry["value"] for entry in result["classes"]]
    foreground = [v for v in values if v != result["background"]]
    lines.append(f"mean IoU, all classes ({_listing(values)}): {_score(result['mean_iou'])}")
    lines.append(f"mean IoU, foreground classes ({_listing(foreground)}): {_score(result['mean_iou_foreground'])}")
    lines.append(f"mean Dice, all classes: {_score(result['mean_dice'])}; foreground classes: {_score(result['mean_dice_foreground'])}")
    lines.append(f"evaluated voxels: {result['voxels']:,}{where}")
    return "\n".join(lines)


def instance_table(result: dict, where: str = "") -> str:
    """The object matching table printed by `evaluate --instances`: one row per IoU threshold."""
    lines = [f"{'IoU >=':>7} {'TP':>6} {'FP':>6} {'FN':>6} {'precision':>10} {'recall':>7} {'F1':>7} {'AP':>7} "
             f"{'matched IoU':>12}"]
    for row in result["thresholds"]:
        lines.append(f"{row['threshold']:>7.2f} {row['tp']:>6} {row['fp']:>6} {row['fn']:>6} {_score(row['precision']):>10} "
                     f"{_score(row['recall']):>7} {_score(row['f1']):>7} {_score(row['ap']):>7} "
                     f"{_score(row['mean_matched_iou']):>12}")
    lines.append(f"objects: {result['truth_objects']:,} in the truth, {result['predicted_objects']:,} predicted; "
                 f"AP = TP/(TP+FP+FN)")
    lines.append(f"evaluated voxels: {result['voxels']:,}{where}")
    return "\n".join(lines)


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _listing(values) -> str:
    return ", ".join(map(str, values)) or "none"
