"""Regenerate the README pictures of the napari dock, one per tab, after a real run.

    xvfb-run -a python docs/make_screenshots.py [EPOCHS]

Drives the plugin as a user would, with its defaults (sample data -> crop -> train with the
default budget unless EPOCHS is given -> encode/cluster -> pick a cell), then saves
docs/images/napari_cells.png (Cells tab, pairs preview), napari_model.png (Model tab, loss
curve, training reconstructions), napari_widget.png (Analyse tab: clusters, scatter, the picked
cell outlined) and napari_export.png (Export tab).
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


def docked_sample():
    """A 1500 x 900 viewer with the plugin's sample and the dock on the right: (viewer,
    widget, app)."""
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
    return viewer, widget, QApplication.instance()


def main() -> None:
    viewer, widget, app = docked_sample()

    def shot(tab: int, name: str, visible: tuple[str, ...] | None = None) -> None:
        widget.tabs.setCurrentIndex(tab)
        if visible is not None:
            for layer in viewer.layers:
                layer.visible = layer.name in visible
        for _ in range(30):
            app.processEvents()
            time.sleep(0.01)
        viewer.screenshot(str(IMAGES / name), canvas_only=False)

    cells = widget.cells_panel
    cells.extract()
    wait(app, widget)
    cells.preview_pairs(n=6)
    wait(app, widget)
    shot(0, "napari_cells.png")
    model = widget.model_panel
    if len(sys.argv) > 1:
        model.epochs.setValue(int(sys.argv[1]))
    model.train()
    wait(app, widget)
    viewer.layers["synthetic cells labels"].visible = False
    viewer.reset_view()
    shot(1, "napari_model.png")
    analyse = widget.analyse_panel
    analyse.n_clusters.setValue(5)  # the sample's five phenotypes
    analyse.encode()
    wait(app, widget)
    keep = ("synthetic cells", "synthetic cells labels clusters", "ME-VAE selected cell")
    analyse.select_cell(0)
    shot(2, "napari_widget.png", keep)
    shot(3, "napari_export.png")
    print("written:", *sorted(IMAGES.glob("napari_*.png")))
    widget.end_background()
    viewer.close()


if __name__ == "__main__":
    main()
