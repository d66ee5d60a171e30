"""The pixel classifier biologists use instead of a network: the baseline densification must beat."""

from unet3d.data.features import DEFAULT_SCALES, ILASTIK_SCALES, feature_names, filter_features
from unet3d.baselines.forest import ForestResult, random_forest_segment

__all__ = ["DEFAULT_SCALES", "ILASTIK_SCALES", "ForestResult", "feature_names", "filter_features", "random_forest_segment"]
