"""The ME-VAE dock: one host widget with four tabs that follow the analyst's path,
Cells -> Model -> Analyse -> Export, sharing one :class:`Session`.

The tabs hold no science: they collect choices, call :mod:`napari_mevae.workflow` in thread
workers (training in a child process, see :mod:`napari_mevae.child`) and show what comes back
as layers and plots.  Workers never touch layers or widgets; results are applied in the
``yielded`` / ``returned`` callbacks, which run in the GUI thread.  A tab never reads another
tab's widgets: what they share lives in the session, and changes are announced by its signals.
"""

from __future__ import annotations

from typing import Any

import napari
import numpy as np
import pandas as pd
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Qt, Signal
from qtpy.QtWidgets import QLabel, QPushButton, QTabWidget, QVBoxLayout, QWidget

from ..config import CropSettings

__all__ = ["MEVAEWidget", "Panel", "Session", "button"]


class Session(QObject):
    """What the tabs share: the cells, the nuisances to remove, the model and the results."""

    cells_changed = Signal()
    nuisances_changed = Signal()
    model_changed = Signal()
    results_changed = Signal()
    training_changed = Signal()

    def __init__(self) -> None:
        super().__init__()
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


class Panel(QWidget):
    """Base of the tabs: the viewer, the shared session and the host's status line."""

    def __init__(self, host: MEVAEWidget) -> None:
        super().__init__()
        self.host = host
        self.viewer = host.viewer
        self.session = host.session
        self._worker: Any = None

    @property
    def busy(self) -> bool:
        """Whether this tab's worker is still running."""
        return self._worker is not None

    def error(self, msg: str) -> None:
        self.host.error(msg)

    def info(self, msg: str) -> None:
        self.host.info(msg)


def button(text: str, slot: Any, tip: str = "") -> QPushButton:
    b = QPushButton(text)
    b.clicked.connect(lambda *_: slot())
    if tip:
        b.setToolTip(tip)
    return b


class MEVAEWidget(QWidget):
    """The ME-VAE dock: Cells -> Model -> Analyse -> Export, sharing one :class:`Session`."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        from ._analyse import AnalysePanel
        from ._cells import CellsPanel
        from ._export import ExportPanel
        from ._model import ModelPanel

        self.viewer = viewer
        self.session = Session()
        self.cells_panel = CellsPanel(self)
        self.model_panel = ModelPanel(self)
        self.analyse_panel = AnalysePanel(self)
        self.export_panel = ExportPanel(self)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.cells_panel, "Cells")
        self.tabs.addTab(self.model_panel, "Model")
        self.tabs.addTab(self.analyse_panel, "Analyse")
        self.tabs.addTab(self.export_panel, "Export")
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lay = QVBoxLayout(self)
        lay.addWidget(self.tabs)
        lay.addWidget(self.status)
        self.setMinimumWidth(340)

    @property
    def panels(self) -> tuple[Panel, ...]:
        return (self.cells_panel, self.model_panel, self.analyse_panel, self.export_panel)

    @property
    def busy(self) -> bool:
        """Whether any worker of this widget is still running (tests wait on it)."""
        return any(p.busy for p in self.panels)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        """Closing the dock stops a running training (its process saves the model)."""
        self.model_panel.stop()
        super().closeEvent(event)

    def error(self, msg: str) -> None:
        """Tell the user what is wrong (status line + napari notification); change nothing."""
        self.status.setText(f"Error: {msg}")
        self.status.setStyleSheet("color: #ff7f7f;")
        show_error(msg)

    def info(self, msg: str) -> None:
        self.status.setText(msg)
        self.status.setStyleSheet("")
        show_info(msg)
