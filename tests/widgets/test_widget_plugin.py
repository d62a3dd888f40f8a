"""The npe2 manifest, the sample data and the fast-import promise."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from napari.layers import Image, Labels


def test_manifest_is_valid_and_found():
    from npe2 import PluginManager, PluginManifest

    manifest = PluginManifest.from_distribution("napari-mevae")
    assert manifest.display_name == "ME-VAE"
    pm = PluginManager()
    pm.discover(include_npe1=False)
    assert pm.get_manifest("napari-mevae").display_name == "ME-VAE"
    widgets = [w.display_name for w in pm.iter_widgets() if w.plugin_name == "napari-mevae"]
    assert widgets == ["ME-VAE"]
    samples = dict(pm.iter_sample_data()).get("napari-mevae", [])
    assert [s.key for s in samples] == ["synthetic_cells"]
    menus = manifest.contributions.menus
    assert "napari/layers/measure" in menus


def test_open_sample_adds_image_and_labels(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-mevae", "synthetic_cells")
    kinds = sorted(type(ly).__name__ for ly in viewer.layers)
    assert kinds == ["Image", "Labels"]
    image = next(ly for ly in viewer.layers if isinstance(ly, Image))
    labels = next(ly for ly in viewer.layers if isinstance(ly, Labels))
    assert image.data.shape[-2:] == labels.data.shape
    assert labels.data.max() > 0
    assert "true_class" in labels.features.columns
    assert np.isin(labels.features["index"], np.unique(labels.data)).all()


def test_widget_opens_from_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget("napari-mevae", "ME-VAE")
    from napari_mevae._widgets import MEVAEWidget

    assert isinstance(widget, MEVAEWidget)
    assert [widget.tabs.tabText(i) for i in range(widget.tabs.count())] == [
        "Cells",
        "Model",
        "Analyse",
        "Export",
    ]


@pytest.mark.parametrize("module", ["napari_mevae._widgets", "napari_mevae._sample_data"])
def test_import_does_not_load_torch(module):
    code = (
        f"import sys, {module}\n"
        "heavy = [m for m in ('torch', 'umap', 'napari_mevae.training', 'napari_mevae.analysis',"
        " 'napari_mevae.model') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing {module} loaded {out.stdout.strip()}"
