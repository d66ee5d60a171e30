"""The compared methods, each trained on sparse labels of some volumes and segmenting others.

unet3d        `unet3d train --forest off` on these volumes and this budget: what its plan decides
              (normalization, inputs, held-out validation volumes, densify's recipe), a 3D U-Net
              with batch norm; the network alone, since the forest is a method of its own
unet3d_nobn   the same with `--norm none` (the paper's "3D w/o BN")
unet2d        the same with `--dims 2`: 2D convolutions applied to every z-slice independently (the
              paper's "2D with BN"); it learns from every annotated voxel, i.e. from whole annotated
              xy-planes and from the lines where annotated xz- and yz-planes cross each z-slice
forest        random forest on ilastik's filter bank (`harness.forest`), the tool biologists use
unet3d_dense  unet3d trained with every voxel of the training volumes labeled: the upper bound

Class values are those present in the annotation: a class nobody painted cannot be learned (the
ovule's few background voxels are often on no annotated slice).
"""

from __future__ import annotations

import time
from pathlib import Path

from harness import IGNORE, forest
from harness.forest import Segmentation, annotated_classes
from harness.volumes import Volume
from unet3d.data.labels import decode_labels
from unet3d.inference.predictor import predict_image
from unet3d.model.serialization import load_model
from unet3d.training.distributed import Processes
from unet3d.workflows.train import Changes, TrainOptions, train_volumes

# Each network method as `unet3d train`'s network options (UNetConfig fields) over its plan.
NETWORK_CHANGES = {"unet3d": {}, "unet3d_nobn": {"norm": "none"}, "unet2d": {"dims": 2}, "unet3d_dense": {}}
METHODS = ("unet3d", "unet3d_nobn", "unet2d", "forest", "unet3d_dense")


def segment(method: str, trained_on: list[Volume], sparse: list, segmented: list[Volume],
            seconds: float | None, steps: int | None, seed: int, workdir: Path) -> Segmentation:
    """Train `method` on the annotated voxels of `sparse` (IGNORE elsewhere) for `steps` steps or
    `seconds` (networks), segment the volumes `segmented`."""
    if method == "forest":
        return forest.segment(trained_on, sparse, segmented, seed)
    if method in NETWORK_CHANGES:
        return _unet(method, trained_on, sparse, segmented, seconds, steps, seed, Path(workdir))
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _unet(method, trained_on, sparse, segmented, seconds, steps, seed, workdir: Path) -> Segmentation:
    """`unet3d train` with the method's network options, its best model on the held-out volumes
    where the plan holds some out, predicting as `unet3d predict` does."""
    output = workdir / "model.safetensors"
    options = TrainOptions(output=str(output), sources=[v.name for v in trained_on], ignore_label=IGNORE,
                           classes=annotated_classes(sparse), spacing=trained_on[0].spacing, max_time=seconds,
                           iterations=steps, seed=seed, forest=False,
                           changes=Changes(network=NETWORK_CHANGES[method]), progress=False)
    result = train_volumes([v.image for v in trained_on], sparse, options, Processes(), report=lambda line: None)
    best = output.with_name("model.best.safetensors")
    model, info = load_model(best if best.exists() else output)
    start = time.perf_counter()
    labels = [decode_labels(predict_image(model, info, volume.image).argmax(0), info.class_values)
              for volume in segmented]
    return Segmentation(labels, info.class_values, result.iterations, result.seconds, time.perf_counter() - start)
