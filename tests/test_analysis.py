"""analysis: encoding, reconstruction, traversal, UMAP, clustering, the features table and its
CSV.  The invariance probes and report are in test_evaluation.py."""

import numpy as np
import pandas as pd
import pytest
import torch

from napari_mevae.analysis import (
    cluster,
    encode,
    export_features_csv,
    features_table,
    iter_encode,
    latent_traversal,
    paint_clusters,
    reconstruct,
    run_umap,
)
from napari_mevae.config import CheckpointError, preset
from napari_mevae.model import MEVAE


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MEVAE(preset("tiny", n_encoders=2, channels=2)).eval()


def test_encode_canonical_crops_and_pairs(model):
    rng = np.random.default_rng(0)
    crops = rng.random((10, 2, 32, 32), dtype=np.float32)
    z = encode(model, crops, batch_size=4)
    assert z.shape == (10, 8) and z.dtype == np.float32
    # canonical crops = every encoder sees the same cell
    pairs = np.repeat(crops[:, None], 2, axis=1)
    np.testing.assert_allclose(encode(model, pairs), z, atol=1e-6)
    gen = iter_encode(model, crops, batch_size=4)
    progress = []
    try:
        while True:
            progress.append(next(gen))
    except StopIteration as stop:
        np.testing.assert_allclose(stop.value, z)
    assert progress == [(4, 10), (8, 10), (10, 10)]
    assert reconstruct(model, crops).shape == (10, 2, 32, 32)


def test_encode_rejects_data_of_another_shape(model):
    with pytest.raises(CheckpointError, match="channels: model 2, data 1"):
        encode(model, np.zeros((3, 1, 32, 32), np.float32))
    with pytest.raises(CheckpointError, match="image size: model 32, data 64"):
        encode(model, np.zeros((3, 2, 64, 64), np.float32))
    with pytest.raises(ValueError, match="expected crops"):
        encode(model, np.zeros((32, 32), np.float32))


def test_latent_traversal_varies_one_dimension(model):
    walk = latent_traversal(model, dim=3, steps=7)
    assert walk.shape == (7, 2, 32, 32)
    assert np.abs(walk[0] - walk[-1]).max() > 0
    with pytest.raises(ValueError, match="out of range"):
        latent_traversal(model, dim=8)


def test_clustering_methods_recover_separated_groups():
    rng = np.random.default_rng(1)
    centers = np.array([[0, 0], [10, 0], [0, 10]])
    truth = np.repeat([0, 1, 2], 40)
    x = centers[truth] + rng.normal(0, 0.5, (120, 2))
    for method in ("kmeans", "gmm", "hdbscan"):
        ids = cluster(x, method, n_clusters=3)
        assert ids.min() >= 0 and len(np.unique(ids[ids > 0])) == 3, method
    with pytest.raises(ValueError, match="unknown clustering method"):
        cluster(x, "dbscan")
    with pytest.raises(ValueError, match="cannot make 5 clusters from 3 cells"):
        cluster(x[:3], "kmeans", n_clusters=5)


def test_umap_embedding_shape_and_tiny_sets():
    rng = np.random.default_rng(0)
    emb = run_umap(rng.normal(size=(60, 8)))
    assert emb.shape == (60, 2) and np.isfinite(emb).all()
    assert run_umap(rng.normal(size=(2, 8))).shape == (2, 2)


def test_features_table_paint_and_csv(tmp_path):
    cells = pd.DataFrame(
        {
            "label": [3, 7, 12],
            "plane": [0, 0, 0],
            "centroid_y": [1.0, 2.0, 3.0],
            "centroid_x": [4.0, 5.0, 6.0],
        }
    )
    z = np.arange(6, dtype=np.float32).reshape(3, 2)
    table = features_table(cells, z, embedding=np.ones((3, 2)), clusters=np.array([1, 2, 1]))
    assert list(table.columns) == [
        "index",
        "label",
        "plane",
        "centroid_y",
        "centroid_x",
        "cluster",
        "z0",
        "z1",
        "UMAP0",
        "UMAP1",
    ]
    assert table["index"].tolist() == [3, 7, 12]
    labels = np.zeros((10, 10), np.int32)
    labels[0:2, 0:2] = 3
    labels[5:7, 5:7] = 7
    labels[8:10, 0:3] = 12
    labels[0, 9] = 99  # a cell without features stays unpainted
    painted = paint_clusters(labels, [3, 7, 12], [1, 2, 1])
    assert painted[0, 0] == 1 and painted[5, 5] == 2 and painted[9, 1] == 1 and painted[0, 9] == 0
    assert (painted[labels == 0] == 0).all()
    stack = np.stack([labels, labels])
    painted3 = paint_clusters(stack, [3, 3], [1, 2], planes=[0, 1])
    assert painted3[0, 0, 0] == 1 and painted3[1, 0, 0] == 2 and painted3[1, 5, 5] == 0
    path = export_features_csv(
        table, tmp_path / "f.csv", sources={"image": "cells", "labels": "seg"}
    )
    back = pd.read_csv(path)
    assert back.shape == (3, 12) and back["source_labels"].tolist() == ["seg"] * 3
    np.testing.assert_allclose(back[["z0", "z1"]].to_numpy(), z)
    with pytest.raises(ValueError, match="3 cells in the table but 2 latent rows"):
        features_table(cells, z[:2])


def test_latent_walk_is_every_dimensions_traversal_decoded_in_batches():
    from napari_mevae.analysis import latent_traversal, latent_walk
    from napari_mevae.config import preset
    from napari_mevae.model import MEVAE

    model = MEVAE(preset("tiny")).eval()
    walk = latent_walk(model, steps=5, batch_size=7)  # batches that cut across dimensions
    assert walk.shape == (8, 5, 1, 32, 32)
    for d in (0, 3, 7):
        np.testing.assert_allclose(walk[d], latent_traversal(model, d, steps=5), atol=1e-6)


def test_umap_of_many_cells_fits_a_subsample_and_places_the_rest():
    from napari_mevae.analysis import run_umap

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (3, 6))
    truth = rng.integers(0, 3, 300)
    latents = (centres[truth] + rng.normal(0, 0.5, (300, 6))).astype(np.float32)
    emb = run_umap(latents, fit_max=100)
    assert emb.shape == (300, 2) and np.isfinite(emb).all()
    # the transformed cells land with their group: nearest fitted neighbour shares the class
    from sklearn.neighbors import KNeighborsClassifier

    fit = np.sort(np.random.default_rng(0).choice(300, 100, replace=False))
    rest = np.setdiff1d(np.arange(300), fit)
    knn = KNeighborsClassifier(3).fit(emb[fit], truth[fit])
    assert (knn.predict(emb[rest]) == truth[rest]).mean() > 0.95
