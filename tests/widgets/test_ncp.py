"""napari-clusters-plotter (NCP) reads what the ME-VAE dock writes, through NCP's own widget.

NCP pairs a Labels layer's features rows with the layer's label ids in order (colours, the
cluster export), takes categorical columns as classes and the others as numbers: so the layer
holds one row per labelled cell (skipped ones too), ``cluster`` and the sample's ``true_class``
are integer categoricals, and there is no text column.  The dock scrolls instead of forcing its
height, so NCP's plot docked under it keeps room.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from napari_clusters_plotter import PlotterWidget
from widget_helpers import IMAGE, LABELS, N_CELLS, train_and_encode, wait_idle

CUT = 20  # cropping the sample's field by this much makes a few cells touch the border
MIN_AREA = 300  # and one cell is smaller than this


def _items(box) -> list[str]:
    return [box.itemText(i) for i in range(box.count())]


def test_ncp_plots_and_exports_mevae_clusters(viewer_widget, qtbot, notes):
    viewer, widget = viewer_widget
    image, labels = viewer.layers[IMAGE], viewer.layers[LABELS]
    image.data = image.data[:, CUT:, CUT:]
    labels.data = labels.data[CUT:, CUT:]
    assert np.unique(labels.data).size - 1 == N_CELLS  # every cell still there, ids 1..30
    cells = widget.cells_panel
    cells.border_combo.setCurrentText("drop")
    cells.min_area.setValue(MIN_AREA)
    assert cells.extract() is not None
    wait_idle(qtbot, widget)
    s = widget.session
    skipped = s.cells.skipped
    assert len(skipped) >= 2 and skipped["skip_reason"].str.contains("border").any()
    assert skipped["skip_reason"].str.contains("min_area").any()

    # NCP's plotter, opened through napari's plugin menu, docked under the ME-VAE dock
    viewer.layers.selection.active = labels
    _, plotter = viewer.window.add_plugin_dock_widget(
        "napari-clusters-plotter", "Plot & select features"
    )
    assert isinstance(plotter, PlotterWidget)
    assert plotter.layers == [labels]

    a = train_and_encode(qtbot, widget, notes)

    # the layer: one row per labelled cell in label order, numbers and categoricals only
    feats = labels.features
    assert feats["index"].tolist() == list(range(1, N_CELLS + 1))
    assert isinstance(feats["cluster"].dtype, pd.CategoricalDtype)
    assert feats["cluster"].cat.categories.dtype == np.int64
    assert isinstance(feats["true_class"].dtype, pd.CategoricalDtype)
    assert feats.select_dtypes(include=["object", "string"]).columns.tolist() == []
    gone = feats["index"].isin(skipped["label"])
    assert feats.loc[gone, "z0"].isna().all() and feats.loc[~gone, "z0"].notna().all()
    assert (feats.loc[gone, "cluster"] == 0).all()
    assert set(feats.loc[~gone, "cluster"]) <= {1, 2, 3}
    assert isinstance(s.table["cluster"].dtype, pd.CategoricalDtype)  # the library's table too

    # NCP follows napari's layer selection, which moved to the new "<labels> clusters" layer
    assert plotter.layers == [viewer.layers[f"{LABELS} clusters"]]
    viewer.layers.selection.active = labels
    # NCP lists our columns and sorts them as we mean them
    latent = [f"z{i}" for i in range(s.model.config.latent_dim)]
    assert {*latent, "UMAP0", "UMAP1", "cluster", "true_class"} <= set(plotter.common_columns)
    assert {"cluster", "true_class"} <= set(plotter.categorical_columns)
    x_items, hue_items = _items(plotter._selectors["x"]), _items(plotter._selectors["hue"])
    assert {*latent, "UMAP0", "UMAP1"} <= set(x_items)
    assert "cluster" not in x_items and "true_class" not in x_items  # classes are not axes
    assert {"cluster", "true_class"} <= set(hue_items)

    # plot UMAP0/UMAP1 coloured by our clusters; the skipped cells are NaN points (not drawn)
    plotter.x_axis, plotter.y_axis = "UMAP0", "UMAP1"
    plotter.hue_axis = "cluster"
    artist = plotter.plotting_widget.active_artist
    assert np.allclose(artist.data, feats[["UMAP0", "UMAP1"]].to_numpy(), equal_nan=True)
    indices = np.asarray(artist.color_indices)
    assert indices.dtype == np.int64  # class ids, not a continuous scale
    assert np.array_equal(indices, feats["cluster"].to_numpy())

    # the plot's colours on the layer: every cell gets its own cluster's colour, also after
    # the skipped cells (so NCP's rows line up with the label ids)
    plotter.plotting_widget.show_color_overlay = True
    colours = labels.colormap.color_dict
    for label, cl in zip(feats["index"], feats["cluster"], strict=True):
        want = artist.color_indices_to_rgba(np.array([cl]))[0]
        assert np.allclose(colours[int(label)], want), (label, cl)

    # NCP's cluster export accepts our categorical: the biggest cluster as a layer of its own
    counts = feats.loc[~gone, "cluster"].value_counts()
    biggest = int(counts.idxmax())
    members = feats.loc[feats["cluster"] == biggest, "index"].to_numpy()
    plotter.plotting_widget.class_spinbox.value = biggest
    plotter._on_export_clusters()
    exported = viewer.layers[f"{LABELS} subcluster {biggest}"]
    assert np.array_equal(exported.data > 0, np.isin(labels.data, members))
    assert sorted(np.asarray(exported.features["original_label"], int)) == sorted(members)
    clusters_layer = viewer.layers[f"{LABELS} clusters"]
    assert np.array_equal(exported.data > 0, clusters_layer.data == biggest)

    # the sample's ground truth as hue: integer classes 1..5
    viewer.layers.selection.active = labels  # the exported layer took the selection
    plotter.hue_axis = "true_class"
    indices = np.asarray(plotter.plotting_widget.active_artist.color_indices)
    assert indices.dtype == np.int64
    assert np.array_equal(indices, feats["true_class"].to_numpy())
    assert set(indices) <= {1, 2, 3, 4, 5} and len(set(indices)) == 5

    # clustering again replaces our columns and keeps NCP's (its manual selection)
    assert "MANUAL_CLUSTER_ID" in labels.features
    a.n_clusters.setValue(2)
    assert a.cluster() is not None
    wait_idle(qtbot, widget)
    assert not notes["error"], notes["error"]
    feats = labels.features
    assert set(feats.loc[~gone, "cluster"]) <= {1, 2}
    assert "MANUAL_CLUSTER_ID" in feats and "true_class" in feats
    assert len(feats) == N_CELLS


def test_dock_scrolls_and_leaves_room_below(viewer_widget, qtbot):
    """The dock no longer forces its full height on the window: NCP's plot docked under it in
    a 700 px tall window keeps a usable height, and the dock's tabs scroll."""
    viewer, widget = viewer_widget
    plotter = PlotterWidget(viewer)
    ncp_dock = viewer.window.add_dock_widget(plotter, name="NCP", area="right")
    window = viewer.window._qt_window
    window.show()
    window.resize(1100, 700)
    qtbot.wait(300)
    assert window.height() <= 700, window.height()  # not grown to fit the dock (was ~1200)
    assert ncp_dock.height() >= 250, ncp_dock.height()  # 450 here
    assert plotter.plotting_widget.height() >= 100, plotter.plotting_widget.height()  # 207
    assert widget.minimumSizeHint().height() < 300  # the tallest tab alone is ~770 px
    widget.tabs.setCurrentIndex(1)  # the Model tab, the tallest
    qtbot.wait(100)
    page = widget.tabs.currentWidget()
    assert page.widget() is widget.model_panel
    assert page.verticalScrollBar().maximum() > 0  # taller than the room it has: it scrolls
