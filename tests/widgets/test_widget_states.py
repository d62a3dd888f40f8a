"""The dock never lets the user do something that cannot work or would spoil running work:
buttons follow what is possible, actions that would invalidate a run are refused with a
message, the status line starts afresh with each action, and closing the viewer mid-run ends
the background processes cleanly."""

from __future__ import annotations

import subprocess
import sys

from widget_helpers import wait_idle


def _enabled(*buttons) -> list[bool]:
    return [b.isEnabled() for b in buttons]


def test_buttons_follow_what_is_possible(viewer_widget, qtbot, notes):
    viewer, widget = viewer_widget
    c, m, a, e = widget.cells_panel, widget.model_panel, widget.analyse_panel, widget.export_panel
    # nothing extracted yet: only extraction and loading a model make sense
    assert _enabled(c.extract_btn, c.preview_btn) == [True, False]
    assert _enabled(m.train_btn, m.stop_btn, m.save_btn, m.load_btn) == [False, False, False, True]
    assert _enabled(a.encode_btn, a.cluster_btn, a.traverse_btn, a.cancel_btn) == [False] * 4
    assert _enabled(e.csv_btn, e.tiff_btn) == [False, False]
    c.extract()
    wait_idle(qtbot, widget)
    assert _enabled(c.preview_btn, m.train_btn) == [True, True]
    assert not a.encode_btn.isEnabled()  # no model yet
    m.epochs.setValue(40)
    m.batch.setValue(2)
    steps = []
    worker = m.train()
    worker.yielded.connect(lambda r: steps.append(r.kind))
    qtbot.waitUntil(lambda: "step" in steps, timeout=60_000)
    # while training: stop is the one model action; extraction would change its cells
    assert _enabled(m.train_btn, m.stop_btn, m.load_btn, c.extract_btn) == [
        False,
        True,
        False,
        False,
    ]
    assert c.extract() is None and "Training is running" in notes["error"][-1]
    assert widget.status.text().startswith("Error:")
    m.stop()
    wait_idle(qtbot, widget)
    # a new action starts with a clean status line, not the last error
    assert not widget.status.text().startswith("Error:")
    assert _enabled(m.train_btn, m.save_btn, a.encode_btn, a.traverse_btn) == [True] * 4
    assert not a.cluster_btn.isEnabled()  # nothing encoded yet
    a.encode()
    wait_idle(qtbot, widget, timeout=240_000)
    assert not notes["error"][1:], notes["error"]
    assert _enabled(a.cluster_btn, e.csv_btn, e.tiff_btn) == [True, True, True]


def test_closing_the_viewer_mid_training_ends_cleanly(tmp_path):
    """In a fresh process, as a user would: Train, close the viewer; no Qt traceback, the
    training process ends and napari exits."""
    script = tmp_path / "close.py"
    script.write_text(
        f"""
import sys, time
sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
import napari
from qtpy.QtWidgets import QApplication
from napari_mevae._sample_data import synthetic_cells
from napari_mevae._widgets import MEVAEWidget
viewer = napari.Viewer(show=True)
for data, kw, kind in synthetic_cells():
    getattr(viewer, "add_" + kind)(data, **kw)
w = MEVAEWidget(viewer)
viewer.window.add_dock_widget(w)
w.cells_panel.size_combo.setCurrentText("32")
w.cells_panel.scale_combo.setCurrentText("fit")
w.cells_panel.extract()
app = QApplication.instance()
t = time.time()
while w.busy and time.time() - t < 60:
    app.processEvents(); time.sleep(0.01)
w.model_panel.epochs.setValue(500)
w.model_panel.batch.setValue(2)
w.model_panel.train()
run = w.model_panel.run
t = time.time()
while time.time() - t < 8:
    app.processEvents(); time.sleep(0.01)
viewer.close()
t = time.time()
while time.time() - t < 5:
    app.processEvents(); time.sleep(0.01)
code = run.service._proc.wait(timeout=30)
print("child exit", code)
"""
    )
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=240
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "child exit 0" in out
    assert "wrapped C/C++ object" not in out and "Traceback" not in out, out


def test_the_layer_boxes_never_offer_the_docks_own_results(extracted, qtbot, notes):
    """After the source layers are removed (say, mid-training), the boxes do not fall back on
    the plugin's own output layers: there is nothing to crop, and extracting says so."""
    from widget_helpers import IMAGE, LABELS

    from napari_mevae._widgets._cells import PAIRS_LAYER

    viewer, widget = extracted
    cells = widget.cells_panel
    cells.preview_pairs(n=2)
    wait_idle(qtbot, widget)
    assert PAIRS_LAYER in viewer.layers
    viewer.layers.remove(IMAGE)
    viewer.layers.remove(LABELS)
    assert cells.image_combo.layer() is None and cells.labels_combo.layer() is None
    assert PAIRS_LAYER not in [
        cells.image_combo.itemText(i) for i in range(cells.image_combo.count())
    ]
    assert cells.extract() is None and "No Image layer" in notes["error"][-1]


def test_results_reach_the_viewer_a_step_per_pass(viewer_widget, qtbot):
    """Results are shown as steps, each in its own pass of the event loop (a timer tick can
    run between two), and the tab is busy, its buttons off, until the last one has run."""
    from qtpy.QtCore import QTimer

    _, widget = viewer_widget
    a = widget.analyse_panel
    ran, ticks = [], []
    timer = QTimer()
    timer.setInterval(0)  # a tick on every pass
    timer.timeout.connect(lambda: ticks.append(len(ran)))
    timer.start()
    a._in_steps([lambda: ran.append("layer"), lambda: ran.append("scatter")])
    assert ran == [] and a.busy and widget.busy  # nothing yet: the first step is a pass away
    qtbot.waitUntil(lambda: not a.busy, timeout=5_000)
    timer.stop()
    assert ran == ["layer", "scatter"]
    assert 1 in ticks  # the event loop ran between the two steps
    assert not a.cancel_btn.isEnabled()
    # the dock closing drops the steps not yet run
    a._in_steps([lambda: ran.append("late")])
    a.detach()
    qtbot.wait(50)
    assert ran == ["layer", "scatter"] and not a.busy


def test_status_line_keeps_its_height(viewer_widget, qtbot):
    """A new status message repaints the line, not the whole dock (no relayout)."""
    _, widget = viewer_widget
    qtbot.wait(50)
    before = widget.status.height()
    widget.info("Two short lines of status:\nthe second one.")
    widget.warn("A warning that is a little longer but still fits in the status line.")
    qtbot.wait(50)
    assert widget.status.height() == before
    assert widget.status.styleSheet() == "color: #ffd27f;"
    widget.clear_status()
    assert widget.status.styleSheet() == ""


def test_a_new_labels_layer_gets_its_paint_tools_back_a_pass_later(make_napari_viewer, qtbot):
    """A result Labels layer is added without napari's painting overlays, which come back in
    passes of their own (a timer tick runs in between); painting on it then works as on any
    labels layer."""
    import numpy as np
    from qtpy.QtCore import QTimer

    from napari_mevae._widgets._layers import show_labels

    viewer = make_napari_viewer()
    plain = viewer.add_labels(np.zeros((8, 8), np.uint8), name="plain")
    ticks: list[set[str]] = []
    data = np.zeros((32, 32), np.uint8)
    data[4:12, 4:12] = 1
    layer = show_labels(viewer, "cells clusters", data)
    timer = QTimer()
    timer.setInterval(0)
    timer.timeout.connect(lambda: ticks.append(set(layer._overlays)))
    timer.start()
    assert "polygon" not in layer._overlays  # not yet
    qtbot.waitUntil(lambda: set(layer._overlays) == set(plain._overlays), timeout=5_000)
    timer.stop()
    assert any("polygon" in t and "brush_stroke" not in t for t in ticks)  # one per pass
    layer.mode = "paint"
    layer.selected_label = 2
    layer.paint((20, 20), 2)
    assert layer.data[20, 20] == 2 and layer.data[5, 5] == 1
    layer.mode = "polygon"
    assert layer._overlays["polygon"].enabled


def test_steps_one_per_pass_stop_when_the_viewer_goes(qtbot):
    """A step that finds the viewer gone (RuntimeError) ends the chain quietly."""
    from napari_mevae._widgets._layers import one_per_pass

    ran: list[str] = []

    def gone() -> None:
        ran.append("gone")
        raise RuntimeError("wrapped C/C++ object has been deleted")

    one_per_pass([lambda: ran.append("a"), gone, lambda: ran.append("never")])
    qtbot.wait(100)
    assert ran == ["a", "gone"]


def test_the_window_repaints_a_pass_after_a_new_layer(make_napari_viewer, qtbot):
    """Adding a result layer holds the window's repaint and the layer's controls panel for a
    pass each (napari's add, its controls and the full-window paint under software OpenGL
    took ~100 ms in one block); updating an existing layer holds nothing; the window always
    ends up painting, with the new layer shown, selected and its real controls panel on."""
    import numpy as np
    from napari._qt.layer_controls.qt_image_controls import QtImageControls

    from napari_mevae._widgets._layers import show_image

    viewer = make_napari_viewer()
    window = viewer.window._qt_window
    container = viewer.window._qt_viewer.controls
    layer = show_image(viewer, "cells reconstructions", np.ones((16, 16), np.float32))
    assert not window.updatesEnabled()  # the paint waits for the next pass
    assert not isinstance(container.widgets[layer], QtImageControls)  # a placeholder
    qtbot.waitUntil(window.updatesEnabled, timeout=5_000)
    qtbot.waitUntil(lambda: viewer.layers.selection.active is layer, timeout=5_000)
    panel = container.widgets[layer]
    assert isinstance(panel, QtImageControls) and container.currentWidget() is panel
    assert layer in viewer.layers and layer.visible
    show_image(viewer, "cells reconstructions", np.zeros((16, 16), np.float32))
    assert window.updatesEnabled()  # in place: nothing added, nothing held
    assert viewer.layers["cells reconstructions"].data.max() == 0
    assert container.widgets[layer] is panel


def test_a_result_layer_selected_or_removed_at_once_is_fine(make_napari_viewer, qtbot):
    """Before its controls panel is built (a pass after the add), selecting the new layer
    shows a placeholder, then the real panel; removing it leaves no panel behind."""
    import numpy as np
    from napari._qt.layer_controls.qt_image_controls import QtImageControls

    from napari_mevae._widgets._layers import show_image

    viewer = make_napari_viewer()
    container = viewer.window._qt_viewer.controls
    kept = show_image(viewer, "kept", np.ones((8, 8), np.float32))
    viewer.layers.selection.active = kept  # napari shows the placeholder meanwhile
    gone = show_image(viewer, "gone", np.ones((8, 8), np.float32))
    viewer.layers.remove(gone)
    qtbot.waitUntil(lambda: isinstance(container.widgets.get(kept), QtImageControls), timeout=5_000)
    qtbot.wait(100)  # every deferred step has run
    assert gone not in container.widgets
    assert container.currentWidget() is container.widgets[kept]
    assert [ly.name for ly in viewer.layers] == ["kept"]


def test_every_chain_of_steps_shares_one_queue(qtbot):
    """Two chains never run steps in the same pass (a zero timer ticks between any two steps),
    a chain started by a running step goes before the rest, and each chain's ``done`` comes
    after its own last step."""
    from qtpy.QtCore import QTimer

    from napari_mevae._widgets._layers import one_per_pass

    ran: list[str] = []
    seen: list[int] = []
    timer = QTimer()
    timer.setInterval(0)
    timer.timeout.connect(lambda: seen.append(len(ran)))
    timer.start()

    def a2() -> None:
        ran.append("a2")
        one_per_pass([lambda: ran.append("n1"), lambda: ran.append("n2")])

    one_per_pass(
        [lambda: ran.append("a1"), a2, lambda: ran.append("a3")],
        done=lambda: ran.append("a done"),
    )
    one_per_pass([lambda: ran.append("b1")], done=lambda: ran.append("b done"))
    qtbot.waitUntil(lambda: "b done" in ran, timeout=5_000)
    timer.stop()
    assert ran == ["a1", "a2", "n1", "n2", "a3", "a done", "b1", "b done"]
    steps_done = [sum(1 for r in ran[:n] if "done" not in r) for n in seen]
    assert max(b - a for a, b in zip(steps_done, steps_done[1:], strict=False)) == 1
