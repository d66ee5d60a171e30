"""BioImage.IO model packages: a trained network as the bio-imaging community shares and runs models
(ilastik, deepImageJ/Fiji, QuPath, bioimageio.core), built with the spec's own Python API.

The package holds the network three ways: `pytorch_state_dict` (the parent; its architecture is
`unet3d.model.unet.build_unet` with the model's configuration), and `torchscript` and `onnx`
converted from it (batch norm folded). unet3d's intensity normalization becomes the spec's
pre-processing, exactly: fixed statistics as a linear scaling, per-volume statistics as
`zero_mean_unit_variance` / `scale_range` over each sample's spatial axes. The output is the class
probabilities (softmax over the channel axis). Valid padding is described as it is: the output is
smaller than the input by the network's margin on each side (the spec's size offset), so a
consumer that tiles gives each tile that much context. The unet3d model description travels in
the package's `config`, so `unet3d predict` runs a package as it runs a model file.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

import unet3d
from unet3d.atomic import atomic_path
from unet3d.data.normalization import apply_normalization
from unet3d.errors import UserError
from unet3d.export.onnx import DEFAULT_OPSET, check_exportable, example_input, export_onnx
from unet3d.model.folding import fold_batch_norm
from unet3d.model.serialization import FORMAT
from unet3d.model.info import ModelInfo
from unet3d.model.package import bioimageio_spec
from unet3d.model.unet import UNet

INPUT_ID, OUTPUT_ID = "raw", "probabilities"
SPATIAL_AXES = ("z", "y", "x")
TEST_OUTPUT_SIZE = 32  # output voxels per axis of the test tensors (fewer where the sample is smaller)
PAPER = ("Çiçek, Abdulkadir, Lienkamp, Brox, Ronneberger: 3D U-Net: Learning Dense Volumetric "
         "Segmentation from Sparse Annotation. MICCAI 2016", "10.1007/978-3-319-46723-8_49")
WEIGHT_FORMATS = ("pytorch_state_dict", "torchscript", "onnx")


def export_bioimageio(model: UNet, info: ModelInfo | dict, path, *, sample: np.ndarray, name: str, authors: list[str],
                      license: str = "CC-BY-4.0", curve=None) -> None:
    """Write `model` (with its description `info`) as a BioImage.IO package (.zip) at `path`.

    sample: a raw (C, Z, Y, X) image the test tensors are cut from (a crop at its centre);
    curve: the training curve PNG to attach, when there is one.
    """
    path = Path(path)
    if path.exists():
        raise UserError(f"{path}: already exists; choose another output or remove it first")
    if path.suffix.lower() != ".zip":
        raise UserError(f"{path}: a BioImage.IO package is written as a .zip file")
    info = ModelInfo.of(info, model.config)
    _check_expressible(model, info, path)
    from bioimageio.spec import save_bioimageio_package

    from pydantic import ValidationError

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        try:
            description = _describe(model, info, folder, sample=sample, name=name, authors=authors,
                                    license=license, curve=curve)
        except ValidationError as exc:
            error = exc.errors()[0]
            raise UserError(f"{path}: the BioImage.IO spec refuses the package: "
                            f"{'.'.join(map(str, error['loc'])) or 'model'}: {error['msg']}") from None
        package = save_bioimageio_package(description, output_path=folder / "package.zip")
        with atomic_path(path) as tmp:
            shutil.copyfile(package, tmp)


def _check_expressible(model: UNet, info: ModelInfo, path: Path) -> None:
    check_exportable(model, path)
    if info.input_features:
        raise UserError(f"{path}: this model reads ilastik's filter bank besides the image, which the BioImage.IO "
                        "spec cannot express as pre-processing; train with --filter-features off to export it")
    normalization = info.normalization
    if normalization.get("channels", model.config.in_channels) != model.config.in_channels:
        raise UserError(f"{path}: the model's normalization and network disagree on the number of channels")


def _describe(model: UNet, info: ModelInfo, folder: Path, *, sample, name, authors, license, curve):
    """The package's ModelDescr, with its files written to `folder`."""
    spec = bioimageio_spec()
    test_input, test_output = _test_tensors(model, info, sample)
    np.save(folder / "test_input.npy", test_input)
    np.save(folder / "test_output.npy", test_output)
    weights = _write_weights(model, folder)
    (folder / "README.md").write_text(_readme(model, info, name, curve is not None))
    _cover(folder / "cover.png", test_input, test_output, model, info)
    attachments = []
    if curve is not None and Path(curve).is_file():
        (folder / "training_curve.png").write_bytes(Path(curve).read_bytes())
        attachments.append(spec.FileDescr(source=folder / "training_curve.png"))
    return spec.ModelDescr(
        name=name,
        description=f"3D U-Net ({_classes_text(info)}) trained with unet3d from sparse annotation",
        authors=[spec.Author(name=author) for author in authors],
        cite=[spec.CiteEntry(text=PAPER[0], doi=spec.Doi(PAPER[1]))],
        license=spec.LicenseId(license),
        documentation=spec.FileDescr(source=folder / "README.md"),
        covers=[spec.FileDescr(source=folder / "cover.png")],
        attachments=attachments,
        tags=["3d", "unet", "semantic-segmentation", "unet3d"],
        inputs=[_input_descr(spec, model, info, folder / "test_input.npy")],
        outputs=[_output_descr(spec, model, info, folder / "test_output.npy")],
        weights=spec.WeightsDescr(
            pytorch_state_dict=spec.PytorchStateDictWeightsDescr(
                source=weights["pytorch_state_dict"], pytorch_version=spec.Version(_torch_version()),
                architecture=spec.ArchitectureFromLibraryDescr(
                    import_from="unet3d.model.unet", callable=spec.Identifier("build_unet"),
                    kwargs=model.config.to_dict())),
            torchscript=spec.TorchscriptWeightsDescr(
                source=weights["torchscript"], pytorch_version=spec.Version(_torch_version()),
                parent="pytorch_state_dict"),
            onnx=spec.OnnxWeightsDescr(source=weights["onnx"], opset_version=DEFAULT_OPSET,
                                       parent="pytorch_state_dict"),
        ),
        config=spec.Config(unet3d={"format": FORMAT, "config": model.config.to_dict(), "info": info.to_dict(),
                                   "versions": {"unet3d": unet3d.__version__, "torch": torch.__version__}}),
    )


def _torch_version() -> str:
    return torch.__version__.split("+")[0]


def _axis_sizes(model: UNet) -> list[tuple[int, int, int]]:
    """(smallest valid input, step between valid inputs, margin) per spatial axis."""
    geometry = model.config.geometry
    sizes = []
    for axis in range(3):
        first = geometry.valid_input_size_1d(1, axis)
        second = geometry.valid_input_size_1d(first + 1, axis)
        sizes.append((first, second - first, geometry.margin_1d(axis)))
    return sizes


def _input_descr(spec, model: UNet, info: ModelInfo, test_tensor: Path):
    axes = [spec.BatchAxis(),
            spec.ChannelAxis(channel_names=[spec.Identifier(f"channel{i}") for i in range(model.config.in_channels)])]
    axes += [spec.SpaceInputAxis(id=spec.AxisId(name), size=spec.ParameterizedSize(min=first, step=step))
             for name, (first, step, _) in zip(SPATIAL_AXES, _axis_sizes(model))]
    return spec.InputTensorDescr(
        id=spec.TensorId(INPUT_ID), axes=axes, test_tensor=spec.FileDescr(source=test_tensor),
        description="the image, channels first, as the model was trained on (any numeric type)",
        data=spec.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=[spec.EnsureDtypeDescr(kwargs=spec.EnsureDtypeKwargs(dtype="float32")),
                       *_preprocessing(spec, info.normalization)])


def _preprocessing(spec, normalization: dict) -> list:
    """unet3d's intensity normalization as the spec's operations (exact, up to the spec's epsilon
    of 1e-6 where statistics are computed per sample)."""
    method = normalization["method"]
    if method == "none":
        return []
    spatial = [spec.AxisId(a) for a in SPATIAL_AXES]
    if normalization.get("per_volume"):
        if method == "zscore":
            return [spec.ZeroMeanUnitVarianceDescr(kwargs=spec.ZeroMeanUnitVarianceKwargs(axes=spatial))]
        low, high = normalization["percentiles"]
        return [spec.ScaleRangeDescr(kwargs=spec.ScaleRangeKwargs(axes=spatial, min_percentile=low,
                                                                   max_percentile=high))]
    scale = np.asarray(normalization["scale"], np.float64)
    offset = np.asarray(normalization["offset"], np.float64)
    return [spec.ScaleLinearDescr(kwargs=spec.ScaleLinearAlongAxisKwargs(
        axis=spec.AxisId("channel"), gain=(1 / scale).tolist(), offset=(-offset / scale).tolist()))]


def _output_descr(spec, model: UNet, info: ModelInfo, test_tensor: Path):
    axes = [spec.BatchAxis(),
            spec.ChannelAxis(channel_names=[spec.Identifier(f"class{v}") for v in info.class_values])]
    axes += [spec.SpaceOutputAxis(id=spec.AxisId(name), size=spec.SizeReference(
                 tensor_id=spec.TensorId(INPUT_ID), axis_id=spec.AxisId(name), offset=-2 * margin))
             for name, (_, _, margin) in zip(SPATIAL_AXES, _axis_sizes(model))]
    return spec.OutputTensorDescr(
        id=spec.TensorId(OUTPUT_ID), axes=axes, test_tensor=spec.FileDescr(source=test_tensor),
        description=f"class probabilities ({_classes_text(info)})",
        data=spec.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
        postprocessing=[spec.SoftmaxDescr(kwargs=spec.SoftmaxKwargs(axis=spec.AxisId("channel")))])


def _classes_text(info: ModelInfo) -> str:
    return f"{len(info.class_values)} classes: label values {', '.join(map(str, info.class_values))}"


def _test_tensors(model: UNet, info: ModelInfo, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A centre crop of `sample` (raw, 1×C×Z×Y×X) and the model's probabilities for it, computed
    the way unet3d computes them."""
    if sample.ndim != 4 or sample.shape[0] != model.config.in_channels:
        raise UserError(f"the sample image has shape {sample.shape}; the model needs ({model.config.in_channels}, Z, Y, X)")
    geometry = model.config.geometry
    wanted = geometry.input_shape_for_output((TEST_OUTPUT_SIZE,) * 3)
    shape = []
    for axis, (n, want) in enumerate(zip(sample.shape[1:], wanted)):
        size = geometry.valid_input_size_1d(min(n, want), axis, "down")
        if size is None:
            raise UserError(f"the sample image ({'×'.join(map(str, sample.shape[1:]))}) is smaller than the "
                            f"network's smallest input ({'×'.join(map(str, geometry.valid_input_shape((1, 1, 1))))})")
        shape.append(size)
    box = tuple(slice((n - s) // 2, (n - s) // 2 + s) for n, s in zip(sample.shape[1:], shape))
    raw = np.ascontiguousarray(sample[(slice(None),) + box], dtype=np.float32)
    normalized = apply_normalization(raw, info.normalization)
    with torch.inference_mode():
        logits = model.cpu().float().eval()(torch.from_numpy(normalized)[None])
    return raw[None], torch.softmax(logits, dim=1).numpy()


def _write_weights(model: UNet, folder: Path) -> dict[str, Path]:
    """The three weight files: the state dict (tensors only, loadable with weights_only=True), and
    the folded network as TorchScript and ONNX."""
    files = {fmt: folder / name for fmt, name in
             zip(WEIGHT_FORMATS, ("weights.pt", "weights_torchscript.pt", "weights.onnx"))}
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, files["pytorch_state_dict"])
    folded = fold_batch_norm(model).cpu().float().eval()
    with warnings.catch_warnings(), torch.enable_grad():
        # See export.onnx: traced with gradients on, so the graph has no slab loop fixed to one size.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(folded, example_input(folded), check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    files["torchscript"].write_bytes(buffer.getvalue())
    export_onnx(model, files["onnx"])
    return files


def _readme(model: UNet, info: ModelInfo, name: str, has_curve: bool) -> str:
    training = info.training
    config = model.config
    sources = ", ".join(Path(str(s)).name for s in training.get("sources", [])) or "not recorded"
    normalization = info.normalization
    lines = [
        f"# {name}",
        "",
        f"A 3D U-Net (Çiçek et al., MICCAI 2016) trained with unet3d {unet3d.__version__} on volumes whose labels "
        "annotate only some voxels (for example a few painted slices); it segments whole volumes.",
        "",
        "## What it segments",
        f"- Output: probabilities of {_classes_text(info)} (the label value of each class in the training labels).",
        f"- Input: {config.in_channels} channel(s), axes (z, y, x); voxel spacing in training "
        f"{tuple(info.spacing or (1, 1, 1))}.",
        f"- Intensity normalization: {normalization['method']}"
        + (" on each volume's own statistics" if normalization.get("per_volume") else
           " with the training images' statistics" if normalization["method"] != "none" else "")
        + " (the package's pre-processing).",
        "",
        "## Network",
        f"- width {config.width}, {config.levels} levels, {config.padding} padding, {config.norm} normalization, "
        f"{config.dims}D convolutions.",
        "- Valid padding: the output is smaller than the input by the margin on each side given in the output "
        "axes; give tiles that much context." if config.padding == "valid" else
        "- Same padding: the output covers the input; borders of a tile see less context, so overlap tiles.",
        "",
        "## Training",
        f"- {training.get('iterations', '?')} iterations in {training.get('seconds', '?')} s on: {sources}.",
        f"- Ignore label of the sparse annotation: {'?' if info.ignore_label is None else info.ignore_label}.",
        *(["- Training curve: `training_curve.png` (attached)."] if has_curve else []),
        "",
        "## Validation",
        "The test tensors (a crop of a training image and unet3d's prediction for it) are reproduced by every "
        "weight format within the Model Zoo's tolerance (`bioimageio test`). Accuracy on volumes other than the "
        "training volumes is not part of this package: measure it on annotated volumes of your own "
        "(`unet3d evaluate`).",
        "",
        "## Running it",
        "- `unet3d predict PACKAGE.zip image.tif -o labels.tif` (tiles any volume size)",
        "- `bioimageio predict PACKAGE.zip --inputs image.npy` (bioimageio.core)",
        "- ilastik's Neural Network workflow and deepImageJ open the package directly.",
        "",
        "## Limitations",
        "Trained on the volumes above only; check it on your data before trusting it on other microscopes, "
        "stainings or modalities.",
    ]
    return "\n".join(lines) + "\n"


def _cover(path: Path, test_input: np.ndarray, test_output: np.ndarray, model: UNet, info: ModelInfo) -> None:
    """The cover: the test input's middle slices with the model's segmentation over them."""
    from unet3d.evaluation.figures import overlay_figure

    margins = [m for _, _, m in _axis_sizes(model)]
    inner = test_input[0][(slice(None),) + tuple(slice(m, n - m) for m, n in zip(margins, test_input.shape[2:]))]
    values = np.asarray(info.class_values)
    overlay_figure(path, inner, values[test_output[0].argmax(axis=0)], info.class_values,
                   title="unet3d: test input and its segmentation")
