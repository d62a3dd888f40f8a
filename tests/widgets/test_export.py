"""The Export tab: one CSV row per labelled cell (skipped ones with their reason), and file
names that default to the layer names in the image's folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from widget_helpers import train_and_encode, wait_idle

from napari_mevae._widgets import _export


def test_csv_lists_skipped_cells_and_names_default_to_the_layers(
    viewer_widget, qtbot, tmp_path, monkeypatch, notes
):
    viewer, widget = viewer_widget
    sample_image = viewer.layers["synthetic cells"].data
    sample_labels = viewer.layers["synthetic cells labels"].data
    folder = tmp_path / "field"
    folder.mkdir()
    # a field whose cells partly touch the border, opened by napari from files
    tifffile.imwrite(folder / "field 1.tif", sample_image[:, 20:, 20:])
    tifffile.imwrite(folder / "field 1 labels.tif", sample_labels[20:, 20:])
    (image,) = viewer.open(folder / "field 1.tif")
    (labels,) = viewer.open(folder / "field 1 labels.tif", layer_type="labels")
    assert Path(image.source.path).parent == folder
    cells = widget.cells_panel
    cells.image_combo.set_layer(image)
    cells.labels_combo.set_layer(labels)
    cells.border_combo.setCurrentText("drop")
    cells.min_area.setValue(300)
    assert cells.extract() is not None
    wait_idle(qtbot, widget)
    s = widget.session
    skipped = s.cells.skipped
    assert len(skipped) >= 2
    assert s.labels_layer is labels

    # nothing to export yet: a clear message, no file
    e = widget.export_panel
    monkeypatch.chdir(tmp_path)
    assert e.export_csv() is None and "encode and cluster" in notes["error"][-1]
    notes["error"].clear()

    train_and_encode(qtbot, widget, notes, clusters=None, umap=False)  # no UMAP: faster
    assert f"and {len(skipped)} skipped" in e.status.text()

    # the save dialogs open at the image's folder with the layers' names
    offered = []

    def dialog(parent, title, default, filt):
        offered.append(default)
        return default, filt

    monkeypatch.setattr(_export.QFileDialog, "getSaveFileName", staticmethod(dialog))
    csv = e.export_csv()
    assert csv == folder / "field 1 labels_features.csv" and offered[-1] == str(csv)
    tif = e.export_clusters_tiff()
    assert tif == folder / "field 1 labels clusters.tif" and offered[-1] == str(tif)
    assert np.array_equal(tifffile.imread(tif), viewer.layers["field 1 labels clusters"].data)

    # one row per labelled cell, kept ones with features, skipped ones with the reason only
    df = pd.read_csv(csv, keep_default_na=False, na_values=[""])
    ids = np.unique(labels.data)[1:]
    assert df["label"].tolist() == ids.tolist()
    gone = df["label"].isin(skipped["label"]).to_numpy()
    why = dict(zip(skipped["label"], skipped["skip_reason"], strict=True))
    assert df.loc[gone, "skipped"].tolist() == [why[i] for i in df.loc[gone, "label"]]
    assert df.loc[~gone, "skipped"].isna().all()
    latent = [c for c in df.columns if c[:1] == "z" and c[1:].isdigit()]
    assert len(latent) == s.model.config.latent_dim
    assert df.loc[gone, ["cluster", *latent]].isna().all().all()
    assert df.loc[~gone, ["cluster", *latent]].notna().all().all()
    assert (df["source_image"] == "field 1").all() and (df["source_labels"] == labels.name).all()
    kept = df.loc[~gone].reset_index(drop=True)
    assert kept["label"].tolist() == s.table["label"].tolist()
    assert np.allclose(kept[latent].to_numpy(), s.table[latent].to_numpy(), atol=1e-5)
    assert kept["cluster"].tolist() == s.table["cluster"].tolist()

    # the layer's features: a row for every label too (no text: see test_ncp.py)
    assert labels.features["index"].tolist() == ids.tolist()
    assert "skipped" not in labels.features

    # layers napari did not open from a file: the current directory
    s.image_layer = viewer.layers["synthetic cells"]
    s.labels_layer = viewer.layers["synthetic cells labels"]
    assert e.default_path("csv") == tmp_path / "synthetic cells labels_features.csv"


def test_source_folder_and_file_names(tmp_path, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.chdir(tmp_path)
    none = SimpleNamespace(source=SimpleNamespace(path=None, parent=None))
    opened = SimpleNamespace(source=SimpleNamespace(path=str(tmp_path / "a" / "b.tif")))
    derived = SimpleNamespace(source=SimpleNamespace(path=None, parent=opened))
    assert _export.source_folder(None, none) == tmp_path
    assert _export.source_folder(none, opened) == tmp_path / "a"
    assert _export.source_folder(derived) == tmp_path / "a"
    assert _export._file_name("a/b: c?") == "a_b_ c_"
