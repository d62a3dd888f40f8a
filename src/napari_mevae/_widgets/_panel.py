"""What the tabs share: the :class:`Session` (cells, nuisances, model, results, announced by
signals) and the :class:`Panel` base class.  A tab never reads another tab's widgets."""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import numpy as np
import pandas as pd
from napari.layers import Image, Labels
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QPushButton, QWidget

from ..config import CropSettings

__all__ = ["Host", "Panel", "Session", "button", "job_in"]


class Session(QObject):
    """What the tabs share: the cells, the nuisances to remove, the model and the results."""

    cells_changed = Signal()
    nuisances_changed = Signal()
    model_changed = Signal()
    results_changed = Signal()
    training_changed = Signal()
    state_changed = Signal()  # after any of the above: buttons follow it

    def __init__(self) -> None:
        super().__init__()
        for signal in (
            self.cells_changed,
            self.model_changed,
            self.results_changed,
            self.training_changed,
        ):
            signal.connect(self.state_changed.emit)
        self.image_layer: Image | None = None
        self.labels_layer: Labels | None = None
        self.cells: Any = None  # cells.CellCrops
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
        self.table: pd.DataFrame | None = None
        self.clusters_layer: Labels | None = None
        self.selected_row: int | None = None

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
