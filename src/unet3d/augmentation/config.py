"""The ranges every random augmentation draws from; stored in model files so training is reproducible."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

_RANGES = ("scale", "intensity_scale", "intensity_shift", "gamma")


@dataclass(frozen=True)
class AugmentationConfig:
    """Ranges of the on-the-fly augmentation (defaults follow the paper where it gives numbers).

    Spatial (one transform for image and labels, centred on the patch centre):
      rotation_deg      max |angle| about each axis, degrees, drawn uniformly (rotation happens in
                        physical space, so anisotropic voxels are respected)
      scale             range of one zoom factor (> 1 magnifies), drawn uniformly
      elastic_spacing   control-point spacing of the smooth deformation, in voxels of the finest axis
      elastic_sigma     std of the control-point displacements, in voxels of the finest axis (0: off)
      flip              mirror each axis with probability 1/2
      anisotropy_threshold
                        an axis whose spacing exceeds this many times the finest spacing is left
                        undeformed (no rotation out of the plane, no zoom, no elastic motion along
                        it; flips only): resampling between thick sections would smear them. For EM
                        with 10x coarser z this means in-plane rotation about z only.
    Gray values (per channel, after the spatial transform):
      gamma             range of the exponent applied to the patch's min-max range, drawn log-uniformly
      intensity_scale   range of the contrast factor (slope), drawn uniformly
      intensity_shift   range of the brightness offset, in normalized intensity units, drawn uniformly
    A range (a, a) switches that augmentation off.
    """

    enabled: bool = True
    rotation_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    elastic_spacing: float = 32.0
    elastic_sigma: float = 4.0
    flip: bool = True
    anisotropy_threshold: float = 3.0
    gamma: tuple[float, float] = (0.7, 1.5)
    intensity_scale: tuple[float, float] = (0.7, 1.3)
    intensity_shift: tuple[float, float] = (-0.1, 0.1)

    def __post_init__(self):
        for name in _RANGES:
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(low, high)}")
        checks = [
            (0 <= self.rotation_deg <= 180, "rotation_deg must be between 0 and 180"),
            (self.scale[0] > 0, "scale factors must be positive"),
            (self.gamma[0] > 0, "gamma must be positive"),
            (self.elastic_spacing > 0, "elastic_spacing must be positive"),
            (self.elastic_sigma >= 0, "elastic_sigma must not be negative"),
            (self.anisotropy_threshold >= 1, "anisotropy_threshold must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_dict(cls, values: dict) -> "AugmentationConfig":
        """Inverse of to_dict; JSON lists become tuples, unknown keys (newer files) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if k in _RANGES else v for k, v in values.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)
