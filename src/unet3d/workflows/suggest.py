"""`unet3d suggest`: the model that judges the slices (a model file, or the napari loop's network
and forest trained now on the annotated voxels, blended as `predict` blends them), its ranking of
the slices not yet annotated, and a picture of the best."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unet3d.errors import UserError
from unet3d.evaluation.figures import gray_plane, overlay_rgb
from unet3d.inference.predictor import normalized_entropy, predict_image
from unet3d.interactive.session import UNPAINTED, Session
from unet3d.interactive.suggest import AXIS_NAMES, DEFAULT_STRATEGY, Suggestion, candidate_slices, rank_slices
from unet3d.model import load_predictor
from unet3d.atomic import atomic_path


@dataclass
class SuggestResult:
    suggestions: list[Suggestion]  # best first
    labels: np.ndarray  # (Z, Y, X) the judging network's segmentation, label values
    uncertainty: np.ndarray  # (Z, Y, X) normalized entropy, 0..1
    class_values: list[int]
    network: str  # where the judging network came from

    def to_dict(self) -> dict:
        return {"network": self.network, "suggestions": [
            {"axis": AXIS_NAMES[s.axis], "index": s.index, "score": round(s.score, 4)} for s in self.suggestions]}


def suggest_slices(image: np.ndarray, sparse: np.ndarray, ignore_label: int, *, model_path=None,
                   max_time: float = 60.0, count: int = 5, axes=(0, 1, 2), strategy: str = DEFAULT_STRATEGY,
                   seed: int = 0, spacing=None, device: str = "cpu", source: str = "SPARSE") -> SuggestResult:
    """Rank the slices of `image` (C, Z, Y, X) not yet annotated in `sparse` (`ignore_label`:
    unannotated), judged by the model at `model_path` (a model file or BioImage.IO package) or,
    without one, by the napari loop's network and forest trained for `max_time` seconds on the
    annotated voxels."""
    if image.shape[1:] != sparse.shape:
        raise UserError(f"{source}: shape {sparse.shape} differs from the image's {image.shape[1:]}")
    annotated = sparse != ignore_label
    values = [int(v) for v in np.unique(sparse[annotated])]
    if not values:
        raise UserError(f"{source}: no voxel is annotated (every voxel holds the ignore label {ignore_label})")
    if not candidate_slices(annotated, axes):
        raise UserError(f"{source}: every slice along the chosen axes is already annotated (half of its voxels or "
                        f"more hold a value other than the ignore label {ignore_label}); check --ignore-label")
    if model_path is not None:
        probabilities, class_values = _model_probabilities(model_path, image, values, device, source)
        network = f"the model {model_path}"
    else:
        probabilities, class_values, network = _trained_probabilities(image, sparse, values, annotated, max_time,
                                                                      seed, spacing, device, source)
    ranked = rank_slices(probabilities, annotated, strategy=strategy, axes=axes, count=count,
                         rng=np.random.default_rng(seed))
    labels = np.asarray(class_values)[probabilities.argmax(0)]
    return SuggestResult(ranked, labels, normalized_entropy(probabilities).astype(np.float32), class_values, network)


def _model_probabilities(model_path, image, values, device, source):
    model, info, forest = load_predictor(model_path)
    channels = info.image_channels(model.config)
    if image.shape[0] != channels:
        raise UserError(f"{model_path} reads {channels} channel(s), the image has {image.shape[0]}")
    class_values = info.class_values
    unknown = sorted(set(values) - set(class_values))
    if unknown:
        raise UserError(f"{source}: label value(s) {', '.join(map(str, unknown))} are not classes of {model_path} "
                        f"(its classes: {', '.join(map(str, class_values))}); check --ignore-label")
    return predict_image(model, info, image, device=device, forest=forest), class_values


def _trained_probabilities(image, sparse, values, annotated, max_time, seed, spacing, device, source):
    """The napari loop's network and forest trained on the annotated voxels; their blended
    probabilities over the annotated classes."""
    if len(values) < 2:
        raise UserError(f"{source}: only label value {values[0]} is annotated: annotate at least two classes")
    painted = np.full(sparse.shape, UNPAINTED, np.int32)
    painted[annotated] = np.searchsorted(values, sparse[annotated]) + 1  # classes 1..K, 0 unpainted
    session = Session(image, spacing, device=device, seed=seed)
    try:
        result = session.train_round(painted, max_time)
        probabilities = session.probabilities()
    finally:
        session.close()
    return probabilities, values, (f"a network trained for {result.seconds:.0f} s ({result.iterations} steps)"
                                   f"{' blended with the forest' if session.forest is not None else ''}")


def suggestion_figure(path, image: np.ndarray, result: SuggestResult, alpha: float = 0.45) -> None:
    """PNG of the best suggested slice: the image, the current segmentation, the uncertainty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = result.suggestions[0]
    plane = np.take(image[0], best.index, axis=best.axis).astype(np.float32)
    gray = gray_plane(plane)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6), dpi=100)
    axes[0].imshow(gray, cmap="gray", interpolation="nearest")
    axes[1].imshow(overlay_rgb(gray, np.take(result.labels, best.index, axis=best.axis), result.class_values, alpha),
                   interpolation="nearest")
    shown = axes[2].imshow(np.take(result.uncertainty, best.index, axis=best.axis), cmap="magma", vmin=0, vmax=1,
                           interpolation="nearest")
    fig.colorbar(shown, ax=axes[2], fraction=0.046)
    for ax, title in zip(axes, ("image", "current segmentation", "uncertainty (entropy / log K)")):
        ax.set_title(title)
        ax.set_axis_off()
    fig.suptitle(f"annotate next: {best.describe()}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
