"""Intensity normalization fitted on the training images and stored with the model.

Fitting once on the training data (not per tile or per test volume) keeps tiles of one volume
consistent with each other and makes prediction on a new volume use the training statistics.
"""

from __future__ import annotations

import numpy as np

METHODS = ("zscore", "percentile", "none")
_SAMPLE = 2_000_000  # voxels per channel used for fitting; plenty for stable statistics


def fit_normalization(images, method: str = "zscore", percentiles=(1.0, 99.8), seed: int = 0) -> dict:
    """Fit per-channel statistics on a list of (C, Z, Y, X) arrays (all with the same C).

    zscore:     (x - mean) / std
    percentile: (x - p_low) / (p_high - p_low), so the bulk of intensities lands in [0, 1];
                robust to a few saturated voxels, the usual choice for microscopy.
    """
    if method not in METHODS:
        raise ValueError(f"normalization must be one of {METHODS}, got {method!r}")
    channels = images[0].shape[0]
    spec = {"method": method, "channels": channels}
    if method == "none":
        return spec
    rng = np.random.default_rng(seed)
    samples = [_sample_channels(image, rng) for image in images]
    values = np.concatenate(samples, axis=1)  # (C, n)
    if method == "zscore":
        spec["offset"] = values.mean(axis=1).tolist()
        spec["scale"] = np.maximum(values.std(axis=1), 1e-8).tolist()
    else:
        low, high = np.percentile(values, percentiles, axis=1)
        spec["offset"] = low.tolist()
        spec["scale"] = np.maximum(high - low, 1e-8).tolist()
        spec["percentiles"] = list(percentiles)
    return spec


def _sample_channels(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    flat = image.reshape(image.shape[0], -1)
    if flat.shape[1] > _SAMPLE:
        flat = flat[:, rng.choice(flat.shape[1], _SAMPLE, replace=False)]
    return flat.astype(np.float64)


def apply_normalization(image: np.ndarray, spec: dict) -> np.ndarray:
    """Normalize a (C, Z, Y, X) array (or a region of one) with fitted statistics → float32."""
    if image.shape[0] != spec["channels"]:
        raise ValueError(f"image has {image.shape[0]} channel(s), the normalization was fitted on {spec['channels']}")
    image = np.asarray(image, dtype=np.float32)
    if spec["method"] == "none":
        return image
    shape = (-1,) + (1,) * (image.ndim - 1)
    offset = np.asarray(spec["offset"], dtype=np.float32).reshape(shape)
    scale = np.asarray(spec["scale"], dtype=np.float32).reshape(shape)
    return (image - offset) / scale
