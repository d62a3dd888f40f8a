"""Regenerate the README pictures: the napari dock after a real run, and the demo figure.

    xvfb-run -a python docs/make_screenshots.py

Drives the plugin as a user would (sample data -> crop -> train -> encode/cluster), then saves
docs/images/napari_widget.png (viewer with the dock, Analyse tab) and docs/images/napari_model.png
(Model tab with the loss curve).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMAGES = HERE / "images"


def wait(app, widget, timeout: float = 600) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        app.processEvents()
        time.sleep(0.02)
        if not widget.busy:
            for _ in range(20):
                app.processEvents()
                time.sleep(0.01)
            if not widget.busy:
                return
    raise TimeoutError("widget still busy")


def main() -> None:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_mevae._sample_data import synthetic_cells
    from napari_mevae._widgets import MEVAEWidget

    IMAGES.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 900)
    for data, kwargs, kind in synthetic_cells():
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = MEVAEWidget(viewer)
    viewer.window.add_dock_widget(widget, name="ME-VAE", area="right")
    app = QApplication.instance()
    cells = widget.cells_panel
    cells.size_combo.setCurrentText("32")
    cells.scale_combo.setCurrentText("fit")
    cells.extract()
    wait(app, widget)
    cells.preview_pairs(n=6)
    wait(app, widget)
    model = widget.model_panel
    model.epochs.setValue(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
    model.train()
    wait(app, widget)
    widget.tabs.setCurrentIndex(1)
    viewer.layers["synthetic cells labels"].visible = False
    viewer.reset_view()
    for _ in range(20):
        app.processEvents()
    viewer.screenshot(str(IMAGES / "napari_model.png"), canvas_only=False)
    analyse = widget.analyse_panel
    analyse.n_clusters.setValue(3)
    analyse.encode()
    wait(app, widget)
    for layer in viewer.layers:
        layer.visible = layer.name in ("synthetic cells", "synthetic cells labels clusters")
    viewer.reset_view()
    widget.tabs.setCurrentIndex(2)
    for _ in range(20):
        app.processEvents()
    viewer.screenshot(str(IMAGES / "napari_widget.png"), canvas_only=False)
    print("written:", *sorted(IMAGES.glob("napari_*.png")))
    viewer.close()


if __name__ == "__main__":
    main()
