"""nnU-Net v2 trainer bounded by wall-clock seconds instead of epochs, for benchmarks/bench_train.py.

benchmarks/peers.sh copies this file into the top level of nnunetv2/training/nnUNetTrainer/ of
.venv-bench, where `nnUNetv2_train ... -tr nnUNetTrainerWallTime` finds it (nnU-Net looks a
trainer up by class name among the modules of that folder).

Everything but the length of training is nnU-Net's own: the plan's network, patch and batch
size, its data augmentation in its background processes, its Dice + cross-entropy loss with deep
supervision (partial on annotated voxels when dataset.json has an "ignore" label), SGD with
Nesterov momentum from lr 0.01 with the polynomial schedule lr = 0.01 · (1 − progress)^0.9.
What differs, so that training fits a wall budget on a CPU:

- The budget: UNET3D_BENCH_SECONDS (wall seconds, default 600). The clock starts at the first
  training iteration, after nnU-Net has built the network and started its data loaders (the
  same point `unet3d train --max-time` starts its clock); training stops before the first
  iteration that would start past the budget, so it overruns by at most one iteration.
- The schedule: progress is the elapsed fraction of the budget, set before every iteration,
  instead of epoch / 1000 set at the start of each epoch.
- Epochs of UNET3D_BENCH_EPOCH_ITERATIONS iterations (default 25, nnU-Net: 250): an epoch only
  groups iterations for the log, which shows the mean training loss per epoch.
- No validation: nnU-Net's per-epoch pseudo-Dice on 50 validation patches and its final
  sliding-window validation of every case are skipped (with fold "all" the validation cases are
  the training cases, so they would cost budget and time without telling anything). The model
  kept is the last one, checkpoint_final.pth, written when the budget ends; there is no
  checkpoint_best.pth.
- A summary, wall_time_training.json beside the checkpoint: iterations, epochs, seconds.
"""

from __future__ import annotations

import json
import os
import time
from os.path import join

import numpy as np
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

BUDGET_VARIABLE = "UNET3D_BENCH_SECONDS"
EPOCH_VARIABLE = "UNET3D_BENCH_EPOCH_ITERATIONS"


class nnUNetTrainerWallTime(nnUNetTrainer):
    """nnUNetTrainer trained for UNET3D_BENCH_SECONDS wall seconds (see the module's docstring)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.budget_seconds = float(os.environ.get(BUDGET_VARIABLE, "600"))
        self.num_iterations_per_epoch = int(os.environ.get(EPOCH_VARIABLE, "25"))
        self.num_val_iterations_per_epoch = 0
        self.poly_exponent = 0.9  # nnU-Net's PolyLRScheduler
        self.iterations_done = 0
        self.training_seconds = 0.0

    def _set_learning_rate(self, progress: float) -> float:
        lr = self.initial_lr * (1 - min(progress, 1.0)) ** self.poly_exponent
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def run_training(self):
        self.on_train_start()
        self.print_to_log_file(f"Wall budget: {self.budget_seconds:g} s, {self.num_iterations_per_epoch} "
                               "iterations per epoch, no validation")
        start = time.monotonic()
        elapsed = 0.0
        while elapsed < self.budget_seconds:
            self.on_epoch_start()
            self.network.train()
            lr_first = self._set_learning_rate(elapsed / self.budget_seconds)
            self.logger.log("lrs", lr_first, self.current_epoch)
            losses = []
            for _ in range(self.num_iterations_per_epoch):
                elapsed = time.monotonic() - start
                if elapsed >= self.budget_seconds:
                    break
                self._set_learning_rate(elapsed / self.budget_seconds)
                losses.append(self.train_step(next(self.dataloader_train)))
                self.iterations_done += 1
            elapsed = time.monotonic() - start
            if losses:
                self.on_train_epoch_end(losses)
            self.logger.log("epoch_end_timestamps", time.time(), self.current_epoch)
            loss = f"{np.mean([o['loss'] for o in losses]):.4f}" if losses else "–"
            self.print_to_log_file(f"Epoch {self.current_epoch}: {len(losses)} iterations, train loss {loss}, "
                                   f"lr {lr_first:.5f} at its start, {elapsed:.1f} s of {self.budget_seconds:g} s")
            self.current_epoch += 1
        self.training_seconds = elapsed
        self.on_train_end()  # writes checkpoint_final.pth
        summary = {"iterations": self.iterations_done, "epochs": self.current_epoch,
                   "seconds": round(self.training_seconds, 2), "budget_seconds": self.budget_seconds,
                   "batch_size": self.batch_size, "patch_size": list(self.configuration_manager.patch_size)}
        with open(join(self.output_folder, "wall_time_training.json"), "w") as out:
            json.dump(summary, out)
        self.print_to_log_file(f"trained {self.iterations_done} iterations in {self.training_seconds:.1f} s")

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("Final validation skipped: the benchmark scores unseen cases itself")
