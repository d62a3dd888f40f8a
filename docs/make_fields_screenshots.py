"""Regenerate the README pictures of several fields in the napari dock.

    xvfb-run -a python docs/make_fields_screenshots.py [EPOCHS]

Two synthetic fields (the sample and a second one, ``field 2``) are cropped together, one model
trained (EPOCHS, default 80), encoded and clustered; then saves docs/images/napari_fields.png
(Cells tab: the pair list) and napari_fields_analyse.png (Analyse tab after a click on a point
of field 2: field 2 in view, its cell outlined).
"""

from __future__ import annotations

import sys
import time

from make_screenshots import IMAGES, docked_sample, wait


def main() -> None:
    import numpy as np

    from napari_mevae._sample_data import synthetic_cells

    viewer, widget, app = docked_sample()
    (image2, _, _), (labels2, _, _) = synthetic_cells(n_cells=30, shape=(320, 320), seed=5)

    def shot(tab: int, name: str) -> None:
        widget.tabs.setCurrentIndex(tab)
        for _ in range(30):
            app.processEvents()
            time.sleep(0.01)
        viewer.screenshot(str(IMAGES / name), canvas_only=False)

    cells = widget.cells_panel
    cells.open_fields([(image2, labels2, "field 2")], extract=False)
    cells.pair_list.set_checked(["synthetic cells labels", "field 2 labels"])
    cells.extract()
    wait(app, widget)
    shot(0, "napari_fields.png")
    model = widget.model_panel
    model.epochs.setValue(int(sys.argv[1]) if len(sys.argv) > 1 else 80)
    model.train()
    wait(app, widget)
    analyse = widget.analyse_panel
    analyse.n_clusters.setValue(3)
    analyse.encode()
    wait(app, widget)
    s = widget.session
    row = int(np.flatnonzero(s.cells.kept["field"].to_numpy() == 1)[3])
    analyse.select_cell(row)
    viewer.camera.zoom /= 3  # the cell with its neighbours
    shot(2, "napari_fields_analyse.png")
    viewer.close()


if __name__ == "__main__":
    main()
