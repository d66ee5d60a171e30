"""Several networks, each on a share of the budget, their probabilities averaged.

Usage: .venv/bin/python experiments/ablation/ensemble.py VOLUME SLICES SEED BUDGET [notta] [members=N]
       [forest_blend options]
  members=N  networks trained one after the other, each for 1/N of the network's CPU time and with
             its own seed (SEED, SEED+1, ...); default 2

At the goal's budget a network gets a couple of hundred steps, and the result varies from seed to
seed by more than most ideas change it (hippocampus_006 at one slice per axis: 0.50 to 0.65). An
average of networks trained from different seeds varies less, at the price of fewer steps each.
The rest is forest_blend.py's run: the averaged probabilities (each member's with test-time flips
where the run takes them) are blended with the forest; prints its JSON line with "members" and
"member_iterations".
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from experiments.ablation import forest_blend


class Members(list):
    """The trained networks of one ensemble, in place of TrainResult.model."""


def ensemble_train(count: int, record: dict):
    densify_train = forest_blend.train

    def run(config, data, output, **options):
        results = [densify_train(dataclasses.replace(config, max_time=config.max_time / count, seed=config.seed + i),
                                 data, output, **options) for i in range(count)]
        record["member_iterations"] = [r.iterations for r in results]
        return dataclasses.replace(results[-1], model=Members(r.model for r in results),
                                   iterations=sum(r.iterations for r in results))

    return run


def ensemble_predict():
    densify_predict = forest_blend.predict_array

    def run(model, image, **options):
        if isinstance(model, Members):
            return np.mean([densify_predict(m, image, **options) for m in model], axis=0)
        return densify_predict(model, image, **options)

    return run


if __name__ == "__main__":
    arguments, count = forest_blend.take_option(sys.argv, "members", 2, int)
    record = {"members": count}
    forest_blend.train = ensemble_train(count, record)
    forest_blend.predict_array = ensemble_predict()
    print(json.dumps(forest_blend.run_from_arguments(arguments, __doc__) | record))
