"""Several fields in the dock: two image + labels pairs cropped, encoded and clustered as one;
each labels layer gets its own features and clusters layer, the scatter shows every cell, a
point of the other field brings that field into view, a click on a cell rings its point, and
the export holds every field with its source layers (CSV and Parquet)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
from widget_helpers import IMAGE, LABELS, click_viewer, train_and_encode, wait_idle

from napari_mevae._widgets._analyse import SELECTION_LAYER


def _second_field():
    from napari_mevae._sample_data import synthetic_cells

    (img, _, _), (lab, _, _) = synthetic_cells(
        n_cells=18, shape=(320, 320), seed=3
    )  # wider than the sample
    return img, lab


def test_two_fields_one_analysis(viewer_widget, qtbot, tmp_path, notes):
    viewer, widget = viewer_widget
    img2, lab2 = _second_field()
    # a field added as napari layers; the pairing finds each labels layer's image by name
    viewer.add_image(img2, name="field 2")
    viewer.add_labels(lab2, name="field 2 labels")
    cells = widget.cells_panel
    assert not cells.pair_list.isVisible() and cells.labels_combo.isEnabled()  # one pair: default
    cells.fields_chk.setChecked(True)
    image1, labels1 = viewer.layers[IMAGE], viewer.layers[LABELS]
    image2, labels2 = viewer.layers["field 2"], viewer.layers["field 2 labels"]
    assert cells.pair_list.pairs() == [(image1, labels1), (image2, labels2)]
    assert cells.pair_list.item(1).text() == "field 2 labels \u2190 field 2"
    assert "same name" in cells.pair_list.item(1).toolTip()
    assert not cells.labels_combo.isEnabled()

    assert cells.extract() is not None
    wait_idle(qtbot, widget)
    assert not notes["error"], notes["error"]
    s = widget.session
    ids1, ids2 = np.unique(labels1.data)[1:], np.unique(labels2.data)[1:]
    assert s.cells.names == [LABELS, "field 2 labels"]
    assert len(s.cells.table) == len(ids1) + len(ids2)
    assert "2 fields" in cells.summary.text() and "field 2 labels: " in cells.summary.text()
    assert [f.labels for f in s.fields] == [labels1, labels2]
    assert labels1.visible and image1.visible and not (labels2.visible or image2.visible)

    a = train_and_encode(qtbot, widget, notes)

    # each labels layer: its own rows (index = its label ids), its own clusters layer
    kept = s.cells.kept
    n = len(kept)
    for labels, ids, f in ((labels1, ids1, 0), (labels2, ids2, 1)):
        feats = labels.features
        assert feats["index"].tolist() == ids.tolist()
        assert isinstance(feats["cluster"].dtype, pd.CategoricalDtype)
        mine = s.cells.field_table(s.table, f)
        assert np.allclose(feats.set_index("index").loc[mine["label"], "z0"], mine["z0"])
        clusters = viewer.layers[f"{labels.name} clusters"]
        assert s.fields[f].clusters is clusters
        for lab, cl in zip(mine["label"][:5], mine["cluster"][:5], strict=True):
            assert set(np.unique(clusters.data[labels.data == lab])) == {cl}
    assert f"{n} cells" in a.scatter._title and len(a.scatter.xy) == n  # every cell plotted
    # the montage of every cell lies beside the widest field, covering none
    recon = viewer.layers["2 fields reconstructions"]
    assert recon.extent.world[0][-1] > image2.extent.world[1][-1] > image1.extent.world[1][-1]

    # a point of field 2 brings field 2 into view and outlines its cell
    sc = a.scatter
    row = int(np.flatnonzero(kept["field"].to_numpy() == 1)[2])
    x, y = sc.xy[row]
    sc._on_click(SimpleNamespace(inaxes=sc.ax, xdata=float(x), ydata=float(y)))
    assert sc.selected == row and s.current == 1 and s.labels_layer is labels2
    assert image2.visible and labels2.visible and s.fields[1].clusters.visible
    assert not (image1.visible or labels1.visible or s.fields[0].clusters.visible)
    label = int(s.table["label"][row])
    assert np.array_equal(viewer.layers[SELECTION_LAYER].data > 0, labels2.data == label)
    assert np.allclose(viewer.camera.center[-2:], s.table.loc[row, ["centroid_y", "centroid_x"]])

    # a click on another cell of field 2 in the viewer rings that cell's point
    other = int(np.flatnonzero(kept["field"].to_numpy() == 1)[7])
    where = s.table.loc[other, ["centroid_y", "centroid_x"]].to_numpy(float)
    assert labels2.data[tuple(np.round(where).astype(int))] == s.table["label"][other]
    click_viewer(a, viewer, where)
    assert sc.selected == other and s.selected_row == other

    # the field box follows, and picks the field in view
    assert a.field_combo.currentIndex() == 1 and a.field_combo.isVisibleTo(a)
    a.field_combo.activated.emit(0)
    assert labels1.visible and image1.visible and not (labels2.visible or image2.visible)
    assert not viewer.layers[SELECTION_LAYER].visible  # it outlines a cell of field 2
    a.field_combo.activated.emit(1)
    assert labels2.visible and not labels1.visible and viewer.layers[SELECTION_LAYER].visible

    # and a point of field 1 brings field 1 back
    first = int(np.flatnonzero(kept["field"].to_numpy() == 0)[0])
    sc._on_click(
        SimpleNamespace(inaxes=sc.ax, xdata=float(sc.xy[first, 0]), ydata=float(sc.xy[first, 1]))
    )
    assert labels1.visible and not labels2.visible and s.labels_layer is labels1
    assert a.field_combo.currentIndex() == 0

    # the whole table: every labelled cell of both fields with its source layers
    e = widget.export_panel
    assert "of 2 fields" in e.status.text()
    for name, read in (("all.csv", pd.read_csv), ("all.parquet", pd.read_parquet)):
        out = e.export_csv(tmp_path / name)
        df = read(out)
        assert len(df) == len(ids1) + len(ids2)
        assert df["source_labels"].tolist() == [LABELS] * len(ids1) + ["field 2 labels"] * len(ids2)
        assert df["source_image"].tolist() == [IMAGE] * len(ids1) + ["field 2"] * len(ids2)
        assert df["label"].tolist() == [*ids1, *ids2]
        got = df[df["source_labels"] == "field 2 labels"].set_index("label")
        assert np.allclose(got.loc[labels2.features["index"], "z1"], labels2.features["z1"])
        assert {"centroid_y", "centroid_x", "plane", "cluster", "UMAP0"} <= set(df.columns)
    # the cluster label images: one TIFF per field
    import tifffile

    folder = e.export_clusters_tiff(tmp_path / "tiffs")
    for f in s.fields:
        got = tifffile.imread(folder / f"{f.labels.name} clusters.tif")
        assert np.array_equal(got, f.clusters.data) and got.shape == f.labels.data.shape
    assert not notes["error"], notes["error"]


def test_open_fields_adds_and_checks_exactly_those(viewer_widget):
    viewer, widget = viewer_widget
    img2, lab2 = _second_field()
    cells = widget.cells_panel
    assert (
        cells.open_fields([(img2, lab2, "A01 site 1"), (img2, lab2, "A01 site 2")], False) is None
    )
    assert cells.fields_chk.isChecked()
    pairs = [(i.name, lab.name) for i, lab in cells.pair_list.pairs()]
    assert pairs == [("A01 site 1", "A01 site 1 labels"), ("A01 site 2", "A01 site 2 labels")]


def test_open_folder_and_plate_add_their_fields(viewer_widget, qtbot, tmp_path, notes):
    """Open folder or plate: a folder of TIFF fields (a.tif + a_labels.tif) and an OME-Zarr
    HCS plate become checked layer pairs with their pixels; a folder with unpaired files and a
    screen larger than the viewer takes are refused in one line."""
    import tifffile
    import zarr
    from ome_zarr.writer import write_image, write_labels, write_plate_metadata, write_well_metadata

    from napari_mevae._widgets._cells import OPEN_LIMIT
    from napari_mevae.synthetic import make_synthetic_cells

    viewer, widget = viewer_widget
    cells = widget.cells_panel
    folder = tmp_path / "fields"
    folder.mkdir()
    truth = {}
    for name in ("w1", "w2"):
        c = make_synthetic_cells(n_cells=6, shape=(96, 96), seed=len(truth), cell_radius=7)
        tifffile.imwrite(folder / f"{name}.tif", c.image)
        tifffile.imwrite(folder / f"{name}_labels.tif", c.labels.astype(np.uint16))
        truth[name] = c
    assert cells.open_folder(str(folder)) is not None
    wait_idle(qtbot, widget)
    assert not notes["error"], notes["error"]
    pairs = [(i.name, lab.name) for i, lab in cells.pair_list.pairs()]
    assert pairs == [("w1", "w1 labels"), ("w2", "w2 labels")]
    np.testing.assert_array_equal(viewer.layers["w2 labels"].data, truth["w2"].labels)
    assert "Opened 2 field(s)" in cells.summary.text()

    plate = tmp_path / "plate.zarr"
    root = zarr.open_group(str(plate), mode="w")
    write_plate_metadata(root, ["A"], ["1"], ["A/1"])
    well = root.require_group("A").require_group("1")
    write_well_metadata(well, ["0", "1"])
    for f in range(2):
        c = make_synthetic_cells(n_cells=5, shape=(80, 80), seed=20 + f, cell_radius=7)
        g = well.require_group(str(f))
        write_image(c.image, g, axes="cyx", scale_factors=[])
        write_labels(c.labels.astype(np.uint16), g, name="nuclei", axes="yx", scale_factors=[])
        truth[f"A/1/{f}"] = c
    assert cells.open_folder(str(plate)) is not None
    wait_idle(qtbot, widget)
    assert not notes["error"], notes["error"]
    names = [lab.name for _, lab in cells.pair_list.pairs()]
    assert names[-2:] == ["A/1/0 labels", "A/1/1 labels"]
    np.testing.assert_array_equal(viewer.layers["A/1/1 labels"].data, truth["A/1/1"].labels)
    np.testing.assert_array_equal(viewer.layers["A/1/1"].data, truth["A/1/1"].image)
    assert cells.extract() is not None  # the opened plate's fields, checked, crop as one
    wait_idle(qtbot, widget)
    assert not notes["error"], notes["error"]
    assert [f.labels.name for f in widget.session.fields] == ["A/1/0 labels", "A/1/1 labels"]
    assert not viewer.layers["A/1/1 labels"].visible  # one field in view at a time

    # back to one pair: the fields the several-fields run hid are shown again
    cells.fields_chk.setChecked(False)
    cells.image_combo.set_layer("w1")
    cells.labels_combo.set_layer("w1 labels")
    assert cells.extract() is not None
    wait_idle(qtbot, widget)
    assert [f.labels.name for f in widget.session.fields] == ["w1 labels"]
    assert viewer.layers["A/1/1 labels"].visible and viewer.layers["A/1/1"].visible

    n_layers = len(viewer.layers)
    tifffile.imwrite(folder / "w3.tif", truth["w1"].image)  # an image without labels
    assert cells.open_folder(str(folder)) is None
    assert "unmatched files" in notes["error"][-1] and "w3.tif" in notes["error"][-1]
    many = tmp_path / "many"
    many.mkdir()
    for i in range(OPEN_LIMIT + 1):
        (many / f"f{i}.tif").write_bytes(b"")
        (many / f"f{i}_labels.tif").write_bytes(b"")
    assert cells.open_folder(str(many)) is None
    assert "mevae crop" in notes["error"][-1]
    assert len(viewer.layers) == n_layers  # nothing added
