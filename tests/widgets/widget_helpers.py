"""Shared constants and helpers of the widget tests (a module, so test files can import it)."""

from __future__ import annotations

from typing import Any

N_CELLS = 30
IMAGE = "synthetic cells"
LABELS = "synthetic cells labels"


def wait_idle(qtbot: Any, widget: Any, timeout: int = 120_000) -> None:
    """Wait for every worker of the widget (and chained ones) to finish."""
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)
    qtbot.wait(50)
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)


def train_and_encode(
    qtbot: Any, widget: Any, notes: dict, clusters: int | None = 3, umap: bool = True
) -> Any:
    """Train one epoch, then Encode (which clusters: ``clusters`` or the tab's default, with
    or without UMAP), asserting each step starts and ends without an error; the Analyse tab."""
    widget.model_panel.epochs.setValue(1)
    assert widget.model_panel.train() is not None, widget.status.text()
    wait_idle(qtbot, widget, timeout=180_000)
    a = widget.analyse_panel
    if clusters is not None:
        a.n_clusters.setValue(clusters)
    a.umap_chk.setChecked(umap)
    assert a.encode() is not None
    wait_idle(qtbot, widget, timeout=240_000)
    assert not notes["error"], notes["error"]
    return a


def click_viewer(analyse: Any, viewer: Any, where: Any) -> None:
    """A mouse click (press, release without a move) at world position ``where`` on the
    viewer, as the Analyse tab's click callback receives it."""
    from types import SimpleNamespace

    import pytest

    press = SimpleNamespace(type="mouse_press", position=tuple(where))
    click = analyse._on_viewer_click(viewer, press)
    next(click)
    press.type = "mouse_release"
    with pytest.raises(StopIteration):
        next(click)
