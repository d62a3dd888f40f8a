"""What the tabs share: the :class:`Session` (cells, nuisances, model, results, announced by
signals) and the :class:`Panel` base class.  A tab never reads another tab's widgets."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
from napari.layers import Image, Labels
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QPushButton, QWidget

from ..config import CropSettings

__all__ = ["Field", "Host", "Panel", "Session", "button", "job_in"]


@dataclass
class Field:
    """One field of the cells: its image and labels layers, how it was cropped and, once
    clustered, its clusters layer."""

    image: Image | None = None
    labels: Labels | None = None
    settings: CropSettings | None = None
    clusters: Labels | None = None

    @property
    def layers(self) -> list[Any]:
        return [ly for ly in (self.image, self.labels, self.clusters) if ly is not None]


class Session(QObject):
    """What the tabs share: the cells, the nuisances to remove, the model and the results."""

    cells_changed = Signal()
    nuisances_changed = Signal()
    model_changed = Signal()
    results_changed = Signal()
    training_changed = Signal()
    state_changed = Signal()  # after any of the above: buttons follow it
    field_changed = Signal()  # another field came into view (show_field)

    def __init__(self) -> None:
        super().__init__()
        for signal in (
            self.cells_changed,
            self.model_changed,
            self.results_changed,
            self.training_changed,
        ):
            signal.connect(self.state_changed.emit)
        # the fields the cells came from (one per image + labels pair, in the cells' field
        # order) and the one in view: the image_layer / labels_layer / clusters_layer
        self.fields: list[Field] = []
        self.current = 0
        self.cells: Any = None  # fields.FieldCrops (a cells.CellCrops with a field column)
        self.settings: CropSettings | None = None
        self.nuisances: list[str] = ["rotation", "polarity"]  # the Model tab's choice
        self.training = False  # a training run is going on
        self.model: Any = None  # model.MEVAE
        self.checkpoint_path: str | None = None  # the current model's checkpoint file
        self.model_source = ""
        self.model_type = ""  # "ME-VAE", "VAE" or "beta-VAE"
        self.history: list[dict[str, Any]] = []
        self.optimizer_state: dict[str, Any] | None = None
        self.latents: np.ndarray | None = None
        self.recon: np.ndarray | None = None
        self.embedding: np.ndarray | None = None
        self.clusters: np.ndarray | None = None
        self.table: pd.DataFrame | None = None  # features of the kept cells of every field
        self.selected_row: int | None = None

    def _field(self, create: bool = False) -> Field | None:
        if not self.fields and create:
            self.fields.append(Field())
        if not self.fields:
            return None
        return self.fields[min(self.current, len(self.fields) - 1)]

    def show_field(self, index: int) -> None:
        """Make field ``index`` the one in view: with several fields (which usually lie on top
        of each other) its image, labels and clusters layers are shown, the others hidden."""
        changed = index != self.current
        self.current = index
        if changed:
            self.field_changed.emit()
        if len(self.fields) < 2:
            return
        mine = {id(ly) for ly in self.fields[index].layers}
        for f in self.fields:
            for ly in f.layers:
                ly.visible = id(ly) in mine

    @property
    def anchor(self) -> Image | None:
        """The image result montages go beside: the field image reaching furthest right (the
        fields lie on top of each other), so a montage never covers any field."""
        images = [f.image for f in self.fields if f.image is not None]
        if len(images) < 2:
            return self.image_layer
        return max(images, key=lambda ly: float(np.asarray(ly.extent.world)[1, -1]))

    @property
    def image_layer(self) -> Image | None:
        """The image of the field in view."""
        f = self._field()
        return None if f is None else f.image

    @image_layer.setter
    def image_layer(self, layer: Image | None) -> None:
        self._field(create=True).image = layer

    @property
    def labels_layer(self) -> Labels | None:
        """The labels of the field in view."""
        f = self._field()
        return None if f is None else f.labels

    @labels_layer.setter
    def labels_layer(self, layer: Labels | None) -> None:
        self._field(create=True).labels = layer

    @property
    def clusters_layer(self) -> Labels | None:
        """The clusters layer of the field in view."""
        f = self._field()
        return None if f is None else f.clusters

    @clusters_layer.setter
    def clusters_layer(self, layer: Labels | None) -> None:
        self._field(create=True).clusters = layer

    @property
    def crops(self) -> np.ndarray | None:
        return None if self.cells is None else np.asarray(self.cells.crops)

    def set_nuisances(self, names: list[str]) -> None:
        if list(names) != self.nuisances:
            self.nuisances = list(names)
            self.nuisances_changed.emit()

    def set_training(self, on: bool) -> None:
        self.training = on
        self.training_changed.emit()

    def clear_results(self) -> None:
        self.latents = self.recon = self.embedding = self.clusters = None
        self.table = None
        self.selected_row = None


class Host(Protocol):
    """What a tab sees of the dock it lives in (``_host.MEVAEWidget``)."""

    viewer: Any
    session: Session

    def error(self, msg: str) -> None: ...

    def warn(self, msg: str) -> None: ...

    def info(self, msg: str) -> None: ...

    def clear_status(self) -> None: ...


class Panel(QWidget):
    """Base of the tabs: the viewer, the shared session and the host's status line."""

    def __init__(self, host: Host) -> None:
        super().__init__()
        self.host = host
        self.viewer = host.viewer
        self.session = host.session
        self._worker: Any = None

    @property
    def busy(self) -> bool:
        """Whether this tab's worker is still running."""
        return self._worker is not None

    def update_buttons(self) -> None:
        """Enable exactly the actions that can work now (each tab says which)."""

    def begin(self) -> None:
        """An action starts: the status line forgets the last one, the buttons follow."""
        self.host.clear_status()
        self.update_buttons()

    def detach(self) -> None:
        """Disconnect the running worker from this tab (the dock is closing): whatever it
        still reports goes nowhere."""
        worker, self._worker = self._worker, None
        if worker is None:
            return
        for name in ("yielded", "returned", "errored", "finished", "aborted"):
            signal = getattr(worker, name, None)
            if signal is not None:
                with contextlib.suppress(TypeError, RuntimeError):
                    signal.disconnect()

    def error(self, msg: str) -> None:
        self.host.error(msg)

    def warn(self, msg: str) -> None:
        self.host.warn(msg)

    def info(self, msg: str) -> None:
        self.host.info(msg)


def button(text: str, slot: Any, tip: str = "") -> QPushButton:
    b = QPushButton(text)
    b.clicked.connect(lambda *_: slot())
    if tip:
        b.setToolTip(tip)
    return b


def job_in(service: Any, target: str, *args: Any) -> Any:
    """A thread worker's body: one job of a background process (child.ChildService), started
    once the job before it has ended; forwards what the job yields (waiting on the pipe
    releases the GIL, so the GUI thread runs freely) and returns what it returns."""
    return (yield from service.submit(target, *args, wait=True))
