"""`mevae demo`, the README's main job, end to end on a few cells."""

import json

import numpy as np
import pandas as pd
from PIL import Image

from napari_mevae.demo import run_demo
from napari_mevae.training import load_checkpoint


def test_demo_writes_every_promised_file(tmp_path):
    report = run_demo(tmp_path, epochs=2, n_cells=60, verbose=0, latent_dim=8)
    for name in (
        "features.csv",
        "reconstructions.png",
        "umap_clusters.png",
        "report.json",
        "cells_image.tif",
        "cells_labels.tif",
        "training.log",
    ):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["nmi"] == report["nmi"] and 0 <= saved["nmi"] <= 1
    assert 0 <= saved["paired_polarity_leakage"] <= 1
    table = pd.read_csv(tmp_path / "features.csv")
    assert len(table) == 60
    z = table[[f"z{i}" for i in range(8)]].to_numpy()
    assert np.isfinite(z).all() and z.std(0).max() > 0
    model = load_checkpoint(tmp_path).build_model()
    # the KL weight follows the crop size, (32 / 128)**2, as in the Fig. 2 benchmark
    assert model.config.beta == 0.0625
    assert Image.open(tmp_path / "umap_clusters.png").size[0] > 100
