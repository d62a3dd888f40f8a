"""Defaults that learn: the plugin's own sample, the dock's defaults everywhere (crop, model,
the default training budget), the Train button. The model must use at least 4 latent
dimensions (the sample's five phenotypes differ in nucleus size, spots, elongation and
texture) and k-means with k = the number of true classes must find them (NMI >= 0.6).
Trains the whole default budget (1,000 epochs of the sample's 40 cells): about 1.5 minutes."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import normalized_mutual_info_score
from widget_helpers import wait_idle


def test_the_train_button_with_defaults_learns_the_sample(make_napari_viewer, qtbot, notes):
    from napari_mevae._sample_data import synthetic_cells
    from napari_mevae._widgets import MEVAEWidget

    viewer = make_napari_viewer()
    for data, kwargs, kind in synthetic_cells():  # what File > Open Sample gives
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = MEVAEWidget(viewer)
    viewer.window.add_dock_widget(widget, name="ME-VAE")
    cells, model_tab, analyse = widget.cells_panel, widget.model_panel, widget.analyse_panel
    assert cells.extract() is not None
    wait_idle(qtbot, widget)
    assert len(widget.session.crops) == 40  # fit: no cell skipped for its size
    assert model_tab.train() is not None, widget.status.text()
    wait_idle(qtbot, widget, timeout=900_000)
    assert not notes["error"], notes["error"]
    model = widget.session.model
    assert model.n_active >= 4, f"{model.n_active} latent dimensions in use"
    assert analyse.dim.value() in np.flatnonzero(model.active_mask.numpy())
    analyse.umap_chk.setChecked(False)  # k-means on the features themselves
    assert analyse.method.currentText() == "kmeans" and analyse.n_clusters.value() == 3
    labels = viewer.layers["synthetic cells labels"]
    k = len(labels.features["true_class"].cat.categories)
    assert k == 5
    analyse.n_clusters.setValue(k)  # as the evaluation does: k = the number of true classes
    assert analyse.encode() is not None
    wait_idle(qtbot, widget, timeout=300_000)
    feats = labels.features
    truth = np.asarray(feats["true_class"], dtype=np.int64)
    clusters = np.asarray(feats["cluster"], dtype=np.int64)
    nmi = normalized_mutual_info_score(truth, clusters)
    assert nmi >= 0.6, f"k-means NMI {nmi:.2f} against the sample's true classes"
