"""Layer plumbing for the widgets: combo boxes that follow the layer list, show/replace result
layers, and the image/labels layout check.  No science and no torch here."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
from napari.layers import Image, Labels, Layer
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QComboBox, QFrame, QListWidget, QListWidgetItem, QWidget

__all__ = [
    "LayerCombo",
    "PairList",
    "infer_layout",
    "label_columns",
    "layer_array",
    "layer_shape",
    "one_per_pass",
    "place_beside",
    "show_image",
    "show_labels",
    "to_tiles",
]


#: layer metadata key marking the dock's own result layers
OUTPUT_KEY = "mevae_output"


class LayerCombo(QComboBox):
    """A combo box of the viewer's layers of one type, kept in step with the layer list (add,
    remove, rename), so the user never picks a stale name."""

    def __init__(self, viewer: Any, layer_type: type[Layer], parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = viewer
        self.layer_type = layer_type
        self.setToolTip(f"{layer_type.__name__} layer to use")
        events = viewer.layers.events
        for name in ("inserted", "removed", "reordered"):
            getattr(events, name).connect(self.refresh)
        events.inserted.connect(self._watch_name)
        for layer in viewer.layers:
            layer.events.name.connect(self.refresh)
        self.destroyed.connect(self._disconnect_all)
        self.refresh()

    def _watch_name(self, event: Any) -> None:
        layer = getattr(event, "value", None)
        if layer is not None:
            layer.events.name.connect(self.refresh)

    def _disconnect_all(self, *_: Any) -> None:
        # the viewer can outlive the widget: never call into a deleted combo box
        events = self.viewer.layers.events
        for name in ("inserted", "removed", "reordered"):
            with contextlib.suppress(TypeError, ValueError, RuntimeError):
                getattr(events, name).disconnect(self.refresh)
        for layer in self.viewer.layers:
            with contextlib.suppress(TypeError, ValueError, RuntimeError):
                layer.events.name.disconnect(self.refresh)

    def layers(self) -> list[Layer]:
        """The viewer's layers of this type, except the ME-VAE dock's own results (a preview
        or a clusters layer is never the data to crop)."""
        return [
            ly
            for ly in self.viewer.layers
            if isinstance(ly, self.layer_type) and not ly.metadata.get(OUTPUT_KEY)
        ]

    def refresh(self, *_: Any) -> None:
        """Rebuild the items, keeping the current choice when it still exists."""
        try:
            current = self.currentText()
        except RuntimeError:  # the C++ object is gone
            return
        names = [ly.name for ly in self.layers()]
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        if current in names:
            self.setCurrentIndex(names.index(current))
        elif names:
            self.setCurrentIndex(len(names) - 1)  # newest layer of that type
        self.blockSignals(False)
        self.currentIndexChanged.emit(self.currentIndex())

    def layer(self) -> Layer | None:
        """The chosen layer, or None when there is none."""
        name = self.currentText()
        for ly in self.layers():
            if ly.name == name:
                return ly
        return None

    def set_layer(self, layer: Layer | str) -> None:
        name = layer if isinstance(layer, str) else layer.name
        idx = self.findText(name)
        if idx < 0:
            raise ValueError(f"no {self.layer_type.__name__} layer named {name!r}")
        self.setCurrentIndex(idx)


class PairList(QListWidget):
    """A checkable list of the viewer's labels layers, each with the image it segments
    (:func:`napari_mevae.fields.pair_layers`: by name, else by shape), kept in step with the
    layer list.  Pairs are checked when they appear; labels with no image are listed greyed
    out with the reason."""

    def __init__(self, viewer: Any, channel_axis: Any = lambda: "auto") -> None:
        super().__init__()
        self.viewer = viewer
        self.channel_axis = channel_axis  # () -> the Cells tab's channel-axis choice
        self._unchecked: set[str] = set()  # labels names the user unchecked
        self._pairs: dict[str, tuple[Image, Labels]] = {}
        self.images = LayerCombo(viewer, Image, self)  # the layer lists that follow the viewer
        self.labels = LayerCombo(viewer, Labels, self)
        self.images.hide()
        self.labels.hide()
        self.labels.currentIndexChanged.connect(self.refresh)
        self.images.currentIndexChanged.connect(self.refresh)
        self.itemChanged.connect(self._on_item)
        self.setTextElideMode(Qt.TextElideMode.ElideMiddle)  # long names never widen the dock
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setToolTip("the fields to crop: each labels layer with its image")
        self.refresh()

    def _fits(self, image: Image, labels: Labels) -> bool:
        try:
            infer_layout(layer_shape(image), layer_shape(labels), image.rgb, self.channel_axis())
        except ValueError:
            return False
        return True

    def refresh(self, *_: Any) -> None:
        from ..fields import pair_layers

        try:
            images, labels = self.images.layers(), self.labels.layers()
        except RuntimeError:
            return
        found = pair_layers(
            [(ly.name, layer_shape(ly)) for ly in images],
            [(ly.name, layer_shape(ly)) for ly in labels],
            fits=lambda i, j: self._fits(images[i], labels[j]),
        )
        by_name = {ly.name: ly for ly in images}
        self._pairs = {}
        self.blockSignals(True)
        self.clear()
        for lab, (lname, iname, why) in zip(labels, found, strict=True):
            if iname is None:
                item = QListWidgetItem(f"{lname}: no image")
                item.setToolTip(f"{lname}: no image found ({why})")
                item.setFlags(Qt.ItemFlag.NoItemFlags)
            else:
                item = QListWidgetItem(f"{lname} \u2190 {iname}")
                item.setToolTip(f"labels {lname!r}, image {iname!r} ({why})")
                item.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsUserCheckable)
                on = lname not in self._unchecked
                item.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)
                self._pairs[lname] = (by_name[iname], lab)
            item.setData(Qt.ItemDataRole.UserRole, lname)
            self.addItem(item)
        self.blockSignals(False)
        self.setMaximumHeight(min(max(1, self.count()), 8) * 22 + 8)  # then it scrolls

    def _on_item(self, item: QListWidgetItem) -> None:
        name = item.data(Qt.ItemDataRole.UserRole)
        if item.checkState() == Qt.CheckState.Checked:
            self._unchecked.discard(name)
        else:
            self._unchecked.add(name)

    def set_checked(self, names: Sequence[str]) -> None:
        """Check exactly the pairs of these labels layers."""
        self._unchecked = {n for n in self._pairs if n not in set(names)}
        self.refresh()

    def pairs(self) -> list[tuple[Image, Labels]]:
        """The checked (image, labels) pairs, in the layer list's order."""
        return [p for name, p in self._pairs.items() if name not in self._unchecked]


def layer_shape(layer: Layer) -> tuple[int, ...]:
    """The full-resolution shape of a layer's data, without reading it."""
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    return tuple(data.shape)


def layer_array(layer: Layer) -> np.ndarray:
    """The full-resolution data of a layer as a numpy array (multiscale: level 0)."""
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    return np.asarray(data)


def infer_layout(
    image_shape: Sequence[int], labels_shape: Sequence[int], rgb: bool, channel_axis: str = "auto"
) -> tuple[int | None, bool]:
    """Where the channels are and whether the data is a stack of planes, from the shapes.

    Returns ``(channel_axis, stack)``; raises ValueError with a message a user can act on.
    ``channel_axis`` is ``"auto"``, ``"none"`` or an axis number (negative counts from the end).
    """
    ishape, lshape = tuple(image_shape), tuple(labels_shape)
    if len(lshape) not in (2, 3):
        raise ValueError(
            f"the labels layer must be 2-D (Y, X) or a stack of planes (Z, Y, X); it is {lshape}"
        )
    stack = len(lshape) == 3

    def without(axis: int) -> tuple[int, ...]:
        return ishape[:axis] + ishape[axis + 1 :]

    if channel_axis == "auto":
        if ishape == lshape:
            return None, stack
        if len(ishape) == len(lshape) + 1:
            candidates = [a for a in range(len(ishape)) if without(a) == lshape]
            if rgb and (len(ishape) - 1) in candidates:
                return len(ishape) - 1, stack
            if candidates:
                return candidates[0], stack
        raise ValueError(
            f"the labels layer {lshape} does not match the image {ishape}: the labels must have "
            "the image's shape without its channel axis. Pick the matching labels layer or set "
            "the channel axis."
        )
    if channel_axis == "none":
        if ishape != lshape:
            raise ValueError(
                f"the labels layer {lshape} does not match the image {ishape} (channel axis: none)"
            )
        return None, stack
    axis = int(channel_axis)
    if not -len(ishape) <= axis < len(ishape):
        raise ValueError(f"channel axis {axis} does not exist in an image of shape {ishape}")
    axis %= len(ishape)
    if without(axis) != lshape:
        raise ValueError(
            f"the labels layer {lshape} does not match the image {ishape} without channel "
            f"axis {axis} ({without(axis)})"
        )
    return axis, stack


def to_tiles(images: np.ndarray, ncols: int, pad: int = 2) -> np.ndarray:
    """A display montage of ``(N, C, S, S)`` crops (grey, or RGB for 2-3 channels)."""
    from ..figures import montage

    return montage(np.asarray(images, np.float32), ncols=ncols, pad=pad, fill=0.0)


def place_beside(viewer: Any, anchor: Layer, ndim: int, gap: float = 16.0) -> tuple[float, ...]:
    """A translate that puts a new result montage right of ``anchor`` (the cell image), below
    the montages already there, so results never hide the data."""
    ext = np.asarray(anchor.extent.world, dtype=float)
    top, right = ext[0, -2], ext[1, -1] + gap
    for ly in viewer.layers:
        if ly.metadata.get("mevae_beside"):
            top = max(top, float(np.asarray(ly.extent.world)[1, -2]) + gap)
    return (0.0,) * (ndim - 2) + (top, right)


def _replace_or_add(
    viewer: Any,
    name: str,
    kind: type[Layer],
    data: np.ndarray,
    anchor: Layer | None = None,
    **kwargs: Any,
):
    if name in viewer.layers:
        layer = viewer.layers[name]
        same = (
            isinstance(layer, kind)
            and layer.data.ndim == np.ndim(data)
            and getattr(layer, "rgb", False) == kwargs.get("rgb", getattr(layer, "rgb", False))
        )
        if same:
            layer.data = data
            for key in ("scale", "translate"):
                if key in kwargs:
                    setattr(layer, key, kwargs[key])
            layer.metadata = {**layer.metadata, **kwargs.get("metadata", {}), OUTPUT_KEY: True}
            if isinstance(layer, Image) and not layer.rgb:
                layer.reset_contrast_limits()
            return layer
        viewer.layers.remove(layer)
    beside = anchor is not None and anchor in viewer.layers and "translate" not in kwargs
    if beside:
        ndim = np.ndim(data) - (1 if kwargs.get("rgb") else 0)
        kwargs["translate"] = place_beside(viewer, anchor, ndim)
        kwargs["metadata"] = {**kwargs.get("metadata", {}), "mevae_beside": True}
    kwargs["metadata"] = {**kwargs.get("metadata", {}), OUTPUT_KEY: True}
    layer = kind(data, name=name, **kwargs)
    # napari adds a layer in one ~100 ms call under software OpenGL; the parts of it that can
    # wait (the window's repaint, the layer's controls panel, the view, selecting the layer,
    # its painting tools) follow, each in a pass of its own
    tools = _paint_tools_later(layer)
    layers = viewer.layers
    activate = getattr(layers, "_activate_on_insert", None)  # napari selects what it adds
    window = getattr(getattr(viewer, "window", None), "_qt_window", None)
    hold = window is not None and window.updatesEnabled()
    controls_add, build_controls = _controls_later(viewer, layer)
    if activate:
        layers._activate_on_insert = False
    if hold:
        window.setUpdatesEnabled(False)
    try:
        with _blocked(layers.events.inserted, controls_add):
            layers.append(layer)
    except BaseException:
        if hold:  # never leave the window unpainted
            _repaint(window)
        raise
    finally:
        if activate:
            layers._activate_on_insert = activate
    later: list[Callable[[], Any]] = []
    if hold:
        later.append(functools.partial(_repaint, window))
    if build_controls is not None:
        later.append(build_controls())  # a placeholder stands in meanwhile
    if beside:  # a new result beside the image: show both, after napari has drawn the layer
        later.append(lambda: _reset_view(viewer))
    if activate:
        later.append(functools.partial(_select, layers, layer))
    one_per_pass(later + tools)
    return layer


def _blocked(emitter: Any, callback: Any) -> contextlib.AbstractContextManager:
    return emitter.blocker(callback) if callback is not None else contextlib.nullcontext()


def _controls_later(
    viewer: Any, layer: Layer
) -> tuple[Any, Callable[[], Callable[[], None]] | None]:
    """napari builds a new layer's controls panel (20-35 ms under software OpenGL) as it adds
    the layer.  Returns the container's callback to block during the add, and a function to
    call after it: it puts an empty placeholder where napari looks for the panel (so selecting
    or removing the layer first still works) and returns the step that builds the real one.
    ``(None, None)`` for a napari without these internals: the add is then napari's own."""
    qt_viewer = getattr(getattr(viewer, "window", None), "_qt_viewer", None)
    container = getattr(qt_viewer, "_controls", None)
    add = getattr(container, "_add", None)
    widgets = getattr(container, "widgets", None)
    if add is None or not isinstance(widgets, dict) or not hasattr(container, "addWidget"):
        return None, None

    def placeholder() -> Callable[[], None]:
        frame = QFrame()
        container.addWidget(frame)
        widgets[layer] = frame

        def build() -> None:
            if widgets.get(layer) is not frame:
                return  # removed meanwhile: napari dropped the placeholder
            shown = container.currentWidget() is frame
            add(SimpleNamespace(value=layer))
            if widgets.get(layer) is frame:  # napari's dynamic controls: no panel per layer
                del widgets[layer]
            elif shown:
                container.setCurrentWidget(widgets[layer])
            container.removeWidget(frame)
            frame.deleteLater()

        return build

    return add, placeholder


def _repaint(window: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the window is gone: nothing to paint
        window.setUpdatesEnabled(True)


def _select(layers: Any, layer: Layer) -> None:
    if layer in layers:
        layers.selection.active = layer


def _paint_tools_later(layer: Layer) -> list[Any]:
    """Take a new Labels layer's painting overlays (polygon, brush) off it, and return the
    steps that put them back.  napari builds their visuals when the layer is added (half of the
    ~80 ms an add takes under software OpenGL); added back in passes of their own, the viewer
    answers in between.  A napari without them (or without ``_overlays``): nothing to do."""
    overlays = getattr(layer, "_overlays", None)
    if not isinstance(layer, Labels) or overlays is None:
        return []
    later = []
    for key in ("polygon", "brush_stroke"):
        if key in overlays:
            later.append(functools.partial(overlays.__setitem__, key, overlays.pop(key)))
    return later


#: the time between two steps of :func:`one_per_pass`: enough for the viewer's own timers
#: (and a 10 ms benchmark tick) to run between them, too short for a person to notice
PASS_MS = 10


class _Passes:
    """The dock's one queue of deferred steps: one step per pass of the event loop, whoever
    queued it, so two chains (the Analyse tab's results and a new layer's paint tools) never
    share a pass.  Chains queued by a running step go first: they finish that step's work."""

    def __init__(self) -> None:
        self.jobs: list[tuple[list[Callable[[], Any]], Callable[[], Any] | None]] = []
        self.scheduled = False
        self.running = False

    def add(self, steps: list[Callable[[], Any]], done: Callable[[], Any] | None) -> None:
        if not steps:
            return
        if self.running:
            self.jobs.insert(0, (steps, done))
        else:
            self.jobs.append((steps, done))
        self.schedule()

    def schedule(self) -> None:
        if self.jobs and not self.scheduled:
            self.scheduled = True
            QTimer.singleShot(PASS_MS, self.run_one)

    def run_one(self) -> None:
        self.scheduled = False
        self.jobs = [job for job in self.jobs if job[0]]  # a caller cleared its steps: dropped
        if not self.jobs:
            return
        job = self.jobs[0]
        steps, done = job
        self.running = True
        try:
            steps.pop(0)()
        except RuntimeError:  # a Qt object is gone (the viewer is closing): drop the rest
            steps.clear()
            done = None
        finally:
            self.running = False
            finished = not steps
            if finished:
                self.jobs = [other for other in self.jobs if other is not job]
            self.schedule()
            if finished and done is not None:
                done()


_PASSES = _Passes()


def one_per_pass(steps: list[Callable[[], Any]], done: Callable[[], Any] | None = None) -> None:
    """Run ``steps`` in order, each in a pass of the event loop of its own (:data:`PASS_MS`
    apart; a zero timer is a queued call, run in the same pass), so a chain of 30-80 ms steps
    never blocks the viewer for their sum; then ``done``.  Every chain of the dock shares one
    queue (a step per pass in all); a chain started by a running step runs before the rest.
    ``steps`` is consumed in place: the caller sees what is still to run, and clearing it
    drops the rest.  A step that raises does not stop the chain, except a RuntimeError (a Qt
    object is gone: the viewer is closing), which drops the rest quietly."""
    _PASSES.add(steps, done)


def _reset_view(viewer: Any) -> None:
    with contextlib.suppress(RuntimeError, AttributeError):  # the viewer may be closing
        viewer.reset_view()


def show_image(viewer: Any, name: str, data: np.ndarray, **kwargs: Any) -> Image:
    """Put ``data`` in the Image layer ``name``: update it in place when it exists (keeps the
    user's display settings and position), add it otherwise (beside ``anchor`` when given).
    RGB when the last axis has 3 values."""
    data = np.asarray(data)
    kwargs.setdefault("rgb", data.ndim >= 3 and data.shape[-1] == 3)
    return _replace_or_add(viewer, name, Image, data, **kwargs)


def show_labels(viewer: Any, name: str, data: np.ndarray, **kwargs: Any) -> Labels:
    """Like :func:`show_image` for a Labels layer."""
    return _replace_or_add(viewer, name, Labels, np.asarray(data), **kwargs)


def label_columns(viewer: Any, layer: Image, names: Sequence[str], tile: int, pad: int = 2) -> Any:
    """Write ``names`` above the columns of a :func:`to_tiles` montage (a Points layer of text
    that moves with the montage): what each column of a result shows."""
    x = [pad + i * (tile + pad) + tile / 2 for i in range(len(names))]
    # every other label a line higher: names wider than a tile do not run into each other
    coords = np.array([[-(0.3 + 0.45 * (i % 2)) * tile, xi] for i, xi in enumerate(x)])
    name = f"{layer.name} (columns)"
    if name in viewer.layers:
        viewer.layers.remove(name)
    points = viewer.add_points(
        coords,
        name=name,
        features={"column": list(names)},
        text={"string": "{column}", "color": "white", "size": 9, "anchor": "center"},
        size=1,
        face_color="transparent",
        border_width=0,
        translate=tuple(layer.translate[-2:]),
        scale=tuple(layer.scale[-2:]),
        metadata={"labels_columns_of": layer.name, OUTPUT_KEY: True},
    )
    viewer.layers.selection.active = layer  # the montage stays the layer the user works on
    return points
