"""Everything that defines a training run, stored in checkpoints and model files."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from unet3d.augmentation import AugmentationConfig
from unet3d.data.labels import WEIGHT_MODES as CLASS_WEIGHTING
from unet3d.losses.factory import LOSSES
from unet3d.model.unet import UNetConfig

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle", "poly")
CLOCKS = ("wall", "cpu")


@dataclass
class TrainConfig:
    network: UNetConfig
    patch_shape: tuple[int, int, int] = (116, 132, 132)  # network input patch (Z, Y, X)
    batch_size: int = 1
    iterations: int = 2000
    max_time: float | None = None  # seconds; the schedule anneals over whichever limit comes first
    clock: str = "wall"  # what max_time counts: wall seconds, or this process's CPU seconds (shared machines)
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.99  # SGD only (the original U-Net's value)
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup: float = 0.0  # fraction of the run with a linearly rising rate
    loss: str = "ce"
    class_weighting: str = "inverse_sqrt"
    class_weights: list[float] | None = None  # manual weights override class_weighting
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    seed: int = 0
    workers: int = 0  # DataLoader processes preparing patches while the network trains
    processes: int = 1  # data-parallel processes, each drawing batch_size patches of every batch (set by train)
    channels_last: bool = True
    amp: bool = False  # mixed precision (CUDA only)
    checkpoint_every: float = 60.0  # seconds between checkpoints
    validate_every: int = 200  # iterations; only with validation volumes
    log_every: int = 10
    plan: dict | None = None  # how `unet3d train` planned this run, each choice with its reason (workflows.plan)

    def __post_init__(self):
        for value, allowed, name in (
            (self.optimizer, OPTIMIZERS, "optimizer"),
            (self.schedule, SCHEDULES, "schedule"),
            (self.loss, LOSSES, "loss"),
            (self.class_weighting, CLASS_WEIGHTING, "class weighting"),
            (self.clock, CLOCKS, "clock"),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.batch_size < 1 or self.iterations < 0 or self.learning_rate <= 0 or self.processes < 1:
            raise ValueError("batch size ≥ 1, iterations ≥ 0, a positive learning rate and processes ≥ 1 are required")
        self.patch_shape = tuple(self.patch_shape)

    def to_dict(self) -> dict:
        values = asdict(self)
        values["network"] = self.network.to_dict()
        values["augmentation"] = self.augmentation.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        values = {k: v for k, v in values.items() if k != "normalization"}  # a field of older model files
        values["network"] = UNetConfig.from_dict(values["network"])
        values["augmentation"] = AugmentationConfig.from_dict(values["augmentation"])
        return cls(**values)
