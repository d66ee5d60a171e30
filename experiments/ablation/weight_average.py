"""Averaged weights against the last ones: does densify's network gain from an average of its iterates?

Usage: .venv/bin/python experiments/ablation/weight_average.py VOLUME SLICES SEED [BUDGET]

Trains densify's network once (its recipe, BUDGET CPU seconds, default 120, one thread) while
keeping exponential moving averages of the weights and batch-norm statistics (decays 0.9, 0.98)
and a uniform average of the last third of the steps' iterates (SWA); then predicts the volume
with each and prints one JSON line of foreground IoU on the unannotated voxels per set of
weights. One training run serves every arm, so the comparison is paired. The averages hook into
the training step here, in the experiment: no option of unet3d is involved.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_budget_config, load_volume, score_probabilities, training_set  # noqa: E402

from unet3d.inference import predict_array  # noqa: E402
from unet3d.training import trainer  # noqa: E402

EMA_DECAYS = (0.9, 0.98)
SWA_SHARE = 1 / 3  # the last third of the run, by CPU time (the schedule's progress measure)


class AveragingStep(trainer._Step):
    """densify's training step, followed by updates of the averaged copies of the network."""

    averages: dict = {}
    swa_from: float = 0.0  # the rate below which, once past the warm-up, the last third begins
    warmed_up: bool = False

    def __call__(self, images, targets, lr: float) -> float:
        loss = super().__call__(images, targets, lr)
        AveragingStep.warmed_up |= lr > self.swa_from
        if not self.averages:
            for decay in EMA_DECAYS:
                self.averages[f"ema{decay}"] = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(decay),
                                                             use_buffers=True)
            self.averages["swa"] = AveragedModel(self.model, use_buffers=True)
        for name, average in self.averages.items():
            if name != "swa" or (self.warmed_up and lr <= self.swa_from):
                average.update_parameters(self.model)
        return loss


def main() -> None:
    volume, slices, seed = sys.argv[1], tuple(int(k) for k in sys.argv[2].split(",")), int(sys.argv[3])
    budget = float(sys.argv[4]) if len(sys.argv) > 4 else 120.0
    torch.set_num_threads(1)
    image, truth, spacing = load_volume(volume)
    data, sparse = training_set(image, truth, slices, spacing)
    config = cpu_budget_config(data, budget, seed)
    # The cosine schedule's rate at 2/3 of the run: SWA averages the steps at or below it.
    AveragingStep.swa_from = config.learning_rate * trainer.learning_rate_factor(config.schedule, 1 - SWA_SHARE,
                                                                                  config.warmup)
    trainer._Step = AveragingStep
    with tempfile.TemporaryDirectory() as folder:
        result = trainer.train(config, data, Path(folder) / "model.safetensors", progress=False)
    models = {"last": result.model, **{name: average.module.eval() for name, average in AveragingStep.averages.items()}}
    row = {"volume": volume, "slices": list(slices), "seed": seed, "budget": budget, "iterations": result.iterations}
    for name, model in models.items():
        model = model.to(memory_format=torch.contiguous_format)
        probabilities = predict_array(model, data.images[0].numpy())
        row[name] = round(score_probabilities(probabilities, data, truth, sparse)["foreground"], 4)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
