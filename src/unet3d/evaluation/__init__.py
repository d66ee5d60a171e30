"""Segmentation quality: confusion matrices, IoU and Dice per class, the paper's masked IoU."""

from unet3d.evaluation.metrics import confusion_matrix, evaluate_volumes, scores

__all__ = ["confusion_matrix", "evaluate_volumes", "scores"]
