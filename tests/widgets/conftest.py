"""Fixtures for the headless widget tests: a viewer with the synthetic sample and the dock."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import pytest
from widget_helpers import IMAGE, LABELS, N_CELLS, wait_idle

# run under xvfb-run on Linux CI; without any display fall back to Qt's offscreen platform
if sys.platform.startswith("linux") and not (
    os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("NUMBA_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def sample_layers() -> list[tuple[Any, dict[str, Any], str]]:
    """The plugin's sample (small): one 2-channel image and its labels."""
    from napari_mevae._sample_data import synthetic_cells

    return synthetic_cells(n_cells=N_CELLS, shape=(288, 288), seed=0)


@pytest.fixture
def notes(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Messages the widget showed through napari notifications, by level."""
    from napari_mevae._widgets import _host

    got: dict[str, list[str]] = {"error": [], "warning": [], "info": []}
    monkeypatch.setattr(_host, "show_error", lambda m: got["error"].append(str(m)))
    monkeypatch.setattr(_host, "show_warning", lambda m: got["warning"].append(str(m)))
    # the dock shows news in its status line only; a toast for it would land here
    monkeypatch.setattr(_host, "show_info", lambda m: got["info"].append(str(m)), raising=False)
    return got


@pytest.fixture
def viewer_widget(make_napari_viewer: Callable, qtbot: Any, sample_layers: list, notes: dict):
    """A viewer holding the sample and a docked MEVAEWidget set up for tiny, fast runs."""
    from napari_mevae._widgets import MEVAEWidget

    viewer = make_napari_viewer()
    for data, kwargs, kind in sample_layers:
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = MEVAEWidget(viewer)
    viewer.window.add_dock_widget(widget, name="ME-VAE")
    cells = widget.cells_panel
    cells.image_combo.set_layer(IMAGE)
    cells.labels_combo.set_layer(LABELS)
    cells.size_combo.setCurrentText("32")
    cells.border_combo.setCurrentText("pad")
    cells.scale_combo.setCurrentText("fit")  # 32 px crops: zoom each cell to fit
    model = widget.model_panel
    model.latent.setValue(8)
    model.epochs.setValue(1)
    model.batch.setValue(16)
    model.device.setCurrentText("cpu")
    yield viewer, widget
    # never leave a thread running into the next test
    widget.model_panel.stop()
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)


@pytest.fixture
def extracted(viewer_widget: tuple, qtbot: Any):
    """viewer_widget with the cells already cropped."""
    viewer, widget = viewer_widget
    assert widget.cells_panel.extract() is not None
    wait_idle(qtbot, widget)
    assert widget.session.cells is not None
    return viewer, widget
