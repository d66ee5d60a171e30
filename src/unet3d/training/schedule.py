"""Optimizers and learning-rate schedules driven by the fraction of the run completed.

The fraction is the larger of iterations done / iterations and seconds spent / max_time, so a
run stopped by a time budget still gets its full warm-up and annealing.
"""

from __future__ import annotations

import math

import torch


def make_optimizer(name: str, parameters, learning_rate: float, momentum: float, weight_decay: float):
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=learning_rate, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    return torch.optim.Adam(parameters, lr=learning_rate, weight_decay=weight_decay)


def learning_rate_factor(schedule: str, progress: float, warmup: float = 0.0) -> float:
    """Multiplier of the base learning rate at `progress` ∈ [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "onecycle":
        warmup = warmup or 0.3
    if warmup and progress < warmup:
        return max(progress / warmup, 0.01)
    rest = (progress - warmup) / (1.0 - warmup) if warmup < 1.0 else 1.0
    if schedule == "cosine" or schedule == "onecycle":
        return 0.5 * (1.0 + math.cos(math.pi * rest)) * 0.99 + 0.01
    if schedule == "poly":
        return (1.0 - rest) ** 0.9 * 0.99 + 0.01
    return 1.0


def run_progress(iteration: int, iterations: int, elapsed: float, max_time: float | None) -> float:
    by_iterations = iteration / iterations if iterations else 1.0
    by_time = elapsed / max_time if max_time else 0.0
    return max(by_iterations, by_time)
