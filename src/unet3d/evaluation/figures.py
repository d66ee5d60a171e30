"""Pictures that say more than numbers: slices of a volume with a segmentation overlaid."""

from __future__ import annotations

import numpy as np

from unet3d.atomic import atomic_path

_COLORS = np.array([
    [0.0, 0.0, 0.0], [0.95, 0.3, 0.2], [0.2, 0.7, 0.95], [0.95, 0.8, 0.1], [0.4, 0.9, 0.3],
    [0.8, 0.35, 0.9], [1.0, 0.55, 0.1], [0.3, 0.3, 0.95], [0.6, 0.6, 0.6],
])


def gray_plane(plane: np.ndarray) -> np.ndarray:
    """A plane scaled to 0..1 between its 1st and 99.5th percentiles (outliers do not wash it out)."""
    low, high = np.percentile(plane, (1, 99.5))
    return np.clip((plane - low) / max(high - low, 1e-9), 0, 1)


def overlay_rgb(gray: np.ndarray, labels: np.ndarray, class_values, alpha: float) -> np.ndarray:
    """RGB of a gray plane with every class but the first tinted in its colour."""
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    for index, value in enumerate(class_values):
        if index == 0:  # the first class (background, usually) stays unpainted
            continue
        mask = labels == value
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * _COLORS[1 + (index - 1) % (len(_COLORS) - 1)]
    return rgb


def image_plane(image, axis: int, position: int) -> np.ndarray:
    """The first channel's plane at `position` along spatial `axis` of a (C, Z, Y, X) or (Z, Y, X)
    array, or of an opened image or label volume (that plane alone read)."""
    if hasattr(image, "read"):
        box = [slice(None)] * 3
        box[axis] = slice(position, position + 1)
        plane = image.read(tuple(box))
        return np.take(plane[0] if plane.ndim == 4 else plane, 0, axis=axis)
    return np.take(image[0] if image.ndim == 4 else image, position, axis=axis)


def overlay_figure(path, image: np.ndarray, segmentation: np.ndarray, class_values, *, title: str = "",
                   positions=None, alpha: float = 0.45) -> None:
    """PNG of the middle (or given) slice along each axis: image, and image with the segmentation.

    image: (C, Z, Y, X) or (Z, Y, X) — the first channel is shown —, or an opened volume (only the
    three planes are read); segmentation: (Z, Y, X) values, or an opened label volume.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    positions = positions or [n // 2 for n in segmentation.shape[-3:]]
    names = ("Z", "Y", "X")
    fig, axes = plt.subplots(2, 3, figsize=(12, 7), dpi=100, squeeze=False)
    for axis, position in enumerate(positions):
        plane = image_plane(image, axis, position).astype(np.float32)
        labels = image_plane(segmentation, axis, position)
        gray = gray_plane(plane)
        axes[0, axis].imshow(gray, cmap="gray", interpolation="nearest")
        axes[0, axis].set_title(f"image, {names[axis]} = {position}")
        axes[1, axis].imshow(overlay_rgb(gray, labels, class_values, alpha), interpolation="nearest")
        axes[1, axis].set_title(f"segmentation, {names[axis]} = {position}")
        for row in axes[:, axis]:
            row.set_axis_off()
    handles = [Patch(color=_COLORS[1 + (i - 1) % (len(_COLORS) - 1)], label=f"class {v}")
               for i, v in enumerate(class_values) if i > 0]
    fig.legend(handles=handles, loc="lower center", ncol=max(1, len(handles)), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
