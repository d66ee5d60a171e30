#!/usr/bin/env bash
# Creates (or completes) .venv-bench: unet3d plus the peer libraries the benchmarks compare with,
# kept out of the product environment so .venv stays small.
#   pytorch-3dunet: installed without its training extras (tensorboard, torchvision); the model
#   code needs only scikit-image and PyYAML besides torch.
#   MONAI: BasicUNet, UNet, sliding_window_inference and the augmentation transforms.
#   elasticdeform: built from source, as its published wheel is compiled against NumPy 1 and
#   fails to import under NumPy 2.
#   nnU-Net v2: with torchvision pinned to the release built for torch 2.13 (a newer one pulls
#   another torch). nnU-Net finds a trainer by name among the modules of its nnUNetTrainer
#   folder, and its subfolders import torchvision, which fails to import beside the CPU build of
#   torch ("operator torchvision::nms does not exist"): the wall-time trainer the benchmarks use
#   (benchmarks/peers/nnUNetTrainerWallTime.py) is copied to the top of that folder, where
#   nnU-Net finds it before looking into the subfolders.
# Usage: bash benchmarks/peers.sh   (from the repository root; TORCH=... to pick another build)
set -euo pipefail
VENV="${VENV_BENCH:-.venv-bench}"
TORCH="${TORCH:-torch==2.13.0}"
test -x "$VENV/bin/python" || python3 -m venv "$VENV"
# Naming torch on every install keeps pip from swapping the CPU build for another one.
"$VENV/bin/pip" install --quiet "$TORCH" scikit-image pyyaml monai==1.6.1 onnx onnxruntime
"$VENV/bin/pip" install --quiet --no-deps pytorch3dunet==1.9.6
"$VENV/bin/pip" install --quiet --no-binary elasticdeform elasticdeform==0.5.1
"$VENV/bin/pip" install --quiet "$TORCH" torchvision==0.28.0 nnunetv2==2.8.1
"$VENV/bin/pip" install --quiet "$TORCH" -e .  # with unet3d's own dependencies
TRAINERS="$("$VENV/bin/python" -c 'import nnunetv2, pathlib; print(pathlib.Path(nnunetv2.__file__).parent / "training" / "nnUNetTrainer")')"
cp benchmarks/peers/nnUNetTrainerWallTime.py "$TRAINERS/"
"$VENV/bin/python" -c "import monai, pytorch3dunet.unet3d.model, unet3d, nnunetv2, torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainerWallTime import nnUNetTrainerWallTime
print('peer environment ready:', '$VENV', 'torch', torch.__version__)"
