"""nnU-Net v2 (3d_fullres) trained on the same sparse labels as `unet3d train`, for the same wall budget.

The training volumes and their sparse labels (the kept slices; every other voxel carries
nnU-Net's ignore label, the highest label value, as its documentation asks) are written as an
nnU-Net raw dataset (NIfTI, with the volume's spacing) in a temporary folder, then nnU-Net's
own command-line tools run from .venv-bench:

1. nnUNetv2_plan_and_preprocess -c 3d_fullres: its fingerprint, plan and preprocessing. Timed
   on its own (`preprocess_s`), outside the training budget, as `unet3d train` does not count
   reading and normalizing its volumes either.
2. nnUNetv2_train ... all -tr nnUNetTrainerWallTime -device cpu: every training case (fold
   "all") for the budget (benchmarks/peers/nnUNetTrainerWallTime.py says what differs from
   nnUNetTrainer). `s` is the command's wall time; `train_loop_s` the budgeted part.
3. nnUNetv2_predict -chk checkpoint_final.pth -device cpu on the unseen volumes (`predict_s`),
   with nnU-Net's default test-time mirroring (8 passes per tile in 3D; `tta=False`: one, as
   `unet3d predict` without --tta). On a CPU the mirroring is most of the time on a large
   volume: an em_vnc quarter takes minutes without it.

nnU-Net needs its label 0 to be called "background": it leaves that class out of its Dice loss
(not of its cross-entropy) and samples a third of its patches around the other classes. For
em_vnc label 0 is membrane, so nnU-Net treats membrane as its background; the labels themselves
are the same as unet3d's.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from harness import volumes
from unet3d.data.sparse import sparsify
from unet3d.evaluation.metrics import confusion_matrix

METHOD = "nnU-Net v2 3d_fullres"
REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("VENV_BENCH", REPO / ".venv-bench"))
TRAINER = "nnUNetTrainerWallTime"
TRAINER_SOURCE = Path(__file__).with_name(f"{TRAINER}.py")
DATASET_ID = 501
DATASET = f"Dataset{DATASET_ID:03d}_UNet3DBench"
CLASS_NAMES = {"hippocampus": ("background", "anterior", "posterior"),
               "em_vnc": ("background", "intracellular", "mitochondria", "glia_extracellular")}
CHANNEL_NAMES = {"hippocampus": "MRI", "em_vnc": "EM"}  # anything but "CT": z-score per image
PROCESSES = str(min(2, os.cpu_count() or 1))  # preprocessing and prediction workers


def missing() -> str | None:
    """Why nnU-Net cannot run (None: it can)."""
    if not (VENV / "bin" / "nnUNetv2_train").exists():
        return f"nnU-Net v2 not installed in {VENV}: run `bash benchmarks/peers.sh` for its row"
    return None


def _install_trainer() -> None:
    """Copy the wall-time trainer into nnU-Net's trainer folder when it is missing or older."""
    folders = list(VENV.glob("lib/python*/site-packages/nnunetv2/training/nnUNetTrainer"))
    if not folders:
        raise SystemExit(f"nnunetv2 package folder not found in {VENV}: run `bash benchmarks/peers.sh`")
    target = folders[0] / TRAINER_SOURCE.name
    if not target.exists() or not filecmp.cmp(TRAINER_SOURCE, target, shallow=False):
        shutil.copyfile(TRAINER_SOURCE, target)


def _nifti(array: np.ndarray, spacing: Sequence[float], path: Path) -> None:
    """A (Z, Y, X) array as NIfTI, whose axes are (x, y, z)."""
    import nibabel

    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    nibabel.save(nibabel.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine), str(path))


def _read_nifti(path: Path) -> np.ndarray:
    import nibabel

    return np.asarray(nibabel.load(str(path)).dataobj).transpose(2, 1, 0)


def write_dataset(raw: Path, dataset: str, train: list, sparse: list[np.ndarray], test: list,
                  num_classes: int) -> None:
    """The nnU-Net raw dataset: imagesTr/labelsTr (sparse, ignore = num_classes), imagesTs, dataset.json."""
    folder = raw / DATASET
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for volume, labels in zip(train, sparse):
        spacing = volume.spacing or (1.0, 1.0, 1.0)
        for channel, image in enumerate(volume.image):
            _nifti(image.astype(np.float32), spacing, folder / "imagesTr" / f"{volume.name}_{channel:04d}.nii.gz")
        _nifti(labels.astype(np.uint8), spacing, folder / "labelsTr" / f"{volume.name}.nii.gz")
    for volume in test:
        spacing = volume.spacing or (1.0, 1.0, 1.0)
        for channel, image in enumerate(volume.image):
            _nifti(image.astype(np.float32), spacing, folder / "imagesTs" / f"{volume.name}_{channel:04d}.nii.gz")
    names = CLASS_NAMES.get(dataset) or ("background", *(f"class_{k}" for k in range(1, num_classes)))
    channels = len(train[0].image)
    description = {
        "channel_names": {str(c): CHANNEL_NAMES.get(dataset, "image") for c in range(channels)},
        "labels": {**{name: value for value, name in enumerate(names[:num_classes])}, "ignore": num_classes},
        "numTraining": len(train),
        "file_ending": ".nii.gz",
        "name": f"{dataset} with sparse labels",
    }
    (folder / "dataset.json").write_text(json.dumps(description, indent=2))


def _run(command: list[str], env: dict, log: Path) -> float:
    """Run one nnU-Net command, its output in `log`; its wall seconds. On failure, its last lines."""
    start = time.monotonic()
    with log.open("w") as out:
        done = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"{Path(command[0]).name} failed (exit {done.returncode}):\n{tail}")
    return seconds


def _plan_summary(preprocessed: Path) -> list[str]:
    plans = json.loads((preprocessed / DATASET / "nnUNetPlans.json").read_text())
    plan = plans["configurations"]["3d_fullres"]
    kwargs = plan.get("architecture", {}).get("arch_kwargs", {})
    return [f"patch {plan['patch_size']} (Z, Y, X) at spacing {[round(s, 3) for s in plan['spacing']]}, "
            f"batch {plan['batch_size']}, {kwargs.get('n_stages', '?')} stages, "
            f"features {kwargs.get('features_per_stage', '?')}, normalization {plan['normalization_schemes']}"]


def run(dataset: str, train_cases: list[str], test_cases: list[str], slices, ignore: int, seconds: float,
        folder: Path, tta: bool = True) -> dict:
    """Train nnU-Net on `train_cases`' sparse labels for `seconds`, segment `test_cases`.

    Returns the summed confusion matrix over the unseen cases ("confusion"), the iterations,
    the seconds of each stage and the plan.
    """
    _install_trainer()
    train = [volumes.load(c) for c in train_cases]
    test = [volumes.load(c) for c in test_cases]
    num_classes = max(v.num_classes for v in train + test)
    sparse = []
    for volume in train:
        labels = volume.truth if slices is None else sparsify(volume.truth, slices, ignore).astype(np.int64)
        sparse.append(np.where(labels == ignore, num_classes, labels))
    raw, preprocessed, results = folder / "raw", folder / "preprocessed", folder / "results"
    write_dataset(raw, dataset, train, sparse, test, num_classes)
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(preprocessed),
           "nnUNet_results": str(results), "UNET3D_BENCH_SECONDS": f"{seconds:g}"}
    bin_ = VENV / "bin"
    preprocess_s = _run([str(bin_ / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres",
                         "-np", PROCESSES, "-npfp", PROCESSES, "--verify_dataset_integrity", "--no_pbar"],
                        env, folder / "plan_and_preprocess.log")
    train_s = _run([str(bin_ / "nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "all", "-tr", TRAINER,
                    "-device", "cpu"], env, folder / "train.log")
    trained = results / DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_all"
    summary = json.loads((trained / "wall_time_training.json").read_text())
    predictions = folder / "predictions"
    predict_s = _run([str(bin_ / "nnUNetv2_predict"), "-i", str(raw / DATASET / "imagesTs"), "-o", str(predictions),
                      "-d", str(DATASET_ID), "-c", "3d_fullres", "-f", "all", "-tr", TRAINER,
                      "-chk", "checkpoint_final.pth", "-device", "cpu", "-npp", PROCESSES, "-nps", PROCESSES,
                      "--disable_progress_bar", *([] if tta else ["--disable_tta"])], env, folder / "predict.log")
    confusion = 0
    for volume in test:
        prediction = _read_nifti(predictions / f"{volume.name}.nii.gz").astype(np.int64)
        if prediction.shape != volume.truth.shape:
            raise SystemExit(f"{volume.name}: nnU-Net predicted shape {prediction.shape}, "
                             f"the truth has {volume.truth.shape}")
        confusion = confusion + confusion_matrix(prediction, volume.truth, num_classes)
    return {"method": METHOD, "confusion": confusion, "steps": summary["iterations"],
            "epochs": summary["epochs"], "preprocess_s": round(preprocess_s, 1), "s": round(train_s, 1),
            "train_loop_s": summary["seconds"], "predict_s": round(predict_s, 1), "tta": tta,
            "plan": _plan_summary(preprocessed)}
