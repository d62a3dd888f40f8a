"""End to end through the dock on the synthetic sample: cells -> train -> analyse -> export."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from napari.layers import Image, Labels
from widget_helpers import LABELS, N_CELLS, click_viewer, wait_idle

from napari_mevae._widgets._analyse import SELECTION_LAYER, TRAVERSAL_LAYER
from napari_mevae._widgets._cells import PAIRS_LAYER
from napari_mevae._widgets._model import TRAIN_RECON_LAYER


def _train(qtbot, widget, epochs: int = 1):
    widget.model_panel.epochs.setValue(epochs)
    worker = widget.model_panel.train()
    assert worker is not None, widget.status.text()
    wait_idle(qtbot, widget, timeout=180_000)
    return worker


def test_full_flow(extracted, qtbot, tmp_path, notes, monkeypatch):
    viewer, widget = extracted
    s = widget.session
    n = len(s.cells.crops)
    assert n == N_CELLS
    assert s.cells.crops.shape[1:] == (2, 32, 32)  # (C,Y,X) image: channel axis 0 found
    assert "cells cropped" in widget.cells_panel.summary.text()

    # preview pairs: one row per cell, K=2 inputs + target, side by side
    assert widget.cells_panel.preview_pairs(n=4) is not None
    wait_idle(qtbot, widget)
    qtbot.waitUntil(lambda: PAIRS_LAYER in viewer.layers, timeout=60_000)
    pairs = viewer.layers[PAIRS_LAYER]
    assert isinstance(pairs, Image)
    assert pairs.data.shape[1] > 3 * 32 and pairs.data.shape[0] > 4 * 32  # 3 columns, 4 rows
    # the columns are labelled, and the view shows both the image and the new montage
    names = viewer.layers[f"{PAIRS_LAYER} (columns)"]
    assert list(names.features["column"]) == ["rotation", "polarity", "target"]
    image_layer = viewer.layers["synthetic cells"]
    lo = np.minimum(image_layer.extent.world[0][-2:], pairs.extent.world[0][-2:])
    hi = np.maximum(image_layer.extent.world[1][-2:], pairs.extent.world[1][-2:])
    assert np.all(lo <= viewer.camera.center[-2:]) and np.all(viewer.camera.center[-2:] <= hi)
    assert viewer.dims.ndim == 3  # the image's channel slider only: no slider of our own

    # train one short epoch: loss curve, training reconstructions, a model kept
    _train(qtbot, widget, epochs=1)
    assert not notes["error"], notes["error"]
    assert s.model is not None
    assert s.model.config.n_encoders == 2
    assert s.model.config.image_size == 32 and s.model.config.channels == 2
    assert widget.model_panel.loss_plot.epochs_y and np.isfinite(
        widget.model_panel.loss_plot.epochs_y[-1]
    )
    assert TRAIN_RECON_LAYER in viewer.layers
    assert "1 epoch(s) trained" in widget.model_panel.status.text()
    assert f"({s.model.n_active} in use" in widget.model_panel.status.text()
    # two axes in use that carry one signal between them: the tab says both numbers
    saved = {k: t.clone() for k, t in s.model.state_dict().items() if k.startswith("latent_")}
    v = torch.zeros(8)
    v[:2] = torch.tensor([0.6, 0.8])
    s.model.latent_variance.copy_(torch.tensor([0.36, 0.64] + [0.0] * 6))
    s.model.latent_covariance.copy_(torch.outer(v, v))
    s.model.latent_mean.zero_()
    widget.model_panel._describe_model()
    assert "latent 8 (2 in use, 1 direction)" in widget.model_panel.status.text()
    s.model.load_state_dict({**s.model.state_dict(), **saved})
    # a run whose budget ended with the loss still falling: the tab says more epochs may help
    history = s.history
    s.history = [{"epoch": i + 1, "loss": 70.0 - 0.2 * i} for i in range(30)]
    widget.model_panel._describe_model()
    assert "Note: the loss was still falling at the end" in widget.model_panel.status.text()
    assert "more Epochs" in widget.model_panel.status.text()
    s.history = [{"epoch": i + 1, "loss": 63.0} for i in range(30)]
    widget.model_panel._describe_model()
    assert "still falling" not in widget.model_panel.status.text()
    s.history = history
    widget.model_panel._describe_model()
    # the budget shown before training says how far it can grow while the loss still falls
    m = widget.model_panel
    epochs_set = m.epochs.value()
    m.epochs.setValue(0)  # auto: the default budget
    assert "trains on" not in m.budget.text()  # small sets: the floor is more than 100 passes
    with monkeypatch.context() as mp:
        mp.setattr("napari_mevae._widgets._model.max_budget_epochs", lambda n: 4000)
        m._show_budget()
        assert "While the loss still falls it trains on, up to 4,000 epochs" in m.budget.text()
    m.epochs.setValue(epochs_set)
    # a budget that grew during the run widens the progress bar; the status says why
    from napari.utils import progress

    from napari_mevae.training import TrainReport

    m._run_start_epoch, m._epochs, m._steps = 0, 9, 2
    m.progress.setRange(0, 18)
    # napari's activity dock: one yield per step and one per epoch, 9 epochs + start and end
    dock = progress(total=2 + 9 * 3)
    m._worker = SimpleNamespace(pbar=dock)
    msg = "the loss is still falling: training on to epoch 12 (at most 20)"
    m._on_report(TrainReport("epoch", 9, 0, 2, 60.0, 59.0, 1.0, 100.0, 12, message=msg))
    assert m.progress.maximum() == 24 and m.progress.value() == 18
    assert dock.total == 2 + 12 * 3  # the dock's total grew with the budget
    assert "Epoch 9/12" in m.status.text() and msg in m.status.text()
    # the next steps' status still says why the run goes on past its first budget
    m._last_status = 0.0
    m._on_report(TrainReport("step", 9, 1, 2, 60.0, 59.0, 1.0, 100.0, 12))
    assert "Epoch 10/12" in m.status.text() and "the budget grew" in m.status.text()
    dock.close()
    m._worker = None
    widget.model_panel._describe_model()

    # encode -> reconstruct -> UMAP -> cluster (chained workers)
    a = widget.analyse_panel
    a.n_clusters.setValue(3)
    assert a.encode() is not None
    wait_idle(qtbot, widget, timeout=240_000)
    assert not notes["error"], notes["error"]
    assert s.table is not None
    labels = viewer.layers[LABELS]
    feats = labels.features
    for col in ["index", "label", "plane", "centroid_y", "centroid_x", "cluster", "UMAP0", "UMAP1"]:
        assert col in feats.columns, col
    assert [f"z{i}" for i in range(8)] == [c for c in feats.columns if c.startswith("z")]
    assert len(feats) == n
    assert (feats["index"] == feats["label"]).all()
    assert set(feats["cluster"]) <= {1, 2, 3}
    assert "true_class" in feats.columns  # the sample's ground truth survived the update
    kept = s.cells.kept
    assert np.array_equal(feats["label"].to_numpy(), kept["label"].to_numpy())

    clusters = viewer.layers[f"{LABELS} clusters"]
    assert isinstance(clusters, Labels)
    assert clusters.data.shape == labels.data.shape
    for lab, cl in zip(feats["label"][:5], feats["cluster"][:5], strict=True):
        assert set(np.unique(clusters.data[labels.data == lab])) == {cl}
    assert (clusters.data[labels.data == 0] == 0).all()
    recon = viewer.layers[f"{LABELS} reconstructions"]
    assert recon.rgb and recon.data.ndim == 3  # one montage of every cell: no slider added
    side = int(np.ceil(np.sqrt(n)))
    assert recon.data.shape[1] >= side * 32 and recon.data.shape[0] >= np.ceil(n / side) * 32
    assert viewer.dims.ndim == 3
    # one colour per cluster: the clusters layer paints each cluster as the scatter draws it
    from napari_mevae._widgets._plots import cluster_color

    for c in set(feats["cluster"]):
        assert np.allclose(clusters.colormap.map(np.array([int(c)]))[0], cluster_color(int(c)))

    # a clustering that cannot work fails in its worker with a clear message; nothing changes
    a.n_clusters.setValue(99)
    assert a.cluster() is not None
    wait_idle(qtbot, widget)
    assert "cannot make 99 clusters" in notes["error"][-1]
    assert labels.features.equals(feats)
    notes["error"].clear()
    a.n_clusters.setValue(3)

    # the scatter: a click next to a point selects that cell in the viewer
    sc = a.scatter
    assert len(sc.xy) == n
    row = 2
    x, y = sc.xy[row]
    zoom_before = viewer.camera.zoom
    sc._on_click(SimpleNamespace(inaxes=sc.ax, xdata=float(x), ydata=float(y)))
    assert sc.selected == row
    # the cell is outlined on top of every layer, centred and zoomed on
    outline = viewer.layers[SELECTION_LAYER]
    assert viewer.layers.index(outline) == len(viewer.layers) - 1 and outline.contour == 2
    assert np.array_equal(outline.data > 0, labels.data == int(feats["label"][row]))
    assert np.allclose(
        viewer.scene.camera.center[-2:], feats.loc[row, ["centroid_y", "centroid_x"]], atol=1
    )
    assert viewer.camera.zoom > zoom_before
    # a click on another cell in the viewer rings its point in the scatter
    other = 5
    where = feats.loc[other, ["centroid_y", "centroid_x"]].to_numpy(float)
    assert labels.data[tuple(np.round(where).astype(int))] == feats["label"][other]
    click_viewer(a, viewer, where)
    assert sc.selected == other and s.selected_row == other

    # latent traversal of one dimension
    walk = a.show_traversal(dim=1)
    assert walk.shape == (a.steps.value(), 2, 32, 32)
    assert TRAVERSAL_LAYER in viewer.layers

    # export: CSV read back, cluster TIFF
    csv = widget.export_panel.export_csv(tmp_path / "features.csv")
    df = pd.read_csv(csv)
    assert len(df) == n
    assert (df["source_image"] == "synthetic cells").all()
    assert (df["source_labels"] == LABELS).all()
    assert np.allclose(df["z0"], feats["z0"], atol=1e-5)
    assert np.array_equal(df["cluster"], feats["cluster"])
    tif = widget.export_panel.export_clusters_tiff(tmp_path / "clusters.tif")
    import tifffile

    assert np.array_equal(tifffile.imread(tif), clusters.data)

    # checkpoint round trip gives the same encodings
    latents = s.latents.copy()
    ckpt = widget.model_panel.save_checkpoint(tmp_path / "model.pt")
    assert ckpt.is_file()
    from napari_mevae.checkpoints import load_checkpoint

    saved = load_checkpoint(ckpt)
    assert saved.optimizer_state and saved.optimizer_state["state"]  # "train more" resumes RMSprop
    assert saved.epoch == 1 and saved.extra["cells"]["size"] == 32
    widget.model_panel.latent.setValue(4)  # the loaded model's settings win
    assert widget.model_panel.load_checkpoint(ckpt)
    assert widget.model_panel.latent.value() == 8
    assert "loaded from model.pt" in widget.model_panel.status.text()
    a.umap_chk.setChecked(False)
    assert a.encode() is not None
    wait_idle(qtbot, widget)
    assert np.allclose(s.latents, latents, atol=1e-5)

    # "train more" continues the loaded model
    widget.model_panel.continue_chk.setChecked(True)
    before = s.model
    _train(qtbot, widget, epochs=1)
    assert not notes["error"], notes["error"]
    assert s.model.config == before.config and len(s.history) == 2
    assert "2 epoch(s) trained" in widget.model_panel.status.text()

    # a picture of the result, not blank
    shot = tmp_path / "screenshot.png"
    img = viewer.screenshot(str(shot), canvas_only=True)
    assert shot.is_file()
    assert img.std() > 0


def test_stop_keeps_model(extracted, qtbot, tmp_path, notes):
    viewer, widget = extracted
    m = widget.model_panel
    m.epochs.setValue(200)
    m.batch.setValue(2)  # many steps: the stop lands mid-run
    m.autosave.setText(str(tmp_path / "run"))
    steps: list = []
    worker = m.train()
    worker.yielded.connect(lambda report: steps.append(report.kind))
    qtbot.waitUntil(lambda: steps.count("step") >= 2, timeout=60_000)
    m.stop()
    wait_idle(qtbot, widget)
    assert steps.count("step") < 200 * 5  # stopped long before the end
    assert steps[-1] == "end"
    ckpt = tmp_path / "run" / "models" / "checkpoint.pt"
    assert ckpt.is_file()
    # the model the training process saved when it stopped is the session's model
    assert widget.session.model is not None
    assert widget.session.checkpoint_path == str(ckpt)
    from napari_mevae.checkpoints import load_checkpoint

    saved = load_checkpoint(ckpt)
    for key, value in saved.build_model().state_dict().items():
        assert torch.equal(value, widget.session.model.state_dict()[key].cpu()), key
    assert "stopped" in widget.status.text() and not notes["info"]  # no toast for news
    assert m.train_btn.isEnabled() and not m.stop_btn.isEnabled()


@pytest.mark.parametrize("model_type", ["VAE", "beta-VAE"])
def test_baselines_train(extracted, qtbot, notes, model_type):
    viewer, widget = extracted
    widget.model_panel.type_combo.setCurrentText(model_type)
    _train(qtbot, widget, epochs=1)
    assert not notes["error"], notes["error"]
    cfg = widget.session.model.config
    assert cfg.n_encoders == 1
    # every KL weight follows the crop size: (32 / 128)**2 for the VAE, 4x that for beta-VAE
    scale = (cfg.image_size / 128) ** 2
    assert cfg.beta == pytest.approx(scale * (4.0 if model_type == "beta-VAE" else 1.0))
    assert f"Model: {model_type}," in widget.model_panel.status.text()


def test_kl_warmup_and_precision_reach_the_trainer(extracted, qtbot, notes):
    from napari_mevae.config import PRECISIONS

    viewer, widget = extracted
    m = widget.model_panel
    assert [m.precision.itemText(i) for i in range(m.precision.count())] == list(PRECISIONS)
    assert m.precision.currentText() == "auto" and m.kl_warmup.value() == 0  # library defaults
    m.kl_warmup.setValue(3)
    m.precision.setCurrentText("float32")
    shown = []
    set_text = m.status.setText
    m.status.setText = lambda text: (shown.append(text), set_text(text))  # type: ignore[method-assign]
    _train(qtbot, widget, epochs=1)
    assert not notes["error"], notes["error"]
    # the step status says where and in what precision the run trains
    assert any(t.startswith("Epoch 1/1, step") and "cells/s on cpu, float32" in t for t in shown)
    assert m.last_options.kl_warmup == 3.0 and m.last_options.precision == "float32"
    assert widget.session.model is not None
