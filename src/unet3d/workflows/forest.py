"""The forest beside a trained network: fitted on the annotated voxels of the training volumes,
weighed against the network on annotation neither of them trained on, stored in the model file.

Across scans the network leads ilastik's forest by far; within one microscopy volume the forest
can lead a network trained for minutes, most on thin classes. The user cannot know which case
theirs is, so `unet3d train` delivers both and lets held-out annotation decide the network's
weight in their geometric mean: the validation volumes when there are any, else whole blocks of
the annotation kept out of both models' training (as densify does).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass

import numpy as np

from unet3d.baselines.forest import fit_forest
from unet3d.data.features import bank_at
from unet3d.data.labels import UNLABELED
from unet3d.data.normalization import apply_normalization, for_volume
from unet3d.inference import predict_array
from unet3d.model import load_model, save_model
from unet3d.model.forest import ForestModel
from unet3d.workflows.blend import HeldOut, block_ids, choose_network_weight, hold_out_blocks

# The forest fits on a seeded sample of at most this many annotated voxels (its fit time grows
# faster than linearly; the forest baseline of the experiments uses the same cap).
FOREST_TRAIN_VOXELS = 100_000
FOREST_TREES = 100  # ilastik's default, and the most densify grows
# The forest's fit and prediction get at most this share of the time budget (fewer trees on large
# volumes): with 100 trees it took 134 of 200 CPU s on the ovule (3,3,2); with 30, 46 s, and the
# blend rose from 0.619 to 0.628 as the network trained 420 steps instead of 166.
FOREST_MAX_SHARE = 0.25
# However long the forest takes, the network trains for at least this share of the time budget.
MIN_TRAINING_SHARE = 0.25
# From this many annotated voxels densify keeps HOLD_OUT_SHARE of them, in whole blocks of the
# training patch's size, out of both models' training and weighs the network against the forest by
# what scores best on them (`blend.choose_network_weight`); below it the held-out set would be a
# few hundred voxels of a few blocks, and the plain geometric mean (measured to lead the forest on
# every small volume) is kept.
HOLD_OUT_MIN_ANNOTATED = 50_000
HOLD_OUT_SHARE = 0.1
# The bank of the forest's sample is made block by block, blocks of SAMPLE_BLOCK voxels drawn in a
# seeded order, for at most this share of the forest's time: spread over whole slices of a large
# volume, the sample's bank would otherwise cost about what the whole volume's does.
SAMPLE_BANK_SHARE = 0.5
SAMPLE_BLOCK = (16, 128, 128)
# Annotated voxels the weighing scores at most (a seeded sample): the network is predicted on the
# whole volumes, the forest's filter bank only around these voxels.
WEIGHING_VOXELS = 500_000


@dataclass
class Annotated:
    """Annotated voxels of one volume: the raw image (C, Z, Y, X) they lie in, the network's
    normalized input there (None: not needed), their flat indices and class indices, and the
    forest's filter bank of the whole image (F, Z, Y, X) where it was made already (else it is
    made around the voxels when needed)."""
    image: np.ndarray
    network_input: np.ndarray | None
    voxels: np.ndarray
    classes: np.ndarray
    features: np.ndarray | None = None


def annotated(image: np.ndarray, labels: np.ndarray, network_input: np.ndarray | None = None,
              features: np.ndarray | None = None) -> Annotated:
    """The annotated voxels of (Z, Y, X) class indices `labels` (-1 unlabeled)."""
    flat = labels.reshape(-1)
    voxels = np.flatnonzero(flat != UNLABELED)
    return Annotated(image, network_input, voxels, flat[voxels], features)


def subsample(volumes: list[Annotated], count: int, seed: int) -> list[Annotated]:
    """At most `count` voxels over all volumes, a seeded sample in proportion to each volume's."""
    total = sum(v.voxels.size for v in volumes)
    if total <= count:
        return volumes
    rng = np.random.default_rng(seed)
    keep = np.zeros(total, dtype=bool)
    keep[rng.choice(total, count, replace=False)] = True
    out, start = [], 0
    for volume in volumes:
        chosen = keep[start:start + volume.voxels.size]
        out.append(dataclasses.replace(volume, voxels=volume.voxels[chosen], classes=volume.classes[chosen]))
        start += volume.voxels.size
    return out


def bank_of(volume: Annotated, bank: dict, normalization: dict, block=None) -> np.ndarray:
    """(F, N) filter bank at the volume's annotated voxels, of its image normalized as the forest
    reads it; `block`: the grid the voxels were chosen in (`in_blocks`), made one box per block."""
    return features_at(volume, lambda: normalized_reader(volume.image, normalization), bank, volume.voxels, block)


def features_at(volume: Annotated, reader, bank: dict, voxels: np.ndarray, block=None) -> np.ndarray:
    """(F, N) filter bank at flat `voxels` of the volume: taken from its bank where it was made
    already, else made around them from `reader()` (box → normalized image), on the voxels' box
    in each `block` of a grid (None: bank_at's)."""
    if volume.features is not None:
        return volume.features.reshape(volume.features.shape[0], -1)[:, voxels]
    return bank_at(reader(), volume.image.shape[1:], bank, voxels, block)


def normalized_reader(image: np.ndarray, normalization: dict):
    """box → the (C, Z, Y, X) image there, normalized as the forest reads it."""
    shape = image.shape[1:]
    read = lambda box: image[(slice(None),) + box]  # noqa: E731
    fitted = for_volume(normalization, read, shape)
    return lambda box: apply_normalization(read(box), fitted)


def sample_features(volumes: list[Annotated], bank: dict, normalization: dict, seed: int,
                    seconds: float | None, count: int = FOREST_TRAIN_VOXELS) -> tuple[np.ndarray, np.ndarray]:
    """(F, N) filter bank and (N,) classes of a seeded sample of `count` annotated voxels, made block by block (SAMPLE_BLOCK voxels, in a seeded random order) for at most
    `seconds` (None: every block). The sample of a large volume spreads over whole slices, whose
    bank would cost as much as the volume's own: within the time, the blocks drawn keep it spread."""
    sample = subsample(volumes, count, seed)
    groups = []
    for index, volume in enumerate(sample):
        ids = block_ids(volume.voxels, volume.image.shape[1:], SAMPLE_BLOCK)
        order = np.argsort(ids, kind="stable")
        groups += [(index, members) for members in np.split(order, np.flatnonzero(np.diff(ids[order])) + 1)
                   if members.size]
    readers = [functools.cache(lambda volume=volume: normalized_reader(volume.image, normalization)) for volume in sample]
    started, features, classes = time.monotonic(), [], []
    for position in np.random.default_rng(seed).permutation(len(groups)):
        if seconds is not None and features and time.monotonic() - started > seconds:
            break
        index, members = groups[position]
        volume = sample[index]
        features.append(features_at(volume, readers[index], bank, volume.voxels[members]))
        classes.append(volume.classes[members])
    return np.concatenate(features, axis=1), np.concatenate(classes)


def fit_model_forest(volumes: list[Annotated], bank: dict, normalization: dict, num_classes: int, *,
                     seconds: float | None, seed: int, threads: int | None = None,
                     predict_voxels: int | None = None, samples: int = FOREST_TRAIN_VOXELS) -> ForestModel:
    """ilastik's forest on a seeded sample of `samples` annotated voxels of `volumes`,
    growing at most FOREST_TREES trees within `seconds`: the filter bank of the sample (at most
    SAMPLE_BANK_SHARE of them), the fit and, when `predict_voxels` is given, the prediction of that
    many voxels. Its network weight is the plain geometric mean's until `weigh` decides."""
    start = time.monotonic()
    features, classes = sample_features(volumes, bank, normalization, seed,
                                        None if seconds is None else SAMPLE_BANK_SHARE * seconds, samples)
    left = None if seconds is None else max(seconds - (time.monotonic() - start), 0.0)
    return forest_on_features(features, classes, bank, normalization, num_classes, seconds=left, seed=seed,
                              threads=threads, predict_voxels=predict_voxels, samples=samples)


def forest_on_features(features: np.ndarray, classes: np.ndarray, bank: dict, normalization: dict,
                       num_classes: int, *, seconds: float | None, seed: int, threads: int | None = None,
                       predict_voxels: int | None = None, samples: int = FOREST_TRAIN_VOXELS) -> ForestModel:
    """The forest fitted on the (F, N) filter bank `features` of annotated voxels of `classes` (a
    seeded sample of at most `samples`), within `seconds` as `fit_model_forest`."""
    forest = fit_forest(features, classes, np.arange(classes.size), FOREST_TREES, seed, samples, threads or -1,
                        seconds, predict_voxels=predict_voxels)
    return ForestModel(forest, num_classes, bank, normalization, 0.5)


def hold_out(labels: list[np.ndarray], block, seed: int, minimum: int = HOLD_OUT_MIN_ANNOTATED) -> list[HeldOut] | None:
    """Whole blocks of about HOLD_OUT_SHARE of each volume's annotation taken out of the (Z, Y, X)
    class indices `labels` (in place) to weigh the blend on; None with fewer than `minimum`
    annotated voxels (where the plain geometric mean is kept)."""
    if sum(int(np.count_nonzero(l >= 0)) for l in labels) < minimum:
        return None
    return [hold_out_blocks(l, HOLD_OUT_SHARE, tuple(min(b, n) for b, n in zip(block, l.shape)), seed + i)
            for i, l in enumerate(labels)]


def in_blocks(volume: Annotated, block, count: int, seed: int) -> Annotated:
    """The volume's voxels in at most `count` of the `block`-sized blocks they lie in (a seeded choice)."""
    shape = volume.image.shape[1:]
    ids = block_ids(volume.voxels, shape, block)
    present = np.unique(ids)
    chosen = np.random.default_rng(seed).choice(present, min(count, present.size), replace=False)
    keep = np.isin(ids, chosen)
    return dataclasses.replace(volume, voxels=volume.voxels[keep], classes=volume.classes[keep])


def network_at(network, volume: Annotated, device: str, block=None) -> np.ndarray:
    """(K, N) the network's probabilities at the volume's voxels: predicted on its whole normalized
    input, or (`block`) on each `block`-sized block holding voxels, grown by half a block of context."""
    shape = volume.image.shape[1:]
    if block is None:
        probabilities = predict_array(network, volume.network_input, device=device)
        return probabilities.reshape(probabilities.shape[0], -1)[:, volume.voxels]
    coordinates = np.stack(np.unravel_index(volume.voxels, shape))
    ids = block_ids(volume.voxels, shape, block)
    out = None
    for identifier in np.unique(ids):
        members = np.flatnonzero(ids == identifier)
        local = coordinates[:, members]
        box = tuple(slice(max(int(c.min()) - b // 2, 0), min(int(c.max()) + 1 + b // 2, n))
                    for c, b, n in zip(local, block, shape))
        probabilities = predict_array(network, volume.network_input[(slice(None),) + box], device=device)
        if out is None:
            out = np.empty((probabilities.shape[0], volume.voxels.size), np.float32)
        out[:, members] = probabilities[(slice(None),) + tuple(c - b.start for c, b in zip(local, box))]
    return out


def weigh(network, forest: ForestModel, volumes: list[Annotated], what: str, seed: int, device: str = "cpu",
          block=None) -> str:
    """Set `forest.network_weight` to what scores best on the annotated voxels of `volumes`
    (`network` predicted on their whole normalized inputs, or with `block` around the blocks
    holding voxels; the forest's filter bank only around the voxels); returns one line saying how
    it was weighed, on `what`."""
    volumes = subsample([v for v in volumes if v.voxels.size], WEIGHING_VOXELS, seed)
    network_probabilities = np.concatenate([network_at(network, v, device, block) for v in volumes], axis=1)
    forest_at = np.concatenate([forest.probabilities(bank_of(v, forest.bank, forest.normalization, block))
                                for v in volumes], axis=1)
    return settle_weight(forest, network_probabilities, forest_at, np.concatenate([v.classes for v in volumes]), what)


def settle_weight(forest: ForestModel, network: np.ndarray, forest_at: np.ndarray, classes: np.ndarray,
                  what: str, ties_to: float = 0.5) -> str:
    """Set `forest.network_weight` to what scores best with both models' (K, N) probabilities at
    annotated voxels of `classes` (ties: the weight nearest `ties_to`), keeping the scores as its
    evidence; one line saying so."""
    choice = choose_network_weight(network, forest_at, HeldOut(np.arange(classes.size), classes), ties_to)
    forest.network_weight = choice.network_weight
    forest.evidence = {"on": what, "voxels": int(classes.size),
                       "mean_iou": {"forest": choice.scores[0.0], "network": choice.scores[1.0],
                                    "blend": choice.scores[choice.network_weight]}}
    return choice.describe(int(classes.size)) + f" ({what})"


@dataclass
class ForestStage:
    """`unet3d train`'s forest: fitted before the network (its time taken out of the network's
    budget), weighed against each model file the run wrote, and stored in them."""
    train_images: list  # raw (C, Z, Y, X) images of the training volumes, in the training set's order
    validation_images: list  # and of the validation volumes
    seed: int = 0
    threads: int | None = None
    forest: ForestModel | None = None
    held: list[HeldOut] | None = None  # blocks held out of the training labels when there are no validation volumes

    def fit(self, data, validation, config, bank: dict, normalization: dict, processes, resume: bool = False):
        """Hold out blocks if there are no validation volumes, fit the forest on up to
        FOREST_MAX_SHARE of `config.max_time`, and return `config` with the network's budget less
        the forest's time (the same on every process; a resumed run keeps its budget)."""
        labels = [l.numpy() for l in data.labels]
        if validation is None:
            self.held = hold_out(labels, config.patch_shape, self.seed)
        seconds = None if config.max_time is None else FOREST_MAX_SHARE * config.max_time
        started = time.monotonic()
        self.forest = fit_model_forest([annotated(image, l) for image, l in zip(self.train_images, labels)], bank,
                                       normalization, len(data.class_values), seconds=seconds, seed=self.seed,
                                       threads=self.threads)
        spent = processes.leader_value(time.monotonic() - started)
        if processes.leader:
            print(f"forest: {self.forest.forest.n_estimators} trees on ilastik's filter bank in {spent:.0f} s")
        if config.max_time is None or resume:
            return config
        return dataclasses.replace(config, max_time=max(config.max_time - spent, MIN_TRAINING_SHARE * config.max_time))

    def evaluation(self, data, validation) -> tuple[list[Annotated], str]:
        """The annotated voxels neither model trained on, and what they are."""
        if validation is not None:
            volumes = [annotated(raw, l.numpy(), x.numpy())
                       for raw, l, x in zip(self.validation_images, validation.labels, validation.images)]
            return volumes, f"the annotation of {len(volumes)} validation volume(s)"
        if self.held is None:
            return [], ""
        return ([Annotated(raw, x.numpy(), held.voxels, held.classes)
                 for raw, x, held in zip(self.train_images, data.images, self.held)],
                "annotated blocks held out of both models' training")

    def weigh_and_store(self, paths, data, validation, device: str = "cpu") -> None:
        """Weigh the forest against the network of each model file in `paths` that exists, and store
        it there (not where the network alone scores best, weight 1)."""
        volumes, what = self.evaluation(data, validation)
        for path in (p for p in paths if p.exists()):
            network, info = load_model(path)
            if volumes:
                line = weigh(network, self.forest, volumes, what, self.seed, device)
            else:
                self.forest.network_weight = 0.5
                line = "equal weights in the geometric mean: too few annotated voxels to hold any out"
            keep = self.forest.network_weight < 1
            save_model(path, network, info, self.forest if keep else None)
            print(f"{path}: {line}; {'forest stored' if keep else 'the network alone, no forest stored'}")
