"""Bad input gives a clear message and changes nothing: layers, cells and model stay."""

from __future__ import annotations

import numpy as np
from widget_helpers import IMAGE, LABELS


def _layer_state(viewer):
    return [(ly.name, type(ly).__name__, ly.data.shape) for ly in viewer.layers]


def _checkpoint(path, channels: int, size: int = 32):
    from napari_mevae.checkpoints import save_checkpoint
    from napari_mevae.config import preset
    from napari_mevae.model import MEVAE

    model = MEVAE(preset("tiny", image_size=size, channels=channels, latent_dim=8, n_encoders=2))
    return save_checkpoint(path, model), model


def test_no_labels_layer(make_napari_viewer, qtbot, sample_layers, notes):
    from napari_mevae._widgets import MEVAEWidget

    viewer = make_napari_viewer()
    data, kwargs, _ = sample_layers[0]
    viewer.add_image(data, **kwargs)
    widget = MEVAEWidget(viewer)
    viewer.window.add_dock_widget(widget)
    before = _layer_state(viewer)
    assert widget.cells_panel.labels_combo.layer() is None
    assert widget.cells_panel.extract() is None
    assert notes["error"] and "No Labels layer" in notes["error"][-1]
    assert "No Labels layer" in widget.status.text()
    assert widget.session.cells is None
    assert _layer_state(viewer) == before
    # the combo box follows the layer list
    viewer.add_labels(sample_layers[1][0], name="late labels")
    assert widget.cells_panel.labels_combo.layer().name == "late labels"
    viewer.layers["late labels"].name = "renamed labels"
    assert widget.cells_panel.labels_combo.currentText() == "renamed labels"


def test_labels_of_another_shape(extracted, qtbot, notes):
    viewer, widget = extracted
    cells_before = widget.session.cells
    viewer.add_labels(np.zeros((100, 120), np.int32), name="wrong labels")
    before = _layer_state(viewer)
    widget.cells_panel.labels_combo.set_layer("wrong labels")
    assert widget.cells_panel.extract() is None
    assert "does not match the image" in notes["error"][-1]
    assert "(100, 120)" in widget.status.text()
    assert widget.session.cells is cells_before  # the previous cells are kept
    assert _layer_state(viewer) == before


def test_no_cells_no_model(viewer_widget, notes):
    viewer, widget = viewer_widget
    assert widget.model_panel.train() is None
    assert "Extract cells first" in notes["error"][-1]
    assert widget.analyse_panel.encode() is None
    assert widget.export_panel.export_csv("/nonexistent/x.csv") is None
    assert "No features" in notes["error"][-1]
    assert widget.model_panel.save_checkpoint("/tmp/never.pt") is None
    assert "No model" in notes["error"][-1]


def test_checkpoint_for_other_channel_count(extracted, qtbot, tmp_path, notes):
    viewer, widget = extracted
    s = widget.session
    good, _ = _checkpoint(tmp_path / "good.pt", channels=2)
    assert widget.model_panel.load_checkpoint(good)
    model = s.model
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    before = _layer_state(viewer)

    bad, _ = _checkpoint(tmp_path / "bad.pt", channels=1)
    assert not widget.model_panel.load_checkpoint(bad)
    msg = notes["error"][-1]
    assert "channels: model 1, data 2" in msg
    assert s.model is model
    # weights unchanged (an untrained model's latent_variance is NaN: NaN counts as equal)
    same = (
        (v == weights[k]) | (v.isnan() & weights[k].isnan()) for k, v in model.state_dict().items()
    )
    assert all(t.all() for t in same)
    assert _layer_state(viewer) == before

    # not a checkpoint at all
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert not widget.model_panel.load_checkpoint(junk)
    assert "junk.pt" in notes["error"][-1]
    assert s.model is model


def test_train_more_with_incompatible_cells(extracted, qtbot, tmp_path, notes):
    """A model for 64 px crops cannot continue on 32 px cells: refused, model kept."""
    viewer, widget = extracted
    ckpt, _ = _checkpoint(tmp_path / "m64.pt", channels=2, size=64)
    widget.session.cells, cells = None, widget.session.cells  # load without the size check
    assert widget.model_panel.load_checkpoint(ckpt)
    widget.session.cells = cells
    model = widget.session.model
    widget.model_panel.continue_chk.setChecked(True)
    assert widget.model_panel.train() is None
    assert "image size: model 64, data 32" in notes["error"][-1]
    assert widget.analyse_panel.encode() is None
    assert "image size" in notes["error"][-1]
    assert widget.session.model is model


def test_image_and_labels_names_in_combos(viewer_widget):
    viewer, widget = viewer_widget
    assert widget.cells_panel.image_combo.currentText() == IMAGE
    assert widget.cells_panel.labels_combo.currentText() == LABELS
    # Labels are not offered as images and vice versa
    assert LABELS not in [
        widget.cells_panel.image_combo.itemText(i)
        for i in range(widget.cells_panel.image_combo.count())
    ]


def test_mevae_without_nuisance(extracted, notes):
    viewer, widget = extracted
    widget.model_panel._set_nuisances([])
    assert widget.model_panel.k_label.text() == "K = 0"
    assert widget.model_panel.train() is None
    assert "at least one nuisance" in notes["error"][-1]
    assert widget.session.model is None
