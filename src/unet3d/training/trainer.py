"""The optimisation loop: plain functions around one for-loop, no trainer class to subclass."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from unet3d.data.labels import class_counts, class_weights
from unet3d.errors import UserError
from unet3d.evaluation.metrics import confusion_matrix, scores
from unet3d.inference import predict_array
from unet3d.losses import make_loss
from unet3d.model import ModelInfo, UNet, save_model
from unet3d.progress import progress_bar
from unet3d.training.checkpoint import load_checkpoint, run_files, save_checkpoint
from unet3d.training.config import TrainConfig
from unet3d.training.dataset import PatchBatches, TrainingSet, training_batches
from unet3d.training.distributed import Processes, global_loss
from unet3d.training.history import plot_curve, write_log
from unet3d.training.schedule import learning_rate_factor, make_optimizer, run_progress


@dataclass
class TrainResult:
    model: UNet
    info: ModelInfo
    iterations: int
    seconds: float
    stopped_by: str  # "iterations" or "time"
    history: list[dict] = field(default_factory=list)


def patch_geometry(config: TrainConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input, output) patch shapes: the requested input rounded to the nearest valid size."""
    geometry = config.network.geometry
    down = geometry.valid_input_shape(config.patch_shape, "down")
    up = geometry.valid_input_shape(config.patch_shape, "up")
    input_shape = tuple(d if d is not None else u for d, u in zip(down, up))
    return input_shape, geometry.output_shape(input_shape)


def model_info(config: TrainConfig, data: TrainingSet, iterations: int, seconds: float) -> ModelInfo:
    """The description stored in the model file: everything prediction needs, and provenance."""
    input_shape, output_shape = patch_geometry(config)
    return ModelInfo(
        class_values=list(data.class_values), normalization=data.normalization,
        input_features=data.input_features or None, ignore_label=data.ignore_label, spacing=list(data.spacing),
        patch_shape=list(input_shape), output_shape=list(output_shape),
        training={"iterations": iterations, "seconds": round(seconds, 1), "sources": data.sources,
                  "config": config.to_dict()})


def train(config: TrainConfig, data: TrainingSet, output, *, validation: TrainingSet | None = None,
          resume: bool = False, device: str = "cpu", progress: bool = True, network: UNet | None = None,
          on_step: Callable[[UNet, int, float], bool] | None = None, batches: Dataset | None = None,
          step: Callable[["Step", torch.Tensor, torch.Tensor, float], float] | None = None,
          processes: Processes | None = None) -> TrainResult:
    """Train on sparse labels; writes the model, checkpoint, log and curve next to `output`.

    `network` starts training from that network (fine-tuning, or a variant of UNet) instead of a
    freshly initialised one; its configuration must be `config.network`. `on_step(model, iteration,
    loss)` runs after every step, in the training thread (progress, previews); True stops the run
    there, which is then reported as stopped by "request".

    Variants of the loop are passed in, never patched in: `batches[i]` gives (images, targets) of
    iteration i instead of PatchBatches (see patch_geometry for the shapes), and
    `step(default, images, targets, lr) -> loss` replaces the optimisation step, with `default`, the
    standard Step (its model, optimizer and loss_fn), there to call or extend.

    `processes` (distributed.joined) trains data-parallel: `config.batch_size` patches per process,
    the loss and batch norm over all of them, files written by process 0, every process returning
    the same network.
    """
    processes = processes or Processes(device=torch.device(device))
    config = dataclasses.replace(config, processes=processes.count)
    files = run_files(output)
    if data.channels != config.network.in_channels or len(data.class_values) != config.network.num_classes:
        raise UserError("the network's channels or classes do not match the training data")
    if network is not None and network.config != config.network:
        raise UserError("the network to start from does not have the configuration being trained")
    torch.manual_seed(config.seed)
    model = (network if network is not None else UNet(config.network)).to(device)
    optimizer = make_optimizer(config.optimizer, model.parameters(), config.learning_rate,
                               config.momentum, config.weight_decay)
    state = {"iteration": 0, "elapsed": 0.0, "history": [], "best": None}
    if resume:
        state = _restore(files["checkpoint"], config, model, optimizer)
    counts = class_counts([l.numpy() for l in data.labels], len(data.class_values))
    weights = torch.tensor(class_weights(counts, config.class_weighting, config.class_weights), dtype=torch.float32,
                           device=device)
    loss_fn = make_loss(config.loss, weights) if processes.count == 1 else global_loss(config.loss, weights)
    input_shape, output_shape = patch_geometry(config)
    if batches is None:
        batches = PatchBatches(data, input_shape, output_shape, config.batch_size, config.augmentation, config.seed,
                               processes.rank, processes.count)
    channels_last = config.channels_last and config.network.dims == 3
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)

    default_step = Step(processes.parallel(model), optimizer, loss_fn, config, device, channels_last)
    run_step = default_step if step is None else functools.partial(step, default_step)
    clock = _Clock(state["elapsed"], config.clock)
    last_checkpoint = time.monotonic()
    stopped_by = "iterations"
    iteration = state["iteration"]
    bar = TrainingBar(config, iteration, clock.elapsed(), disable=not (progress and processes.leader))
    voxels = config.batch_size * processes.count * math.prod(output_shape)
    with processes.failures_reported(files["checkpoint"]):
        for images, targets in training_batches(batches, iteration, config.iterations, config.workers, device):
            elapsed = processes.leader_value(clock.elapsed())
            if config.max_time is not None and elapsed >= config.max_time:
                stopped_by = "time"
                break
            fraction = run_progress(iteration, config.iterations, elapsed, config.max_time)
            lr = config.learning_rate * learning_rate_factor(config.schedule, fraction, config.warmup)
            loss = run_step(images, targets, lr)
            if not math.isfinite(loss):  # the loss is the same on every process: all stop here
                if processes.leader:
                    _save(files, model, config, data, state, optimizer, write_checkpoint=False)
                raise UserError(f"loss became {loss} at iteration {iteration + 1}; stopped. The last good "
                                f"checkpoint is kept in {files['checkpoint']} (try a lower --lr)")
            iteration += 1
            bar.step(iteration, clock.elapsed())
            if on_step is not None and processes.any(on_step(model, iteration, loss)):
                stopped_by = "request"
                break
            if iteration % config.log_every == 0 or iteration == config.iterations:
                state["history"].append({"iteration": iteration, "loss": loss, "lr": lr,
                                         "seconds": round(clock.elapsed(), 2)})
                bar.show(loss=f"{loss:.4f}", vox_s=f"{voxels * iteration / max(clock.elapsed(), 1e-9):.3g}")
            if validation is not None and iteration % config.validate_every == 0:
                _validate_and_keep_best(model, validation, state, iteration, files, config, data, device, clock,
                                        processes)
            state["iteration"], state["elapsed"] = iteration, clock.elapsed()
            if processes.leader and time.monotonic() - last_checkpoint >= config.checkpoint_every:
                _save(files, model, config, data, state, optimizer)
                last_checkpoint = time.monotonic()
        bar.close()
        state["iteration"], state["elapsed"] = iteration, clock.elapsed()
        if validation is not None and (not state["history"] or "val_mean_iou" not in state["history"][-1]):
            _validate_and_keep_best(model, validation, state, iteration, files, config, data, device, clock, processes)
        if processes.leader:
            _save(files, model, config, data, state, optimizer)
        processes.barrier()  # on return, every process's model file is written
    model = model.to(memory_format=torch.contiguous_format).eval()
    return TrainResult(model, model_info(config, data, iteration, state["elapsed"]), iteration,
                       state["elapsed"], stopped_by, state["history"])


class TrainingBar:
    """Progress in what bounds the run: seconds of the budget when there is one (a cap of 100,000
    steps would promise hours), else steps; the step count and loss beside it."""

    def __init__(self, config: TrainConfig, iteration: int, elapsed: float, disable: bool):
        self.by_time = config.max_time is not None
        total = math.ceil(config.max_time) if self.by_time else config.iterations
        self.bar = progress_bar(total, initial=min(int(elapsed), total) if self.by_time else iteration,
                                unit="s" if self.by_time else "it", desc="train", disable=disable)
        self.iteration = iteration

    def step(self, iteration: int, elapsed: float) -> None:
        self.iteration = iteration
        self.bar.update(min(int(elapsed), self.bar.total) - self.bar.n if self.by_time else 1)

    def show(self, **values) -> None:
        if self.by_time:
            values = {"step": self.iteration, **values}
        self.bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        self.bar.close()


class Step:
    """One optimisation step: forward, masked loss, backward, update; returns the loss."""

    def __init__(self, model, optimizer, loss_fn, config: TrainConfig, device, channels_last: bool):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.device = device
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.amp = config.amp and str(device).startswith("cuda")

    def __call__(self, images, targets, lr: float) -> float:
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        targets = targets.to(self.device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            logits = self.model(images)
        loss = self.loss_fn(logits.float(), targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


class _Clock:
    """Training seconds (wall, or CPU of this process), continuing from what earlier runs spent."""

    def __init__(self, already: float, kind: str = "wall"):
        self.now = time.process_time if kind == "cpu" else time.monotonic
        self.start = self.now() - already

    def elapsed(self) -> float:
        return self.now() - self.start


def _restore(path: Path, config: TrainConfig, model, optimizer) -> dict:
    checkpoint = load_checkpoint(path)
    stored = TrainConfig.from_dict(checkpoint["config"])
    if stored.network != config.network:
        raise UserError(f"{path}: the checkpoint was trained with another network configuration")
    if stored.processes != config.processes:
        raise UserError(f"{path}: the checkpoint was trained by {stored.processes} process(es); resume it with as "
                        f"many (each process draws its share of every batch), not {config.processes}")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    return {key: checkpoint[key] for key in ("iteration", "elapsed", "history", "best")}


def _save(files, model, config, data, state, optimizer, write_checkpoint: bool = True) -> None:
    """Model file, resumable checkpoint, log and curve — each written atomically."""
    if write_checkpoint:
        clean = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_checkpoint(files["checkpoint"], {
            "model": clean, "optimizer": optimizer.state_dict(), "config": config.to_dict(),
            **{key: state[key] for key in ("iteration", "elapsed", "history", "best")},
        })
        save_model(files["model"], model, model_info(config, data, state["iteration"], state["elapsed"]))
    write_log(files["log"], state["history"])
    plot_curve(files["curve"], state["history"])


def _validate_and_keep_best(model, validation, state, iteration, files, config, data, device, clock,
                            processes: Processes) -> None:
    result = validate(model, validation, device, processes)
    state["history"].append({"iteration": iteration, "seconds": round(clock.elapsed(), 2), **result})
    if state["best"] is None or result["val_mean_iou"] > state["best"]:
        state["best"] = result["val_mean_iou"]
        if processes.leader:
            save_model(files["best"], model, model_info(config, data, iteration, clock.elapsed()))


def validate(model, validation: TrainingSet, device: str = "cpu", processes: Processes | None = None) -> dict:
    """IoU per class on the annotated voxels of held-out volumes (their -1 voxels are ignored).

    With several processes each predicts every N-th volume and the counts are summed, so all
    get the same result (and none waits long for the others in its next exchange).
    """
    processes = processes or Processes()
    k = len(validation.class_values)
    confusion = np.zeros((k, k), dtype=np.int64)
    volumes = list(zip(validation.images, validation.labels))[processes.rank::processes.count]
    for image, labels in volumes:
        probabilities = predict_array(model, image.numpy(), device=device)
        truth = labels.numpy()
        confusion += confusion_matrix(probabilities.argmax(0), truth, k, mask=truth >= 0)
    result = scores(processes.sum(confusion), validation.class_values, background=None)
    return {"val_mean_iou": result["mean_iou"], "val_iou": [c["iou"] for c in result["classes"]]}
