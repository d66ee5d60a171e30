"""Paint, train, look, paint again: the interactive loop without any GUI.

A `Session` holds one image and the network being trained on what has been painted on it. Each
round trains densify's recipe on the current painting for a few seconds, starting from the
weights of the previous round (a new network only when the painted classes change), and can be
stopped at any step. Each round first fits ilastik's forest on the painted voxels and previews
the slices in view with it, so the user sees a segmentation before the network has learnt
anything: the forest's filter bank of the whole image is made in the background from when the
session opens (while the user paints), so that fit and preview take seconds. While the network
trains, every few seconds the preview shows the blend of both (their weighted geometric mean),
computed in the training thread between two steps, so a GUI thread only ever copies finished
labels into a layer. The blend's weight is decided at every preview on painted blocks held out of
both models' training: the loop shows the forest alone until the network scores better there, so
what it shows does not fall below the forest while the network is still poor. The whole volume,
"Segment", "Suggest" and "Save" use the same blend, so the saved model segments with `unet3d
predict` as the loop showed. napari's convention throughout: label 0 is unpainted,
painted values are the classes, and results use the same values. Volumes larger than memory (or
opened lazily) run the same loop box by box (`interactive.large`): rounds train on blocks around
the painting, previews cover a box around the view, and the whole volume is segmented tile by tile
into a file-backed array (`segment_into`).
"""

from __future__ import annotations

import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unet3d.data.features import bank_bytes, free_memory, input_feature_spec, region_bank
from unet3d.data.labels import decode_labels, encode_labels, present_values
from unet3d.data.normalization import apply_normalization, fit_normalization
from unet3d.errors import UserError
from unet3d.inference.predictor import Boxes, InMemory, normalized_entropy, predict_array, predict_volume
from unet3d.instances import InstanceMethod, instances_blockwise
from unet3d.interactive.large import (LAYER_CHUNKS, LayerSource, is_large, largest_label, plane_normalization, view_box,
                                      zarr_labels)
from unet3d.interactive.suggest import DEFAULT_STRATEGY, Suggestion, rank_slices
from unet3d.model import ForestModel, ModelInfo, UNet, save_model
from unet3d.training import train
from unet3d.training.dataset import TrainingSet, prepare_training_set
from unet3d.workflows.blocks import make_training_blocks
from unet3d.workflows.densify import default_config, predict_with_tta, training_patch
from unet3d.workflows.blend import HeldOut
from unet3d.workflows.forest import (Annotated, annotated, bank_of, fit_model_forest, forest_on_features, hold_out,
                                     in_blocks, network_at, normalized_reader, settle_weight)

UNPAINTED = 0  # napari's Labels convention
PREVIEW_EVERY = 3.0  # seconds of training between two previews of the slices in view
# ... and at least this many times the last preview's own seconds, so previews (with the weighing
# before each) take at most a third of a round: at 126 M voxels a preview took 11 s, and a 30-s
# round that previewed every 3 s made one training step.
PREVIEW_COST_FACTOR = 2.0
PREVIEW_SLICES = 16  # z-slices predicted around the one in view (the slab's ends see mirrored context)
# Seconds a round's forest may take (its sample's filter bank, fit) before the network starts:
# trees are grown 10 at a time while they fit, so the first preview comes within seconds. It fits
# on half the sample `train`'s and densify's forests take: the first trees fit in less than half
# the time, for the same score on the unpainted voxels of the ovule's (3,3,2) slices.
FOREST_SECONDS = 2.0
FOREST_SAMPLE = 50_000
# The whole image's filter bank is made in the background when it needs at most this share of the
# memory free when the session opens; for larger images each round makes it around the painted
# voxels and each preview around its slab (seconds more per round).
BANK_MEMORY_SHARE = 0.25
# From this many painted voxels a round keeps whole blocks of a tenth of them out of both models'
# training and weighs the network against the forest on them at every preview; below it the
# loop blends with equal weights.
HOLD_OUT_MIN_PAINTED = 5_000
WEIGH_BLOCKS = 8  # held-out blocks the network predicts at each preview (its cost stays a few patches)
# On a volume run box by box, the time a round's training blocks may take before it trains, as a
# share of its seconds (at least the blocks' minimum is made: 55 s at 126 M voxels, their filter
# bank's halo being most of it).
ROUND_BLOCKS_SHARE = 0.15


@dataclass
class Progress:
    """What a round reports after each step."""
    round: int
    iteration: int
    loss: float
    seconds: float
    budget: float


@dataclass
class Preview:
    """Labels of `box` (z-slices [start, stop), at most PREVIEW_PLANE voxels along Y and X around
    the view) as the network predicts them now."""
    box: tuple[slice, ...]
    labels: np.ndarray
    seconds: float  # what computing it took (training pauses for it)

    @property
    def start(self) -> int:
        return self.box[0].start

    @property
    def stop(self) -> int:
        return self.box[0].stop


@dataclass
class RoundResult:
    round: int
    iterations: int
    seconds: float
    stopped_by: str  # "time", or "request" when stopped
    class_values: list[int]
    warm_start: bool  # continued from the previous round's weights


def painted_classes(painted: np.ndarray, known: list[int] | None = None) -> list[int]:
    """The class values painted in `painted` (0 = unpainted), checked: at least two classes, and
    only classes of `known` (the current network's) when given."""
    values = [int(v) for v in np.unique(painted) if v != UNPAINTED]
    if not values:
        raise UserError("nothing is painted yet: paint some voxels of each class (0 means unpainted)")
    if known is not None:
        extra = sorted(set(values) - set(known))
        if extra:
            raise UserError(f"painted value(s) {', '.join(map(str, extra))} are not classes of the model "
                            f"(its classes: {', '.join(map(str, known))})")
        return list(known)
    if len(values) < 2:
        raise UserError(f"only class {values[0]} is painted: paint at least two classes "
                        "(for example the background as 1 and the structure as 2)")
    if min(values) < 0:
        raise UserError(f"painted value {min(values)} is negative: classes are positive label values")
    return values


class Session:
    """One image and the network learning to segment it from its painted voxels."""

    def __init__(self, image, spacing=None, device: str = "cpu", seed: int = 0, forest: bool = True):
        """`image`: (Z, Y, X) or (C, Z, Y, X), in memory, or lazily opened (Dask, Zarr: run box by box)."""
        if image.ndim not in (3, 4):
            raise UserError(f"the image has shape {image.shape}: a 3D volume (Z, Y, X) or (C, Z, Y, X) is needed")
        self.large = is_large(image)
        if self.large:  # read box by box: neither the image nor its normalized copy is ever held
            self.source = LayerSource(image)
            self.image = self.normalized = None
            self.normalization = plane_normalization(self.source)
        else:
            self.image = np.ascontiguousarray(image if image.ndim == 4 else image[None], dtype=np.float32)
            self.source = InMemory(self.image)
            self.normalization = fit_normalization([self.image])
            self.normalized = apply_normalization(self.image, self.normalization)
        self.spacing = tuple(spacing) if spacing is not None else None
        self.device, self.seed = device, seed
        self.network: UNet | None = None
        self.use_forest = forest
        self.bank = input_feature_spec(self.spacing)  # the forest's filter bank
        self.features: np.ndarray | None = None  # that bank of the whole image (F, Z, Y, X), once made
        self._features_thread = self._start_features()
        self.forest: ForestModel | None = None  # this round's, fitted on the painted voxels
        self._forest_cache: dict[tuple, np.ndarray] = {}  # its probabilities per region, for the round
        self._box_bank: tuple | None = None  # (box, the bank there) of the last preview, for the next rounds
        self._weighing: _Weighing | None = None  # this round's held-out painting, when there is enough
        self.class_values: list[int] | None = None
        self.info: ModelInfo | None = None
        self.rounds = 0
        self.lock = threading.Lock()  # held while the network trains or predicts: one user at a time
        self._workdir = tempfile.TemporaryDirectory(prefix="unet3d-napari-")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.source.shape[1:])

    def round_classes(self, painted: np.ndarray) -> list[int]:
        """The classes a round on `painted` trains: the network's, when it knows every painted value."""
        if painted.shape != self.shape:
            raise UserError(f"the labels have shape {painted.shape}, the image {self.shape}: paint on a Labels "
                            "layer of the image's shape")
        values = present_values(painted)  # once per round: the painting can be the size of the volume
        keeps = self.network is not None and set(values.tolist()) - {UNPAINTED} <= set(self.class_values)
        return painted_classes(values, self.class_values if keeps else None)

    def training_set(self, painted: np.ndarray) -> TrainingSet:
        """The painted voxels of an image held in memory, encoded and normalized for training."""
        return prepare_training_set([self.image], [np.asarray(painted)], UNPAINTED, sources=["painted labels"],
                                    class_values=self.round_classes(painted), normalization=self.normalization,
                                    spacing=self.spacing)

    def _start_features(self) -> threading.Thread | None:
        """Start making the whole image's filter bank in the background, where it fits in memory."""
        free = free_memory()
        if (self.large or not self.use_forest or free is None
                or bank_bytes(self.image.shape, self.bank) > BANK_MEMORY_SHARE * free):
            return None
        thread = threading.Thread(target=self._make_features, name="unet3d filter bank", daemon=True)
        thread.start()
        return thread

    def _make_features(self) -> None:
        self.features = region_bank(normalized_reader(self.image, self.normalization), self.shape,
                                    self._everything(), self.bank)

    def wait_for_features(self) -> None:
        """Until the whole image's filter bank, begun when the session opened, is made (at once
        where it is not made at all)."""
        if self._features_thread is not None:
            self._features_thread.join()

    def train_round(self, painted: np.ndarray, seconds: float, stop: threading.Event | None = None,
                    on_progress=None, on_preview=None, view_z=lambda: None,
                    iterations: int | None = None, view_yx=lambda: (None, None)) -> RoundResult:
        """Train for up to `seconds` (and at most `iterations` steps) on `painted`, from the
        previous round's weights when the classes are the same. `on_progress(Progress)` after every step; `on_preview(Preview)` every
        PREVIEW_EVERY seconds for the slab around `view_z()` (None: no preview), within the box
        around `view_yx()` (None: the middle); `stop` ends the round after the current step,
        keeping what it learnt."""
        if seconds <= 0:
            raise UserError(f"the time budget must be positive, got {seconds:g} s")
        if self.large:  # the blocks come before the round's seconds: taken out of them, a round made one step
            with self.lock:
                data = self._round_blocks(painted, seconds)
        else:
            data = self.training_set(painted)
        warm = self.network is not None and data.class_values == self.class_values
        config = default_config(data, max_time=seconds, seed=self.seed + self.rounds,
                                **({"iterations": iterations} if iterations else {}),
                                network=self.network.config if warm else None)
        self.rounds += 1
        number, last_preview = self.rounds, [time.monotonic(), 0.0]  # when the last preview ended, its seconds

        def on_step(model, iteration, loss):
            if on_progress is not None:
                on_progress(Progress(number, iteration, loss, time.monotonic() - started, seconds))
            z = view_z()
            wait = max(PREVIEW_EVERY, PREVIEW_COST_FACTOR * last_preview[1])
            if on_preview is not None and z is not None and time.monotonic() - last_preview[0] >= wait:
                began = time.monotonic()
                self._weigh(model)
                on_preview(self._slab_preview(model, data.class_values, (z, *view_yx())))
                last_preview[:] = time.monotonic(), time.monotonic() - began
            return stop is not None and stop.is_set()

        with self.lock:
            started = time.monotonic()
            if not self.large:  # a volume run box by box fitted its forest on the round's blocks
                self._fit_forest(data, config.patch_shape)
            z = view_z()
            if on_preview is not None and z is not None and self.forest is not None:
                on_preview(self._slab_preview(None, data.class_values, (z, *view_yx())))
            result = train(config, data, Path(self._workdir.name) / "round.safetensors", progress=False,
                           device=self.device, network=self.network if warm else None, on_step=on_step)
            self.network, self.class_values, self.info = result.model, data.class_values, result.info
            self._weigh(self.network)
        return RoundResult(number, result.iterations, result.seconds, result.stopped_by, data.class_values, warm)

    def _round_blocks(self, painted: np.ndarray, seconds: float) -> TrainingSet:
        """A round on a volume run box by box: blocks of the painting held out, the network's
        training blocks made around the rest (their share of `seconds`), and the round's forest
        fitted on the filter bank of the same blocks (densify's blockwise route)."""
        classes = self.round_classes(painted)
        labels = encode_labels(painted, classes, UNPAINTED, "painted labels")
        patch, seed = training_patch(self.shape), self.seed + self.rounds
        held = hold_out([labels], patch, seed, minimum=HOLD_OUT_MIN_PAINTED) if self.use_forest else None
        blocks = make_training_blocks(self.source, labels, classes, UNPAINTED, patch, features=None,
                                      forest_bank=self.bank if self.use_forest else None, spacing=self.spacing,
                                      normalization=self.normalization, seconds=ROUND_BLOCKS_SHARE * seconds,
                                      seed=seed, source="painted labels")
        del labels
        self.forest, self._forest_cache, self._weighing = None, {}, None
        if self.use_forest:
            self.forest = forest_on_features(blocks.forest_features, blocks.forest_classes, self.bank,
                                             {"method": "none", "channels": self.source.shape[0]}, len(classes),
                                             seconds=FOREST_SECONDS, seed=seed, samples=FOREST_SAMPLE)
            if held is not None and len(held[0]):
                self._weighing = _Weighing.of(self, held[0], patch)
        return blocks.data

    def _fit_forest(self, data: TrainingSet, patch) -> None:
        """This round's forest on the painted voxels (None when the session runs without one),
        after holding out blocks of the painting from both models to weigh them on."""
        self.forest, self._forest_cache, self._weighing = None, {}, None
        if not self.use_forest:
            return
        labels = data.labels[0].numpy()  # shares the training set's memory: held-out blocks leave training too
        held = hold_out([labels], patch, self.seed + self.rounds, minimum=HOLD_OUT_MIN_PAINTED)
        self.wait_for_features()  # begun when the session opened: the rest of the bank's time
        self.forest = fit_model_forest([annotated(self.image, labels, features=self.features)], self.bank,
                                       self.normalization, len(data.class_values), seconds=FOREST_SECONDS,
                                       seed=self.seed + self.rounds, samples=FOREST_SAMPLE)
        if held is not None and len(held[0]):
            self._weighing = _Weighing.of(self, held[0], patch)

    def _weigh(self, model: UNet) -> None:
        """Set the round's blend weight to what scores best on the held-out painting now."""
        if self._weighing is not None:
            with evaluating(model):
                self._weighing.settle(model, self.forest, self.device)

    def _forest_probabilities(self, box: tuple[slice, ...]) -> np.ndarray:
        """The round's forest's (K, z, y, x) probabilities of `box`, computed once per round."""
        key = tuple((b.start, b.stop) for b in box)
        if key not in self._forest_cache and self.features is None and box == self._everything():
            self._forest_cache[key] = self.forest.region_probabilities(self.source.read, self.shape)(box)  # in blocks
        elif key not in self._forest_cache:
            bank = self._bank(box)
            probabilities = self.forest.probabilities(bank.reshape(bank.shape[0], -1))
            self._forest_cache[key] = probabilities.reshape((-1,) + bank.shape[1:])
        return self._forest_cache[key]

    def _bank(self, box: tuple[slice, ...]) -> np.ndarray:
        """The forest's filter bank (F, z, y, x) of the preview `box`: cut from the whole image's
        where it was made, else made around the box and kept while the view stays, round after
        round (only the forest changes between rounds; the bank of a preview box took 18 s of a
        round at 126 M voxels)."""
        if self.features is not None:
            return self.features[(slice(None),) + box]
        key = (tuple((b.start, b.stop) for b in box), repr(self.forest.normalization))
        if self._box_bank is None or self._box_bank[0] != key:
            fitted = self.forest.volume_normalization(self.source.read, self.shape)
            normalized = lambda b: apply_normalization(self.source.read(b), fitted)  # noqa: E731
            self._box_bank = None  # the old box's bank is let go before the new one is made
            self._box_bank = key, region_bank(normalized, self.shape, box, self.bank)
        return self._box_bank[1]

    def _blend(self, network: np.ndarray | None, box: tuple[slice, ...]) -> np.ndarray:
        """What the loop shows of `box`: the network's probabilities blended with the forest's, the
        forest's alone before the network exists (None), the network's alone without a forest."""
        if self.forest is None:
            return network
        forest = self._forest_probabilities(box)
        return forest if network is None else self.forest.blend(network, forest)

    def _slab_preview(self, model: UNet | None, class_values, view) -> Preview:
        """The preview of the slab around `view` (z, y, x), at most PREVIEW_PLANE voxels along Y
        and X around its centre: the slab of a 1024×1024 EM stack whole took 26 s to predict, so a
        round previewed instead of training."""
        began = time.monotonic()
        box = view_box(self.shape, view, PREVIEW_SLICES)
        network = None
        if model is not None:
            with evaluating(model):
                network = predict_array(model, self._normalized(box), device=self.device)
        probabilities = self._blend(network, box)
        return Preview(box, decode_labels(probabilities.argmax(0), class_values), time.monotonic() - began)

    def _normalized(self, box: tuple[slice, ...]) -> np.ndarray:
        """The normalized (C, z, y, x) image in `box`."""
        if self.normalized is not None:
            return self.normalized[(slice(None),) + box]
        return apply_normalization(self.source.read(box), self.normalization)

    def _everything(self) -> tuple[slice, ...]:
        return tuple(slice(0, n) for n in self.shape)

    def _require_network(self) -> UNet:
        if self.network is None:
            raise UserError("no network yet: paint some voxels of each class and train first")
        return self.network

    def _require_in_memory(self, what: str) -> None:
        if self.large:
            raise UserError(f"{what} needs the whole volume's probabilities in memory; on a volume of "
                            f"{int(np.prod(self.shape)):,} voxels segment it into a file (Segment volume, or "
                            "`unet3d predict` with the saved model) and run `unet3d instances` on its probabilities")

    def probabilities(self) -> np.ndarray:
        """The class probabilities of the whole volume (K, Z, Y, X): the network's blended with the round's forest."""
        self._require_in_memory("this")
        with self.lock:
            return self._blend(predict_array(self._require_network(), self.normalized, device=self.device),
                               self._everything())

    def preview_volume(self) -> tuple[np.ndarray, np.ndarray]:
        """The network's labels of the whole volume and its uncertainty (entropy / log K, 0..1)."""
        probabilities = self.probabilities()
        return decode_labels(probabilities.argmax(0), self.class_values), normalized_entropy(probabilities)

    def segment(self, painted: np.ndarray) -> np.ndarray:
        """The full-quality result: the network (8 mirrorings where cheap) blended with the
        round's forest, as the previews and the saved model blend them."""
        self._require_network()
        self._require_in_memory("segmenting into memory")
        if self.round_classes(painted) != self.class_values:
            raise UserError("the painting has classes the network was not trained on: train again first")
        with self.lock:
            network, _ = predict_with_tta(self._require_network(), self.normalized, None, 60.0, time.monotonic,
                                          self.device, progress=False)
            blended = self._blend(network, self._everything())
        return decode_labels(blended.argmax(0), self.class_values)

    def segment_into(self, target, on_written=None) -> dict:
        """The whole volume segmented tile by tile into `target` (an array of its shape: a Zarr
        array behind a Labels layer), as the saved model segments with `unet3d predict`: the
        network blended with the round's forest region by region. `on_written(voxels, total)` after
        each region. Returns `predict_volume`'s summary."""
        with self.lock:
            return predict_volume(self._require_network(), self.info, self.source, target, device=self.device,
                                  forest=self._kept_forest(), on_written=on_written)

    def objects_into(self, out, method: InstanceMethod, interior: int, boundary: int | None, spacing=None,
                     on_written=None) -> tuple[object, int]:
        """The objects of a volume run box by box, never held whole: the blended probabilities written
        tile by tile into a float16 Zarr store in the session's folder (what `unet3d predict
        --probabilities` writes with the saved model), then cut block by block into `out` (a function
        of the labels' type returning the array to fill, as `instances_blockwise` takes it).
        `on_written` hears the prediction's progress. Returns the array and the number of objects."""
        import zarr

        network = self._require_network()
        chunks = (1, *(min(c, n) for c, n in zip(LAYER_CHUNKS, self.shape)))
        store = zarr.open_array(str(Path(self._workdir.name) / "probabilities.zarr"), mode="w", dtype=np.float16,
                                shape=(len(self.class_values), *self.shape), chunks=chunks)
        with self.lock:
            predict_volume(network, self.info, self.source, None, store, device=self.device,
                           forest=self._kept_forest(), on_written=on_written)
        labels = instances_blockwise(store, self.class_values, method, interior, boundary, spacing, out=out,
                                     workdir=self._workdir.name)
        return labels, largest_label(labels)

    def labels_array(self, name: str, dtype) -> np.ndarray:
        """Zeros of the volume's shape for a Labels layer: in memory, or (a volume run box by box) a
        Zarr array in the session's folder, written chunk by chunk as previews and tiles arrive."""
        if not self.large:
            return np.zeros(self.shape, dtype)
        return zarr_labels(Path(self._workdir.name) / f"{name}.zarr", self.shape, dtype)

    def _kept_forest(self) -> ForestModel | None:
        """The round's forest, unless the held-out painting gave the network alone (weight 1)."""
        return self.forest if self.forest is not None and self.forest.network_weight < 1 else None

    def suggest(self, painted: np.ndarray, count: int = 1, strategy: str = DEFAULT_STRATEGY) -> list[Suggestion]:
        """The slices to paint next, best first (`interactive.suggest`): from the network's
        probabilities of the whole volume and what is painted."""
        self._require_in_memory("suggesting a slice")
        probabilities = self.probabilities()
        return rank_slices(probabilities, np.asarray(painted) != UNPAINTED, strategy=strategy, count=count,
                           rng=np.random.default_rng([self.seed, self.rounds]))

    def save(self, path) -> None:
        """The standard model file, with the round's forest (`unet3d predict` blends as the loop did)
        unless the held-out painting gave the network alone (weight 1)."""
        with self.lock:
            save_model(path, self._require_network(), self.info, self._kept_forest())

    def close(self) -> None:
        self._workdir.cleanup()


@contextmanager
def evaluating(model: UNet):
    """`model` in evaluation mode (batch statistics frozen) for a prediction between training steps."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@dataclass
class _Weighing:
    """A round's painting held out of both models, in at most WEIGH_BLOCKS blocks, with the
    round's forest's probabilities there (made once: only the network changes during a round)."""
    volume: Annotated
    forest: np.ndarray
    block: tuple

    @classmethod
    def of(cls, session: Session, held: HeldOut, block) -> _Weighing:
        shape = session.source.shape
        volume = Annotated(Boxes(session.source.read, shape), Boxes(session._normalized, shape), held.voxels,
                           held.classes, session.features)
        volume = in_blocks(volume, block, WEIGH_BLOCKS, session.seed + session.rounds)
        forest = session.forest.probabilities(bank_of(volume, session.bank, session.forest.normalization, block))
        return cls(volume, forest, tuple(block))

    def settle(self, network: UNet, forest: ForestModel, device: str) -> None:
        """Ties go to the forest: a network still near uniform scores level with it on the held-out
        blocks while it would already shift labels elsewhere (seen on colin27: docs/forest.md)."""
        settle_weight(forest, network_at(network, self.volume, device, self.block), self.forest,
                      self.volume.classes, "painted blocks held out of both models", ties_to=0.0)
