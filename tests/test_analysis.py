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
from napari_mevae.evaluation import (
    angle_leakage,
    cluster_agreement,
    discrete_leakage,
    pixel_correlation,
)
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


def test_leakage_metrics_detect_signal_and_its_absence():
    rng = np.random.default_rng(0)
    angles = rng.uniform(0, 360, 400)
    rad = np.deg2rad(angles)
    leaky = np.column_stack([np.cos(rad), np.sin(rad), rng.normal(size=(400, 6))])
    clean = rng.normal(size=(400, 8))
    assert angle_leakage(leaky, angles) > 0.95
    assert angle_leakage(clean, angles) < 0.05
    flips = rng.integers(0, 4, 400)
    onehot = np.eye(4)[flips] + rng.normal(0, 0.1, (400, 4))
    assert discrete_leakage(onehot, flips) > 0.9
    assert discrete_leakage(clean, flips) < 0.1
    # an axis (angle modulo 180): invisible to the angle probe, seen by the harmonic-2 probe
    axis = np.column_stack([np.cos(2 * rad), np.sin(2 * rad), rng.normal(size=(400, 6))])
    assert angle_leakage(axis, angles) < 0.05
    assert angle_leakage(axis, angles, harmonic=2) > 0.95


def test_clustering_methods_recover_separated_groups():
    rng = np.random.default_rng(1)
    centers = np.array([[0, 0], [10, 0], [0, 10]])
    truth = np.repeat([0, 1, 2], 40)
    x = centers[truth] + rng.normal(0, 0.5, (120, 2))
    for method in ("kmeans", "gmm", "hdbscan"):
        ids = cluster(x, method, n_clusters=3)
        assert ids.min() >= 0 and len(np.unique(ids[ids > 0])) == 3, method
    agree = cluster_agreement(x, truth)
    assert agree["nmi"] > 0.95 and agree["purity"] > 0.95
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


def test_pixel_correlation():
    rng = np.random.default_rng(0)
    a = rng.random((5, 1, 8, 8))
    assert pixel_correlation(a, a) == pytest.approx(1.0)
    assert pixel_correlation(a, 1 - a) == pytest.approx(-1.0)
    assert pixel_correlation(a, np.zeros_like(a)) == 0.0


def test_cell_descriptors_are_pose_invariant_and_content_kept_detects_information():
    from napari_mevae.evaluation import cell_descriptors, content_kept
    from napari_mevae.nuisances import draw_and_apply
    from napari_mevae.synthetic import synthetic_crops

    crops, _ = synthetic_crops(n=120, size=32, seed=0)
    rotated, _ = draw_and_apply(crops, "rotation", 1)
    a, b = cell_descriptors(crops), cell_descriptors(rotated)
    rel = np.abs(a - b) / (np.abs(a).mean(0) + 1e-9)
    assert np.median(rel) < 0.05
    rng = np.random.default_rng(0)
    informative = np.column_stack([a, rng.normal(size=(120, 3))])
    assert content_kept(informative, crops) > 0.9
    assert content_kept(rng.normal(size=(120, 8)), crops) < 0.1


def test_neighbour_content_kept_reads_the_geometry_the_features_have():
    """Descriptors hidden in a low-variance dimension beside a dominant nuisance are still
    readable by the linear probe, but a cell's nearest neighbours are then pose-mates, not
    look-alikes: the neighbourhood score drops while the linear one does not."""
    from napari_mevae.evaluation import cell_descriptors, content_kept, neighbour_content_kept
    from napari_mevae.synthetic import synthetic_crops

    crops, _ = synthetic_crops(n=200, size=32, seed=0)
    d = cell_descriptors(crops)
    d = (d - d.mean(0)) / d.std(0)
    rng = np.random.default_rng(0)
    assert neighbour_content_kept(d, crops) > 0.8
    assert neighbour_content_kept(rng.normal(size=(200, 8)), crops) < 0.1
    angle = rng.uniform(0, 2 * np.pi, 200)
    nuisance = 100 * np.column_stack([np.cos(angle), np.sin(angle)])
    hidden = np.column_stack([nuisance, 0.01 * d])
    assert content_kept(hidden, crops) > 0.9
    assert neighbour_content_kept(hidden, crops) < 0.2
    # all-zero features (a model that uses no dimension) keep nothing
    assert neighbour_content_kept(np.zeros((200, 4)), crops) == 0.0
    with pytest.raises(ValueError, match="at least 10 cells"):
        neighbour_content_kept(d[:6], crops[:6])


REPORT_KEYS = {  # what the README and invariance_report's docstring document
    "rotation_leakage",
    "polarity_leakage",
    "paired_rotation_leakage",
    "paired_polarity_leakage",
    "content_kept",
    "paired_content_kept",
    "neighbour_content_kept",
    "paired_neighbour_content_kept",
    "reconstruction_corr",
    "model_active_dims",
    "paired_rotation_leakage_all_dims",
    "paired_polarity_leakage_all_dims",
    "n_cells",
}


def test_invariance_report_on_a_model(model):
    from napari_mevae.evaluation import invariance_report

    crops = np.random.default_rng(0).random((40, 2, 32, 32), dtype=np.float32)
    report = invariance_report(model, crops, classes=np.repeat([0, 1], 20))
    # two encoders without recorded nuisances: the reference's convention, rotation + polarity,
    # so every key is there; nmi / purity because classes were given
    assert set(report) == REPORT_KEYS | {"nmi", "purity"}
    for key, value in report.items():
        assert np.isfinite(value), key
        assert f"``{key}``" in invariance_report.__doc__, f"{key} is not explained"
    for key in REPORT_KEYS - {"model_active_dims", "n_cells", "reconstruction_corr"}:
        assert 0 <= report[key] <= 1, key
    assert -1 <= report["reconstruction_corr"] <= 1
    assert report["n_cells"] == 40
    assert report["model_active_dims"] == 8  # not measured: every dimension counts
    assert set(invariance_report(model, crops)) == REPORT_KEYS  # no classes, no nmi / purity
    assert report["paired_rotation_leakage_all_dims"] == report["paired_rotation_leakage"]
    assert report["paired_polarity_leakage_all_dims"] == report["paired_polarity_leakage"]


def test_features_and_report_leave_out_unused_dimensions():
    """Nuisance hidden in dimensions the model does not use is not in the features: the
    paired probes read it only on the raw product of the means (``*_all_dims``)."""
    from napari_mevae.evaluation import invariance_report

    torch.manual_seed(0)
    model = MEVAE(preset("tiny", n_encoders=2)).eval()
    crops = np.random.default_rng(1).random((60, 1, 32, 32), dtype=np.float32)
    raw = encode(model, crops, inactive_to_zero=False)
    model.latent_variance.copy_(torch.tensor([1.0, 1.0] + [1e-4] * 6))
    z = encode(model, crops)
    np.testing.assert_array_equal(z[:, :2], raw[:, :2])
    assert (z[:, 2:] == 0).all()
    report = invariance_report(model, crops, seed=0)
    assert report["model_active_dims"] == 2
    # a random network's raw means see the flip; with 6 of 8 dimensions out, less of it
    assert report["paired_polarity_leakage_all_dims"] > report["paired_polarity_leakage"]


def test_paired_inputs_give_each_encoder_its_own_nuisance():
    from napari_mevae.evaluation import encoder_nuisances, paired_inputs
    from napari_mevae.nuisances import apply_nuisance

    crops = np.random.default_rng(1).random((6, 1, 32, 32), dtype=np.float32)
    inputs, angles, flips = paired_inputs(
        crops, ["polarity", "pose", "scale"], np.random.default_rng(0)
    )
    assert inputs.shape == (6, 3, 1, 32, 32)
    for i in range(6):
        np.testing.assert_allclose(inputs[i, 0], apply_nuisance("polarity", crops[i], flips[i]))
        np.testing.assert_allclose(
            inputs[i, 1], apply_nuisance("rotation", crops[i], angles[i]), atol=1e-6
        )
    assert not np.allclose(inputs[:, 2], crops)  # the scale encoder got zoomed cells
    _, no_angles, only_flips = paired_inputs(crops, ["polarity"], np.random.default_rng(0))
    assert no_angles is None and only_flips.shape == (6,)
    torch.manual_seed(0)
    vae = MEVAE(preset("tiny", n_encoders=1))
    mevae3 = MEVAE(preset("tiny", n_encoders=3))
    fresh = MEVAE(preset("tiny", n_encoders=2, nuisances=["pose", "polarity"]))
    assert encoder_nuisances(fresh) == ["pose", "polarity"]
    assert encoder_nuisances(mevae3) is None
    from napari_mevae.evaluation import invariance_report

    one = invariance_report(vae, crops[:, :1].repeat(5, 0), seed=0)
    assert one["paired_rotation_leakage"] == one["rotation_leakage"]
    assert "paired_rotation_leakage" not in invariance_report(mevae3, crops.repeat(5, 0))
