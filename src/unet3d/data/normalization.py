"""Intensity normalization fitted on the training images and stored with the model.

Fitting once on the training data (not per tile or per test volume) keeps tiles of one volume
consistent with each other and makes prediction on a new volume use the training statistics.
Volumes whose intensity scale differs from scan to scan (MRI) are normalized each on its own
statistics instead (`per_volume`), in training and at prediction: one z-score over differently
scaled MRI volumes left a network trained on 250 of them predicting background everywhere.
"""

from __future__ import annotations

import numpy as np

METHODS = ("zscore", "percentile", "none")
_SAMPLE = 2_000_000  # voxels per channel used for fitting; plenty for stable statistics
_PLANES = 32  # z-planes read to fit a per-volume normalization on a volume read region by region
PERCENTILES = (1.0, 99.8)


def fit_normalization(images, method: str = "zscore", percentiles=PERCENTILES, seed: int = 0,
                      per_volume: bool = False) -> dict:
    """Fit per-channel statistics on a list of (C, Z, Y, X) arrays (all with the same C).

    zscore:     (x - mean) / std
    percentile: (x - p_low) / (p_high - p_low), so the bulk of intensities lands in [0, 1];
                robust to a few saturated voxels, the usual choice for microscopy.
    per_volume: no statistics here; each volume is fitted on its own when it is normalized.
    """
    if method not in METHODS:
        raise ValueError(f"normalization must be one of {METHODS}, got {method!r}")
    channels = images[0].shape[0]
    spec = {"method": method, "channels": channels}
    if method == "none":
        return spec
    if per_volume:
        return {**spec, "per_volume": True, **({"percentiles": list(percentiles)} if method == "percentile" else {})}
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


def for_volume(spec: dict, read, shape) -> dict:
    """`spec` with statistics for one volume: a per-volume spec fitted on up to _PLANES z-planes
    spread over it (`read(region)` → (C, z, Y, X), `shape` (Z, Y, X)); a fitted spec as it is."""
    if not spec.get("per_volume"):
        return spec
    planes = np.unique(np.linspace(0, shape[0] - 1, min(_PLANES, shape[0])).round().astype(int))
    sample = np.concatenate([read((slice(z, z + 1), slice(None), slice(None))) for z in planes], axis=1)
    return _fitted(spec, sample)


def _fitted(spec: dict, image: np.ndarray) -> dict:
    """A per-volume spec's statistics fitted on `image` (all of a volume, or a sample of it)."""
    return fit_normalization([image], spec["method"], spec.get("percentiles", PERCENTILES))


def apply_normalization(image: np.ndarray, spec: dict) -> np.ndarray:
    """Normalize a (C, Z, Y, X) array (or a region of one) with fitted statistics → float32. A
    per-volume spec is fitted on `image` here, so it must be the whole volume (else `for_volume`)."""
    if image.shape[0] != spec["channels"]:
        raise ValueError(f"image has {image.shape[0]} channel(s), the normalization was fitted on {spec['channels']}")
    if spec.get("per_volume"):
        spec = _fitted(spec, image)
    if spec["method"] == "none":
        return np.asarray(image, dtype=np.float32)
    shape = (-1,) + (1,) * (image.ndim - 1)
    out = image.astype(np.float32)  # a copy, normalized in place: 4 bytes a voxel, no temporaries
    out -= np.asarray(spec["offset"], dtype=np.float32).reshape(shape)
    out /= np.asarray(spec["scale"], dtype=np.float32).reshape(shape)
    return out
