"""Data-parallel training over several processes, as torchrun starts them.

torchrun (or any launcher that sets RANK, WORLD_SIZE and LOCAL_RANK, MASTER_ADDR and MASTER_PORT)
starts one process per GPU, each on cuda:LOCAL_RANK with NCCL, or several on CPUs with gloo.
Every process holds the data, draws its own share of each batch (training.dataset.PatchBatches)
and runs the same steps; DistributedDataParallel averages the gradients. What makes N processes
train like one process with N times the batch:

- the loss is the single-process loss of the whole global batch: each process sums its
  cross-entropy (and Dice) terms and the annotated voxels' weights, the sums are all-reduced
  through autograd and the loss is formed from the totals. A process with few annotated voxels
  thus weighs exactly as much as its voxels, and soft Dice is batch Dice over the global batch;
- batch norm pools its statistics over all processes (SyncBatchNorm);
- decisions that depend on a clock (--max-time, the schedule's progress) use process 0's clock,
  sent to all every step, so no process waits in a collective the others have left.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from unet3d.device import resolve_device
from unet3d.errors import UserError
from unet3d.losses.cross_entropy import cross_entropy_from_sums, cross_entropy_sums
from unet3d.losses.dice import dice_from_sums, dice_sums
from unet3d.losses.factory import LOSSES

DEFAULT_TIMEOUT = 600.0  # seconds a process waits for the others: to join, and in every collective


@dataclass(frozen=True)
class Processes:
    """This process's place among those training together; the default is training alone, where
    every exchange below returns its argument."""

    rank: int = 0
    count: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def leader(self) -> bool:
        """Process 0 writes the files and keeps the clock."""
        return self.rank == 0

    def parallel(self, model: nn.Module) -> nn.Module:
        """The module to train: `model` alone, or a DistributedDataParallel over a view of it whose
        batch norms are synchronized (sharing every parameter and buffer with `model`)."""
        if self.count == 1:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(with_synchronized_batch_norm(model), device_ids=device_ids)

    def leader_value(self, value: float) -> float:
        """Process 0's `value`, on every process."""
        if self.count == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(tensor, src=0)
        return float(tensor)

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any process."""
        if self.count == 1:
            return flag
        tensor = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor)

    def sum(self, array: np.ndarray) -> np.ndarray:
        """The element-wise sum of `array` over all processes."""
        if self.count == 1:
            return array
        tensor = torch.as_tensor(array, device=self.device)
        dist.all_reduce(tensor)
        return tensor.cpu().numpy()

    def barrier(self) -> None:
        if self.count > 1:
            dist.barrier()

    @contextlib.contextmanager
    def failures_reported(self, checkpoint) -> Iterator[None]:
        """A failed exchange with the other processes (one was killed, or stopped answering) as one
        line instead of a traceback; the last checkpoint can be resumed."""
        try:
            yield
        except RuntimeError as exc:
            if self.count == 1 or not _communication_error(exc):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise UserError(f"process {self.rank} of {self.count}: another training process stopped or stopped "
                            f"answering ({first}); resume from {checkpoint} with --resume") from None


def _communication_error(exc: RuntimeError) -> bool:
    message = str(exc)
    return isinstance(exc, dist.DistError) or any(
        word in message for word in ("gloo", "NCCL", "Connection closed", "Connection reset", "imed out"))


def from_environment(environment=os.environ) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) as torchrun sets them, or None when started alone."""
    if int(environment.get("WORLD_SIZE", "1")) <= 1:
        return None
    try:
        return int(environment["RANK"]), int(environment["WORLD_SIZE"]), int(environment.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise UserError("WORLD_SIZE is set but RANK is not: start the processes with torchrun") from None


def process_device(name: str, local_rank: int) -> torch.device:
    """A process's device: with CUDA (asked for, or 'auto' where there is one) the GPU of its local
    rank, else the CPU; a fixed cuda:N would put every process on one GPU."""
    if name.startswith("cuda:"):
        raise UserError(f"--device {name}: with several processes each takes cuda:LOCAL_RANK; give cuda or auto")
    device = resolve_device(name)
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


@contextlib.contextmanager
def joined(device_name: str = "auto", timeout: float = DEFAULT_TIMEOUT) -> Iterator[Processes]:
    """The processes torchrun started, joined for the duration of the block (NCCL on GPUs, gloo on
    CPUs); started alone, Processes() on the device `device_name` resolves to.

    `timeout` bounds the wait for the others to join and every exchange during training: a
    process that never arrives gives a one-line error instead of a hang.
    """
    place = from_environment()
    if place is None:
        yield Processes(device=resolve_device(device_name))
        return
    rank, count, local_rank = place
    device = process_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, rank=rank, world_size=count, timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as exc:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"process {rank} of {count}: the training processes did not all join at {where} within "
                        f"{timeout:g} s ({first})") from None
    try:
        yield Processes(rank, count, device)
    finally:
        dist.destroy_process_group()


class _AllReduce(torch.autograd.Function):
    """Sum over processes whose gradient is the sum over processes of the incoming gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> torch.Tensor:
        total = gradient.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


def summed_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over all processes, differentiably."""
    return _AllReduce.apply(tensor)


# ----------------------------------------------------------------------------- batch norm


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are those of every process's batch together, on the CPU.

    torch's SyncBatchNorm has no CPU kernel (and DistributedDataParallel refuses it on CPU
    modules): here the same statistics come from sums all-reduced through autograd, two
    exchanges per layer (the mean, then the variance about it, which keeps float32 accurate).
    Running statistics are updated as F.batch_norm updates them for the whole batch, so they
    stay the same on every process.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.full((1,), x.numel() // x.shape[1], dtype=x.dtype)
        totals = summed_over_processes(torch.cat([x.sum(dims), count]))
        voxels = totals[-1]
        mean = totals[:-1] / voxels
        centered = x - mean.reshape(shape)
        variance = summed_over_processes((centered * centered).sum(dims)) / voxels
        y = centered * torch.rsqrt(variance + self.eps).reshape(shape)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats:
            self._update_running_statistics(mean.detach(), variance.detach() * voxels / (voxels - 1))
        return y

    @torch.no_grad()
    def _update_running_statistics(self, mean: torch.Tensor, unbiased_variance: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(unbiased_variance, alpha=momentum)


def with_synchronized_batch_norm(module: nn.Module) -> nn.Module:
    """A view of `module` whose batch norms pool their statistics over all processes (torch's
    SyncBatchNorm on GPUs, CPUSyncBatchNorm on the CPU), sharing every parameter and buffer.

    Unlike nn.SyncBatchNorm.convert_sync_batchnorm this leaves `module` as it is (its own batch
    norm class, e.g. one that normalizes with batch statistics at test time), and `module` always
    holds the trained state: it is what is validated, saved and returned.
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        on_cpu = all(t.device.type == "cpu" for t in itertools.chain(module.parameters(), module.buffers()))
        synced = (CPUSyncBatchNorm if on_cpu else nn.SyncBatchNorm)(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        synced._parameters, synced._buffers = module._parameters, module._buffers
        synced.train(module.training)
        return synced
    view = copy.copy(module)
    view.__dict__["_modules"] = {name: with_synchronized_batch_norm(child) for name, child in module._modules.items()}
    return view


# ----------------------------------------------------------------------------- loss


def global_loss(name: str, class_weights: torch.Tensor | None = None,
                dice_weight: float = 1.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """make_loss(name)'s loss of all processes' batches together, on every process.

    Each process sums its terms — Σ w·CE and Σ w over annotated voxels (w: class weight), and for
    "dice_ce" per class the soft intersection, predicted and annotated sums — the sums are
    all-reduced through autograd, and the loss is formed from the totals exactly as the
    single-process loss forms it from one batch. Every process thus gets the same loss value,
    and the gradients DistributedDataParallel averages are those of that global loss: the
    all-reduce's backward sums the N identical upstream gradients, the average divides by N.
    """
    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        sums = [torch.stack(cross_entropy_sums(logits, target, class_weights))]
        if name == "dice_ce":
            sums += dice_sums(logits, target)
        totals = summed_over_processes(torch.cat(sums))
        value = cross_entropy_from_sums(totals[0], totals[1])
        if name == "dice_ce":
            value = value + dice_weight * dice_from_sums(*totals[2:].reshape(3, logits.shape[1]))
        return value

    if name not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
    return loss
