"""Every input a user can get wrong, run through the `unet3d` command line: the answer must be one
line on stderr naming the file and the problem, a non-zero exit code, and no file written.

The cases are the single list `CASES`, shared with tests/test_bad_input.py. Each builds its inputs
from tiny synthetic volumes in a fresh folder, so the whole table takes seconds. Run as
`python -m benchmarks.bench_bad_input [--record benchmarks/records/bad_input.jsonl]`; it prints
the table (Markdown) that docs/reliability.md shows.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import re
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from harness import IGNORE

SHAPE = (8, 16, 16)  # every synthetic volume, (Z, Y, X)


def image(seed: int = 0, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)


def painting(shape=SHAPE, dtype=np.uint8) -> np.ndarray:
    """Two classes painted on the middle z-slice, the rest unannotated."""
    labels = np.full(shape, IGNORE, dtype)
    labels[shape[0] // 2] = 0
    labels[shape[0] // 2, : shape[1] // 2] = 1
    return labels


def write(folder: Path, name: str, array: np.ndarray) -> str:
    """`array` saved as unet3d saves volumes; TIFF through tifffile, which takes any number of axes."""
    import tifffile

    from unet3d.io import write_volume

    if name.endswith(".tif"):
        tifffile.imwrite(folder / name, array)
    else:
        write_volume(str(folder / name), array)
    return str(folder / name)


def cut(path: str, keep: float = 0.5) -> str:
    """The file (or the largest file in a store) cut to `keep` of its bytes: a truncated copy."""
    target = Path(path)
    if target.is_dir():
        target = max((p for p in target.rglob("*") if p.is_file() and p.name != "zarr.json"), key=lambda p: p.stat().st_size)
    data = target.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return path


def garbage(folder: Path, name: str) -> str:
    """A file with a volume's extension holding random bytes."""
    (folder / name).write_bytes(np.random.default_rng(7).bytes(4096))
    return str(folder / name)


def model(folder: Path, in_channels: int = 1, format_version: str | None = None) -> str:
    """A tiny untrained network saved as `unet3d train` saves one; `format_version` fakes a newer file."""
    import safetensors.torch
    import torch

    from unet3d.model import UNet, UNetConfig, save_model

    torch.manual_seed(0)
    network = UNet(UNetConfig(in_channels=in_channels, num_classes=2, width=2, levels=2, padding="same"))
    path = folder / "model.safetensors"
    save_model(path, network, {"class_values": [0, 1]})
    if format_version:
        with safetensors.safe_open(str(path), framework="pt") as f:
            description = json.loads(f.metadata()["unet3d"])
            state = {key: f.get_tensor(key) for key in f.keys()}
        description["format"] = f"unet3d-model/{format_version}"
        description["versions"]["unet3d"] = "99.0"
        safetensors.torch.save_file(state, str(path), metadata={"unet3d": json.dumps(description)})
    return str(path)


def train(folder: Path, images: list[str], labels: list[str], *options: str) -> list[str]:
    return ["train", "--images", *images, "--labels", *labels, "--ignore-label", str(IGNORE), "--iterations", "1",
            "--forest", "off", "--quiet", "-o", str(folder / "out.safetensors"), *options]


def predict(folder: Path, model_path: str, image_path: str, *options: str) -> list[str]:
    return ["predict", model_path, image_path, "-o", str(folder / "out.tif"), "--quiet", *options]


def suggest(folder: Path, labels: np.ndarray, *options: str) -> list[str]:
    """`unet3d suggest` on a good image with the painting `labels`; a short budget should it train."""
    return ["suggest", write(folder, "image.tif", image()), write(folder, "labels.tif", labels), "--max-time", "1",
            "--figure", str(folder / "out.png"), *(options or ("--ignore-label", str(IGNORE)))]


def densify_with(labels: Callable[[], np.ndarray], *options: str) -> Callable[[Path], list[str]]:
    """`unet3d densify` of a good image with the painting `labels()`; a short budget should it train."""
    return lambda d: ["densify", write(d, "image.tif", image()), write(d, "labels.tif", labels()), "-o",
                      str(d / "out.tif"), "--ignore-label", str(IGNORE), "--iterations", "1",
                      *(options or ("--max-time", "60"))]


def train_on(image_file: Callable[[Path], str]) -> Callable[[Path], list[str]]:
    """A training command whose image is `image_file(folder)`, with a good painting."""
    return lambda d: train(d, [image_file(d)], [write(d, "labels.tif", painting())])


def train_with(labels: Callable[[], np.ndarray], *options: str, image_shape=SHAPE) -> Callable[[Path], list[str]]:
    """A training command on a good image with the painting `labels()` written as TIFF."""
    return lambda d: train(d, [write(d, "image.tif", image(shape=image_shape))], [write(d, "labels.tif", labels())],
                           *options)


def predict_on(image_file: Callable[[Path], str], *options: str, **model_options) -> Callable[[Path], list[str]]:
    """A prediction command with a good model on the image `image_file(folder)`."""
    return lambda d: predict(d, model(d, **model_options), image_file(d), *options)


def good_image(name: str = "image.tif", array: Callable[[], np.ndarray] = image) -> Callable[[Path], str]:
    return lambda d: write(d, name, array())


def with_value(value: float) -> Callable[[], np.ndarray]:
    def make():
        array = image()
        array[3, 4, 5] = value
        return array
    return make


def labels_with(value, dtype=np.uint8) -> Callable[[], np.ndarray]:
    def make():
        labels = painting(dtype=dtype)
        labels[SHAPE[0] // 2, 0, 0] = value
        return labels
    return make


def zarr_chunk_garbage(d: Path) -> str:
    """A Zarr image whose first chunk's bytes are replaced by random ones."""
    path = write(d, "image.zarr", image())
    chunk = next(p for p in sorted(Path(path).rglob("*")) if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(np.random.default_rng(3).bytes(chunk.stat().st_size))
    return path


def zarr_metadata_cut(d: Path) -> str:
    path = write(d, "image.zarr", image())
    metadata = next(p for p in Path(path).rglob("zarr.json") if p.parent != Path(path))
    metadata.write_text(metadata.read_text()[:40])
    return path


def nifti_gz_cut(d: Path) -> str:
    path = write(d, "image.nii.gz", image())
    data = gzip.decompress(Path(path).read_bytes())
    Path(path).write_bytes(gzip.compress(data[: len(data) // 2]))
    return path


@dataclass(frozen=True)
class Case:
    input: str  # what the user got wrong, in the table's words
    command: Callable[[Path], list[str]]  # builds the inputs in a folder, returns the arguments
    names: str  # what the message must name: a file's name, or an option
    problem: str  # a regular expression the message must match


CASES = [
    Case("truncated TIFF", predict_on(lambda d: cut(write(d, "image.tif", image()))), "image.tif", "TIFF"),
    Case("corrupt TIFF (random bytes)", predict_on(lambda d: garbage(d, "image.tif")), "image.tif", "cannot read TIFF"),
    Case("truncated NIfTI (.nii)", predict_on(lambda d: cut(write(d, "image.nii", image()))), "image.nii", "NIfTI"),
    Case("truncated NIfTI (.nii.gz)", predict_on(nifti_gz_cut), "image.nii.gz", "NIfTI"),
    Case("corrupt NIfTI (random bytes)", predict_on(lambda d: garbage(d, "image.nii")), "image.nii", "cannot read NIfTI"),
    Case("truncated HDF5", predict_on(lambda d: cut(write(d, "image.h5", image()))), "image.h5", "HDF5"),
    Case("corrupt HDF5 (random bytes)", predict_on(lambda d: garbage(d, "image.h5")), "image.h5", "cannot read HDF5"),
    Case("truncated Zarr (a chunk cut short)", predict_on(lambda d: cut(write(d, "image.zarr", image()))),
         "image.zarr", "cannot read Zarr"),
    Case("corrupt Zarr chunk (random bytes)", predict_on(zarr_chunk_garbage), "image.zarr", "cannot read Zarr"),
    Case("corrupt Zarr metadata", predict_on(zarr_metadata_cut), "image.zarr", "Zarr"),
    Case("NaN in the image (train)", train_on(good_image(array=with_value(np.nan))), "image.tif", "NaN or infinite"),
    Case("Inf in the image (predict)", predict_on(good_image(array=with_value(np.inf))), "image.tif", "NaN or infinite"),
    Case("2-D image", predict_on(good_image(array=lambda: image()[0])), "image.tif", "expected a 3-D volume"),
    Case("5-D image", predict_on(good_image(array=lambda: np.stack([np.stack([image()] * 2)] * 2))), "image.tif",
         "expected a 3-D volume"),
    Case("2-D painting", train_with(lambda: painting()[4]), "labels.tif", "expected a 3-D volume"),
    Case("channels: 2-channel image, 1-channel model", predict_on(good_image(array=lambda: np.stack([image()] * 2))),
         "image.tif", r"2 channel\(s\), but .* expects 1"),
    Case("label outside the classes (--classes 0,1)", train_with(labels_with(5), "--classes", "0,1"), "labels.tif",
         "label value 5 is neither a class"),
    Case("negative label", train_with(labels_with(-3, np.int16)), "labels.tif", "label value -3 is negative"),
    Case("float label (0.5)", train_with(labels_with(0.5, np.float32)), "labels.tif", "must be integers"),
    Case("ignore label that is also a class", train_with(painting, "--classes", "0,1,255"), "--classes",
         "ignore label 255 is also one of the declared classes"),
    Case("--num-classes 1", train_with(painting, "--num-classes", "1"), "--num-classes", "at least two classes"),
    Case("nothing annotated", train_with(lambda: np.full(SHAPE, IGNORE, np.uint8)), "labels.tif", "no annotated voxel"),
    Case("one class only", train_with(lambda: np.where(painting() == 1, 0, painting()).astype(np.uint8)), "labels.tif",
         "only one class"),
    Case("painting of another shape", train_with(lambda: painting((8, 16, 15))), "labels.tif",
         r"shape .*differ"),
    Case("one class only (densify)", densify_with(lambda: np.where(painting() == 1, 0, painting()).astype(np.uint8)),
         "labels.tif", "only one class|no annotated voxel of class"),
    Case("painting of another shape (densify)", densify_with(lambda: painting((8, 16, 15))), "labels.tif",
         r"shape .*differs"),
    Case("--max-time nan (densify)", densify_with(painting, "--max-time", "nan"), "--max-time",
         "positive number of seconds"),
    Case("painting of another shape (suggest)", lambda d: suggest(d, painting((8, 15, 16))), "labels.tif",
         r"shape .*differs"),
    Case("one class only (suggest)",
         lambda d: suggest(d, np.where(painting() == 1, 0, painting()).astype(np.uint8)), "labels.tif",
         "only label value 0 is annotated"),
    Case("wrong --ignore-label: every slice annotated (suggest)",
         lambda d: suggest(d, painting(), "--ignore-label", "7"), "labels.tif", "already annotated"),
    Case("prediction of another shape than the truth (evaluate)",
         lambda d: ["evaluate", write(d, "prediction.tif", painting((8, 16, 15))), write(d, "truth.tif", painting())],
         "prediction.tif", r"shape .*differs"),
    Case("--max-time 0", train_with(painting, "--max-time", "0"), "--max-time", "positive number of seconds"),
    Case("--max-time -5", train_with(painting, "--max-time", "-5"), "--max-time", "positive number of seconds"),
    Case("--max-time nan", train_with(painting, "--max-time", "nan"), "--max-time", "positive number of seconds"),
    Case("--max-time inf", train_with(painting, "--max-time", "inf"), "--max-time", "positive number of seconds"),
    Case("--max-memory 1 (one byte)", predict_on(good_image(), "--max-memory", "1"), "--max-memory", "too small"),
    Case("--max-memory 0", predict_on(good_image(), "--max-memory", "0"), "--max-memory", "positive size"),
    Case("--max-memory -2G", predict_on(good_image(), "--max-memory=-2G"), "--max-memory", "positive size"),
    Case("--max-memory lots", predict_on(good_image(), "--max-memory", "lots"), "--max-memory", "size such as"),
    Case("--tile 0,16,16", predict_on(good_image(), "--tile", "0,16,16"), "--tile", "positive integers"),
    Case("--tile -8", predict_on(good_image(), "--tile", "-8"), "--tile", "positive integers"),
    Case("model file from a newer version", predict_on(good_image(), format_version="2"), "model.safetensors",
         r"newer unet3d"),
]


@dataclass
class Outcome:
    code: int | None
    stderr: str
    seconds: float
    new_files: list[str]  # anything in the folder that the command wrote

    @property
    def lines(self) -> list[str]:
        return self.stderr.splitlines()


def run_case(case: Case, folder: Path) -> tuple[list[str], Outcome]:
    """Build the case's inputs in `folder`, run the command in this process, and see what it left."""
    from unet3d.cli.main import main

    argv = case.command(folder)
    before = _files(folder)
    err = io.StringIO()
    began = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's refusals
            code = exc.code
        except Exception:  # a traceback is a failure of the product, shown as such
            traceback.print_exc()
            code = None
    return argv, Outcome(code, err.getvalue(), time.perf_counter() - began, sorted(_files(folder) - before))


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def problems(case: Case, folder: Path, outcome: Outcome) -> list[str]:
    """What the answer to `case` breaks of the rule; empty when it is right."""
    found = []
    if not outcome.code:
        found.append(f"exit code {outcome.code}")
    if len(outcome.lines) != 1 or "Traceback" in outcome.stderr:
        found.append(f"{len(outcome.lines)} lines on stderr")
    message = outcome.stderr.strip()
    if case.names not in message:
        found.append(f"does not name {case.names}")
    if not re.search(case.problem, message):
        found.append(f"does not say /{case.problem}/")
    if outcome.new_files:
        found.append(f"wrote {', '.join(outcome.new_files)}")
    return found


def table_row(case: Case, folder: Path, argv: list[str], outcome: Outcome) -> dict:
    shown = [a.replace(str(folder) + "/", "") for a in argv]
    return {"input": case.input, "command": "unet3d " + " ".join(shown), "code": outcome.code,
            "message": outcome.stderr.strip().replace(str(folder) + "/", ""),
            "nothing_written": not outcome.new_files, "problems": problems(case, folder, outcome),
            "seconds": round(outcome.seconds, 3)}


def markdown(rows: list[dict]) -> str:
    lines = ["| input | command | message | nothing written |", "|---|---|---|---|"]
    for row in rows:
        cell = lambda text: text.replace("|", "\\|")  # noqa: E731
        written = "yes" if row["nothing_written"] else "**no**"
        message = cell(row["message"]) + ("" if not row["problems"] else f" **({'; '.join(row['problems'])})**")
        lines.append(f"| {row['input']} | `{cell(row['command'])}` | {message} | {written} |")
    ok = sum(not row["problems"] for row in rows)
    lines.append(f"\n{ok} of {len(rows)} inputs answered in one line naming the file or option, exit code ≠ 0, "
                 "nothing written.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the same cases (they take seconds)")
    parser.add_argument("--record", type=Path, help="write the rows as JSON lines here (replacing the file)")
    args = parser.parse_args()
    rows = []
    for case in CASES:
        with tempfile.TemporaryDirectory() as folder:
            argv, outcome = run_case(case, Path(folder))
            rows.append(table_row(case, Path(folder), argv, outcome))
    print(markdown(rows))
    if args.record:
        args.record.write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
