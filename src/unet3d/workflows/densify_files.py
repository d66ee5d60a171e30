"""densify from arrays read from files to files: output naming, writing, scoring and the report
that `unet3d densify` and `unet3d demo` print."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from unet3d.errors import UserError
from unet3d.evaluation import evaluate_volumes
from unet3d.evaluation.figures import overlay_figure
from unet3d.evaluation.report import score_table
from unet3d.io import open_volume, write_volume
from unet3d.io.spec import EXTENSIONS, parse_spec
from unet3d.workflows.densify import densify


def output_base(spec: str) -> Path:
    """SEGMENTATION's path without its volume extension (seg.nii.gz → seg)."""
    path = parse_spec(spec).path
    for extension in EXTENSIONS:
        if path.lower().endswith(extension):
            return Path(path[: -len(extension)])
    return Path(path)


def densify_and_write(image, sparse, meta, output: str, ignore_label: int, *, model=None, overlay=None,
                      probabilities=None, truth=None, source: str = "image", **options) -> str:
    """Run densify (`options`: its keyword arguments) and write the segmentation, the model, the
    overlay and optionally the probabilities, named after `output` unless given; with `truth`,
    score the unannotated voxels. Returns the report to print."""
    base = output_base(output)
    model = model or f"{base}.model.safetensors"
    overlay = overlay or f"{base}.overlay.png"
    if image.shape[1:] != sparse.shape:
        raise UserError(f"{source}: image shape {image.shape[1:]} and sparse label shape {sparse.shape} differ")
    result = densify(image, sparse, ignore_label, model, source=source, segmentation_out=output,
                     probabilities_out=probabilities, output_meta=meta, **options)
    if result.segmentation is not None:  # else the blockwise route wrote it tile by tile
        write_volume(output, result.segmentation, like=meta)
    if probabilities and result.probabilities is not None:  # the blockwise route wrote them as it went
        write_volume(probabilities, result.probabilities.astype("float16"), like=meta)
    with contextlib.ExitStack() as opened:
        segmentation = result.segmentation
        if segmentation is None:
            segmentation = opened.enter_context(open_volume(output, "labels"))
        return finish_report(result, segmentation, image, sparse, output, model, overlay, truth, source, ignore_label)


def finish_report(result, segmentation, image, sparse, output: str, model: str, overlay: str, truth, source: str,
                  ignore_label: int) -> str:
    """The report's lines, the scores on the unannotated voxels with `truth`, and the overlay
    (`segmentation`: in memory, or the written file opened, of which only what is needed is read)."""
    lines = [f"input: {result.inputs}", f"result: {result.blend}",
             *([f"blend: {result.weighing}"] if result.weighing else []),
             *([f"filter bank and random forest ({result.forest_trees} trees) in {result.forest_seconds:.0f} s"]
               if result.forest_trees else []),
             f"trained {result.iterations} iterations in {result.seconds:.0f} s",
             "predicted " + ("the 8 mirrored volumes, averaged (test-time flips)" if result.tta else "once"),
             f"wrote {output} (segmentation), {model} (model), {overlay} (overlay)"]
    title = f"unet3d densify: {Path(source).name}"
    if truth is not None:
        whole = segmentation if isinstance(segmentation, np.ndarray) else segmentation.read()
        scores = evaluate_volumes(whole, truth, exclude=sparse, ignore_label=ignore_label)
        lines += ["IoU on the unannotated voxels:", score_table(scores)]
        if result.components:
            alone = {name: evaluate_volumes(part, truth, exclude=sparse, ignore_label=ignore_label)
                     for name, part in result.components.items()}
            lines.append("foreground IoU of the parts: " + ", ".join(
                f"{name} {scores_alone['mean_iou_foreground']:.3f}" for name, scores_alone in alone.items()))
        title += f" — foreground IoU {scores['mean_iou_foreground']:.3f} on unannotated voxels"
        lines.append("json: " + json.dumps({"mean_iou_foreground": scores["mean_iou_foreground"],
                                            "iou": {c["value"]: c["iou"] for c in scores["classes"]}}))
    overlay_figure(overlay, image, segmentation, result.info.class_values, title=title)
    return "\n".join(lines)
