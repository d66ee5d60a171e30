"""Segmentation quality: confusion matrices, IoU and Dice per class, the paper's masked IoU, and
object matching of instance labels."""

from unet3d.evaluation.matching import match_instances
from unet3d.evaluation.metrics import confusion_matrix, evaluate_volumes, scores

__all__ = ["confusion_matrix", "evaluate_volumes", "match_instances", "scores"]
