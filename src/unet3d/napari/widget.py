"""The napari dock widget: paint a few slices, train, watch the preview, paint where it is wrong.

All the work happens in `unet3d.interactive.session` on a worker thread; this module only wires
napari layers and buttons to it. Progress and previews computed in the worker reach the layers
through `ensure_main_thread`, so painting, scrolling and zooming stay responsive while a round
trains. Errors become the status line, never a traceback dialog; the painting is only ever read.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox, Label, PushButton, SpinBox, create_widget
from napari.qt.threading import create_worker
from superqt.utils import ensure_main_thread

from unet3d.errors import UserError
from unet3d.inference.predictor import label_dtype, predict_image, predict_volume
from unet3d.instances import KINDS, instances_from_probabilities
from unet3d.interactive.large import LayerSource, is_large, zarr_labels
from unet3d.interactive.session import Preview, Progress, RoundResult, Session
from unet3d.interactive.suggest import Suggestion
from unet3d.model import load_predictor


PREVIEW_LAYER, UNCERTAINTY_LAYER, SEGMENTATION_LAYER = "unet3d preview", "unet3d uncertainty", "unet3d segmentation"
OBJECTS_LAYER = "unet3d objects"
AXIS_ORDER = {0: (0, 1, 2), 1: (1, 0, 2), 2: (2, 0, 1)}  # dims order that shows slices across each axis
BUTTONS = ("train", "segment", "suggest", "objects", "save", "apply")


class InteractiveWidget(Container):
    """Train a 3D U-Net on the voxels painted in a Labels layer (0 = unpainted, 1..K = classes)."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        self.image = create_widget(annotation=napari.layers.Image, label="image")
        self.painting = create_widget(annotation=napari.layers.Labels, label="painting")
        self.budget = FloatSpinBox(value=30.0, min=1.0, max=3600.0, step=5.0, label="seconds per round")
        self.train = PushButton(text="Train")
        self.stop = PushButton(text="Stop", enabled=False)
        self.segment = PushButton(text="Segment volume (with the forest)")
        self.suggest = PushButton(text="Suggest next slice")
        self.object_kind = ComboBox(choices=sorted(KINDS), value="nuclei", label="objects")
        # Painted values are classes + 1 (0 is unpainted): 1 background, 2 interior, 3 boundary by default.
        self.interior = SpinBox(value=2, min=1, max=65535, label="interior value")
        self.boundary = SpinBox(value=3, min=1, max=65535, label="boundary value")
        self.objects = PushButton(text="Objects (one label each)")
        self.model_file = FileEdit(mode="w", filter="*.safetensors", label="model file")
        self.save = PushButton(text="Save model")
        self.apply_model = FileEdit(mode="r", filter="*.safetensors *.zip", label="model to apply")
        self.apply_to = create_widget(annotation=napari.layers.Image, label="to image")
        self.apply = PushButton(text="Apply model")
        self.status = Label(value="Paint a few voxels of each class (1, 2, ...), then Train.")
        self.extend([self.image, self.painting, self.budget, self.train, self.stop, self.segment, self.suggest,
                     self.object_kind, self.interior, self.boundary, self.objects, self.model_file, self.save, self.apply_model, self.apply_to, self.apply, self.status])
        self.max_steps: int | None = None  # at most this many training steps per round (None: the seconds decide)
        self.session: Session | None = None
        self._session_layer: str | None = None  # the image layer the session was made for
        self.last_round: RoundResult | None = None
        self.preview_timings: list[tuple[float, float]] = []  # (computing in the worker, showing) seconds
        self.busy = False
        self._stop_event = threading.Event()
        self._session_lock = threading.Lock()  # the session is made once, by whichever thread asks first
        self._view_z: int | None = None
        self._view_yx: tuple = (None, None)  # the view's centre in the image's voxels (a large volume's preview box)
        self._closed = False
        self._workdir = tempfile.TemporaryDirectory(prefix="unet3d-napari-")  # large volumes' applied models
        self.train.changed.connect(self.start_round)
        self.stop.changed.connect(lambda: self._stop_event.set())
        self.segment.changed.connect(self.segment_volume)
        self.suggest.changed.connect(self.suggest_slice)
        self.objects.changed.connect(self.find_objects)
        self.save.changed.connect(self.save_model)
        self.apply.changed.connect(self.apply_saved_model)
        self.image.changed.connect(self._open_session)
        viewer.dims.events.current_step.connect(self._remember_view)
        viewer.camera.events.center.connect(self._remember_view)
        self.native.destroyed.connect(self._on_close)
        self._remember_view()
        self._open_session()

    # --- actions (GUI thread) ---------------------------------------------------------------

    def start_round(self) -> None:
        """Train for `budget` seconds on the painting, continuing from the current network."""
        layer = self.image.value
        try:
            if layer is None:
                raise UserError("choose the image layer to segment")
            painted = self._painted()
        except UserError as exc:
            return self.say(str(exc))
        self._stop_event.clear()
        self._labels_layer(PREVIEW_LAYER, painted.dtype)  # the preview holds the painting's values
        budget = float(self.budget.value)

        def work():  # the session (the image's normalization) is made here too, off the GUI thread
            session = self._session_for(layer)
            return session.train_round(painted, budget, self._stop_event, self._show_progress, self._show_preview,
                                       lambda: self._view_z, iterations=self.max_steps, view_yx=lambda: self._view_yx)

        first = "making training blocks around the painting, then " if is_large(_image_data(layer)) else ""
        self._run(f"{first}training for {budget:g} s ...", work, self._round_done, stoppable=True)

    def segment_volume(self) -> None:
        """Full quality: the network (8 mirrorings where cheap) blended with the round's forest."""
        try:
            session, painted = self._trained_session(), self._painted()
        except UserError as exc:
            return self.say(str(exc))
        if session.large:  # tile by tile into a Zarr array behind the layer, shown as it fills
            target = session.labels_array("segmentation", label_dtype(session.class_values))
            return self._stream(SEGMENTATION_LAYER, target, session.segment_into, "segmented the volume")
        self._run("segmenting the volume (network and forest) ...", lambda: session.segment(painted),
                  lambda labels: self._set_labels(SEGMENTATION_LAYER, labels, "segmented the volume"))

    def suggest_slice(self) -> None:
        """Move the viewer to the slice, along any axis, that painting would correct most
        (`interactive.suggest`)."""
        try:
            session, painted = self._trained_session(), self._painted()
        except UserError as exc:
            return self.say(str(exc))
        self._run("looking for the slice to paint next ...", lambda: session.suggest(painted)[0], self._go_to_slice)

    def find_objects(self) -> None:
        """Objects from the blended probabilities of the whole volume (`unet3d instances`), one label
        each; on a volume run box by box, the probabilities go tile by tile into a Zarr store and the
        objects block by block into a Zarr-backed layer."""
        try:
            session = self._trained_session()
            interior, boundary = int(self.interior.value), int(self.boundary.value)
            missing = [value for value in (interior, boundary) if value not in session.class_values]
            if missing or interior == boundary:
                raise UserError(f"objects need two painted classes, interior {interior} and boundary {boundary}; "
                                f"the network knows {', '.join(map(str, session.class_values))}")
        except UserError as exc:
            return self.say(str(exc))
        kind, spacing = self.object_kind.value, self._scale()
        if session.large:
            written = self._share_written("predicting the probabilities for the objects tile by tile")
            return self._run(f"finding {kind}: probabilities tile by tile, then objects block by block ...",
                             lambda: session.objects_into(lambda dtype: session.labels_array("objects", dtype),
                                                          KINDS[kind], interior, boundary, spacing, written),
                             lambda found: self._set_labels(OBJECTS_LAYER, found[0], f"{found[1]} objects ({kind})"))

        def work():
            return instances_from_probabilities(session.probabilities(), session.class_values, KINDS[kind],
                                                interior, boundary, spacing)

        self._run(f"finding {kind} ...", work,
                  lambda labels: self._set_labels(OBJECTS_LAYER, labels, f"{int(labels.max())} objects ({kind})"))

    def save_model(self) -> None:
        try:
            session = self._trained_session()
        except UserError as exc:
            return self.say(str(exc))
        path = str(self.model_file.value)
        if not path or path == ".":
            return self.say("choose a model file to save to")
        path = path if path.endswith(".safetensors") else path + ".safetensors"
        self._run("saving ...", lambda: session.save(path), lambda _: self.say(f"saved {path} (use it with "
                                                                                "`unet3d predict`)"))

    def apply_saved_model(self) -> None:
        """Segment another open image with a saved model (the fully automatic workflow)."""
        layer, path = self.apply_to.value, str(self.apply_model.value)
        if layer is None:
            return self.say("choose an image layer to apply the model to")

        try:
            model, info, forest = load_predictor(path)
            source = LayerSource(_image_data(layer))
            channels = info.image_channels(model.config)
            if source.shape[0] != channels:
                raise UserError(f"{path}: the model reads {channels} channel(s), {layer.name} has {source.shape[0]}")
        except UserError as exc:
            return self.say(str(exc))
        name, done = f"{layer.name} unet3d", f"applied {path} to {layer.name}"
        if is_large(source.data):  # as `unet3d predict` writes a file: tile by tile, into a Zarr array
            target = zarr_labels(Path(self._workdir.name) / f"{layer.name}.zarr", source.shape[1:],
                                 label_dtype(info.class_values))
            return self._stream(name, target, lambda target, on_written: predict_volume(
                model, info, source, target, forest=forest, on_written=on_written), done)

        def work():  # as `unet3d predict` segments: filter-bank inputs remade, the model's forest blended in
            probabilities = predict_image(model, info, source.read(), forest=forest)
            return np.asarray(info.class_values)[probabilities.argmax(0)]

        self._run(f"applying {path} ...", work, lambda labels: self._set_labels(name, labels, done))

    def _stream(self, name: str, target, segment_into, message: str) -> None:
        """Segment a large volume tile by tile into `target` (a Zarr array), shown at once as the
        layer `name` and refreshed as regions are written, with the share done in the status line."""
        self._set_labels(name, target, "segmenting the volume tile by tile ...")
        written = self._share_written("segmenting the volume tile by tile", self.viewer.layers[name])
        self._run("segmenting the volume tile by tile ...", lambda: segment_into(target, on_written=written),
                  lambda summary: self.say(f"{message} ({summary['tiles']} tiles in {summary['seconds']:.0f} s)"))

    def _share_written(self, text: str, layer=None):
        """A tile writer's `on_written(voxels, total)` saying the share written in the status line
        (every 2 %), refreshing `layer` (the one being filled) as it goes."""
        shown = [0.0]

        @ensure_main_thread
        def written(voxels: int, total: int) -> None:
            if not self._closed and (voxels == total or voxels / total - shown[0] >= 0.02):
                shown[0] = voxels / total
                if layer is not None:
                    layer.refresh()
                self.say(f"{text}: {100 * voxels / total:.0f} % written")

        return written

    # --- worker plumbing --------------------------------------------------------------------

    def _run(self, text: str, work, done, stoppable: bool = False) -> None:
        """`work()` in a worker thread; `done(result)` back in the GUI thread. One job at a time;
        any error becomes the status line."""
        if self.busy:
            return self.say("busy: wait for the current job or press Stop")

        def guarded():
            try:
                return True, work()
            except UserError as exc:
                return False, str(exc)
            except Exception as exc:  # a GUI must report, not crash: the message names the failure
                return False, f"failed: {type(exc).__name__}: {exc}"

        self._set_busy(True, stoppable)
        self.say(text)
        worker = create_worker(guarded)
        worker.returned.connect(lambda outcome: self._finished(outcome, done))
        worker.start()

    def _finished(self, outcome, done) -> None:
        if self._closed:
            return
        self._set_busy(False, False)
        ok, value = outcome
        if ok:
            done(value)
        else:
            self.say(value)

    def _set_busy(self, busy: bool, stoppable: bool) -> None:
        self.busy = busy
        for name in BUTTONS:
            getattr(self, name).enabled = not busy
        self.stop.enabled = busy and stoppable

    def _round_done(self, result: RoundResult) -> None:
        self.last_round = result
        how = "stopped" if result.stopped_by == "request" else "done"
        start = "continued from the last round" if result.warm_start else "a new network"
        summary = f"round {result.round} {how}: {result.iterations} steps in {result.seconds:.0f} s ({start})"
        session = self.session
        if session.large:  # a whole-volume preview would take longer than the round: Segment volume does it
            return self.say(f"{summary}; the preview covers the box in view (Segment volume for all of it)")
        self.say(f"{summary}; updating the preview of the whole volume ...")
        self._run("predicting the whole volume ...", session.preview_volume, self._show_volume)

    def _show_volume(self, labels_and_uncertainty) -> None:
        labels, uncertainty = labels_and_uncertainty
        self._set_labels(PREVIEW_LAYER, labels, f"preview of round {self.last_round.round if self.last_round else 0} "
                         "(paint where it is wrong and Train again)")
        if UNCERTAINTY_LAYER in self.viewer.layers:
            self.viewer.layers[UNCERTAINTY_LAYER].data = uncertainty
        else:
            self.viewer.add_image(uncertainty, name=UNCERTAINTY_LAYER, colormap="magma", opacity=0.5,
                                  contrast_limits=(0.0, 1.0), visible=False, scale=self._scale())

    @ensure_main_thread
    def _show_progress(self, progress: Progress) -> None:
        if not self._closed and progress.iteration % 5 == 0:
            self.say(f"round {progress.round}: {progress.iteration} steps, loss {progress.loss:.3f}, "
                     f"{progress.seconds:.0f} / {progress.budget:.0f} s")

    @ensure_main_thread
    def _show_preview(self, preview: Preview) -> None:
        if self._closed:
            return
        began = time.perf_counter()
        layer = self._labels_layer(PREVIEW_LAYER, preview.labels.dtype)
        layer.data[preview.box] = preview.labels
        layer.refresh()
        self.preview_timings.append((preview.seconds, time.perf_counter() - began))

    # --- layers and state ---------------------------------------------------------------------

    def _trained_session(self) -> Session:
        """The session of the chosen image, once it has trained (else a message)."""
        layer = self.image.value
        if layer is None:
            raise UserError("choose the image layer to segment")
        if self.session is None or self._session_layer != layer.name or self.session.network is None:
            raise UserError("no network for this image yet: paint and Train first")
        return self.session

    def _open_session(self, *args) -> None:
        """Make the chosen image's session in a worker thread as soon as it is chosen: its forest's
        filter bank is then made while the user paints, and Train previews within seconds."""
        layer = self.image.value
        if layer is None:
            return

        def prepare():
            try:
                self._session_for(layer)
            except UserError:
                pass  # Train says what is wrong with the image

        create_worker(prepare).start()

    def _session_for(self, layer) -> Session:
        """The session of `layer`, made on first use (in a worker thread: it normalizes the image)."""
        with self._session_lock:
            if self.session is None or self._session_layer != layer.name:
                self.session = Session(_image_data(layer), spacing=tuple(layer.scale[-3:]))
                self._session_layer = layer.name
            return self.session

    def _painted(self) -> np.ndarray:
        """The painting as the round starts (a copy: the user may paint on while it trains; a large
        volume's round encodes it at once instead of holding a second copy)."""
        layer = self.painting.value
        if layer is None:
            raise UserError("choose (or add) the Labels layer you paint on")
        large = self.session is not None and self.session.large
        return np.asarray(layer.data) if large else np.array(layer.data, copy=True)

    def _labels_layer(self, name: str, dtype) -> napari.layers.Labels:
        """The layer `name`, made empty where missing: a Zarr array behind it for a large volume
        (whose session opens quickly: nothing is read but a few planes)."""
        if name not in self.viewer.layers:
            image = self.image.value
            data = (self._session_for(image).labels_array(name.split()[-1], dtype) if is_large(_image_data(image))
                    else np.zeros(_image_data(image).shape[-3:], dtype))
            self.viewer.add_labels(data, name=name, opacity=0.5, scale=self._scale())
        return self.viewer.layers[name]

    def _set_labels(self, name: str, labels: np.ndarray, message: str) -> None:
        if name in self.viewer.layers:
            self.viewer.layers[name].data = labels
        else:
            self.viewer.add_labels(labels, name=name, opacity=0.5, scale=self._scale())
        self.say(message)

    def _scale(self):
        layer = self.image.value
        return tuple(layer.scale[-3:]) if layer is not None else None

    def _go_to_slice(self, suggestion: Suggestion) -> None:
        axis, index = suggestion.axis, suggestion.index
        first = self.viewer.dims.ndim - 3
        self.viewer.dims.order = tuple(range(first)) + tuple(first + a for a in AXIS_ORDER[axis])
        self.viewer.dims.set_current_step(first + axis, index)
        self.say(f"paint slice {index} across axis {'zyx'[axis]}: the network expects many wrong voxels "
                 "there, away from the painted slices")

    def _remember_view(self, event=None) -> None:
        """The z-slice in view, and the view's centre in voxels (where a large volume's preview goes)."""
        steps = self.viewer.dims.current_step
        self._view_z = int(steps[-3]) if len(steps) >= 3 else None
        scale = self._scale() or (1.0, 1.0, 1.0)
        center = self.viewer.camera.center[-2:]
        self._view_yx = tuple(int(round(c / s)) for c, s in zip(center, scale[-2:]))

    def _on_close(self, *args) -> None:
        self._closed = True
        self._stop_event.set()

    def say(self, text: str) -> None:
        self.status.value = text


def _image_data(layer):
    """An image layer's full-resolution data as it is (numpy, or lazily opened: Dask, Zarr)."""
    return layer.data[0] if layer.multiscale else layer.data
