"""evaluation: the invariance probes, ``invariance_report`` and ``mevae evaluate``.

First the probes on made-up features, then the report on untrained models (its keys, the
paired protocol, the unused dimensions), then two small trained models: the ``mevae evaluate``
command end to end and the ME-VAE's headline property on synthetic cells.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from napari_mevae.analysis import encode
from napari_mevae.checkpoints import save_checkpoint
from napari_mevae.cli import main
from napari_mevae.config import MEVAEConfig, TrainOptions, preset
from napari_mevae.evaluation import (
    DESCRIPTORS,
    angle_leakage,
    cell_descriptors,
    cluster_agreement,
    content_kept,
    content_kept_by_descriptor,
    discrete_leakage,
    encoder_nuisances,
    feature_directions,
    invariance_report,
    neighbour_content_kept,
    paired_inputs,
    pixel_correlation,
)
from napari_mevae.folders import write_image
from napari_mevae.model import MEVAE
from napari_mevae.nuisances import NuisanceAutoencode, NuisancePairs, apply_nuisance, draw_and_apply
from napari_mevae.synthetic import synthetic_crops
from napari_mevae.training import Trainer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MEVAE(preset("tiny", n_encoders=2, channels=2)).eval()


# -- the probes ---------------------------------------------------------------------------------
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


def test_feature_directions_count_independent_signals_not_axes():
    """Six axes that carry two signals (plus a residue far below the threshold) vary in two
    directions; the threshold is the active-units one unless given."""
    from napari_mevae.evaluation import feature_directions

    rng = np.random.default_rng(0)
    signals = rng.normal(size=(300, 2)) @ rng.normal(size=(2, 6))
    residue = 1e-3 * rng.normal(size=(300, 6))
    assert feature_directions(signals + residue) == 2
    assert feature_directions(signals + residue, threshold=1e-8) == 6
    assert feature_directions(rng.normal(size=(300, 4))) == 4
    assert feature_directions(np.ones((300, 4))) == 0
    assert feature_directions(np.zeros((1, 4))) == 0


def test_cluster_agreement_of_separated_groups():
    rng = np.random.default_rng(1)
    centers = np.array([[0, 0], [10, 0], [0, 10]])
    truth = np.repeat([0, 1, 2], 40)
    x = centers[truth] + rng.normal(0, 0.5, (120, 2))
    agree = cluster_agreement(x, truth)
    assert agree["nmi"] > 0.95 and agree["purity"] > 0.95


def test_pixel_correlation():
    rng = np.random.default_rng(0)
    a = rng.random((5, 1, 8, 8))
    assert pixel_correlation(a, a) == pytest.approx(1.0)
    assert pixel_correlation(a, 1 - a) == pytest.approx(-1.0)
    assert pixel_correlation(a, np.zeros_like(a)) == 0.0


def test_cell_descriptors_are_pose_invariant_and_content_kept_detects_information():
    crops, _ = synthetic_crops(n=120, size=32, seed=0)
    rotated, _ = draw_and_apply(crops, "rotation", 1)
    a, b = cell_descriptors(crops), cell_descriptors(rotated)
    rel = np.abs(a - b) / (np.abs(a).mean(0) + 1e-9)
    assert np.median(rel) < 0.05
    rng = np.random.default_rng(0)
    informative = np.column_stack([a, rng.normal(size=(120, 3))])
    assert content_kept(informative, crops) > 0.9
    assert content_kept(rng.normal(size=(120, 8)), crops) < 0.1


def test_content_kept_by_descriptor_names_what_the_features_leave_out():
    """Features holding one descriptor: that one is kept fully, the ones it does not
    correlate with hardly at all; their mean is ``content_kept``; channels are averaged."""
    crops, _ = synthetic_crops(n=150, size=32, seed=0)
    d = cell_descriptors(crops)
    assert d.shape[1] == len(DESCRIPTORS)
    noise = np.random.default_rng(0).normal(size=(150, 2))
    feats = np.column_stack([d[:, DESCRIPTORS.index("elongation")], noise])
    per = content_kept_by_descriptor(feats, crops)
    assert list(per) == list(DESCRIPTORS)
    assert per["elongation"] > 0.95
    assert max(v for k, v in per.items() if k != "elongation") < 0.4
    assert np.mean(list(per.values())) == pytest.approx(content_kept(feats, crops), abs=0.02)
    # two channels: the second a copy of the first, so each descriptor's mean is unchanged
    per2 = content_kept_by_descriptor(feats, np.concatenate([crops, crops], axis=1))
    assert per2 == pytest.approx(per, abs=1e-6)


def test_neighbour_content_kept_reads_the_geometry_the_features_have():
    """Descriptors hidden in a low-variance dimension beside a dominant nuisance are still
    readable by the linear probe, but a cell's nearest neighbours are then pose-mates, not
    look-alikes: the neighbourhood score drops while the linear one does not."""
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


# -- invariance_report -------------------------------------------------------------------------
REPORT_KEYS = {  # what the README and invariance_report's docstring document
    "rotation_leakage",
    "polarity_leakage",
    "paired_rotation_leakage",
    "paired_polarity_leakage",
    "content_kept",
    "content_kept_mean_intensity",
    "content_kept_area",
    "content_kept_radius_of_gyration",
    "content_kept_elongation",
    "content_kept_intensity_spread",
    "paired_content_kept",
    "neighbour_content_kept",
    "paired_neighbour_content_kept",
    "reconstruction_corr",
    "model_active_dims",
    "feature_directions",
    "paired_rotation_leakage_all_dims",
    "paired_polarity_leakage_all_dims",
    "n_cells",
}


def test_invariance_report_on_a_model(model):
    crops = np.random.default_rng(0).random((40, 2, 32, 32), dtype=np.float32)
    report = invariance_report(model, crops, classes=np.repeat([0, 1], 20))
    # two encoders without recorded nuisances: the reference's convention, rotation + polarity,
    # so every key is there; nmi / purity because classes were given
    assert set(report) == REPORT_KEYS | {"nmi", "purity"}
    for key, value in report.items():
        assert np.isfinite(value), key
        assert f"``{key}``" in invariance_report.__doc__, f"{key} is not explained"
    for key in REPORT_KEYS - {
        "model_active_dims",
        "feature_directions",
        "n_cells",
        "reconstruction_corr",
    }:
        assert 0 <= report[key] <= 1, key
    assert -1 <= report["reconstruction_corr"] <= 1
    assert report["n_cells"] == 40
    assert report["model_active_dims"] == 8  # not measured: every dimension counts
    assert 0 <= report["feature_directions"] <= 8
    assert report["paired_rotation_leakage_all_dims"] == report["paired_rotation_leakage"]
    assert report["paired_polarity_leakage_all_dims"] == report["paired_polarity_leakage"]
    assert set(invariance_report(model, crops)) == REPORT_KEYS  # no classes, no nmi / purity


def test_features_and_report_leave_out_unused_dimensions():
    """Nuisance hidden in dimensions the model does not use is not in the features: the
    paired probes read it only on the raw product of the means (``*_all_dims``)."""
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
    assert report["feature_directions"] <= 2  # the features vary in the used axes only
    # a random network's raw means see the flip; with 6 of 8 dimensions out, less of it
    assert report["paired_polarity_leakage_all_dims"] > report["paired_polarity_leakage"]


def test_report_reads_the_features_kept_to_the_directions_in_use():
    """Axes in use that carry one signal between them: the report's features keep only that
    direction, as every encoding does (``MEVAE.encode``), whatever else the raw axes hold."""
    torch.manual_seed(0)
    model = MEVAE(preset("tiny", n_encoders=2)).eval()
    crops = np.random.default_rng(1).random((60, 1, 32, 32), dtype=np.float32)
    raw = encode(model, crops, inactive_to_zero=False)
    v = torch.zeros(8)
    v[:3] = torch.tensor([2.0, 1.0, 2.0]) / 3
    model.latent_covariance.copy_(5.0 * torch.outer(v, v) + 1e-4 * torch.eye(8))
    model.latent_variance.copy_(torch.diagonal(model.latent_covariance))
    model.latent_mean.copy_(torch.from_numpy(raw.mean(0)))
    report = invariance_report(model, crops, seed=0)
    assert report["model_active_dims"] == 3 and model.n_directions == 1
    assert feature_directions(raw[:, :3], threshold=1e-12) == 3
    assert report["feature_directions"] <= 1
    z = encode(model, crops)
    off = z[:, :3] - raw.mean(0)[:3]
    np.testing.assert_allclose(off - np.outer(off @ v[:3].numpy(), v[:3].numpy()), 0, atol=1e-5)


def test_paired_inputs_give_each_encoder_its_own_nuisance():
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
    one = invariance_report(vae, crops[:, :1].repeat(5, 0), seed=0)
    assert one["paired_rotation_leakage"] == one["rotation_leakage"]
    assert "paired_rotation_leakage" not in invariance_report(mevae3, crops.repeat(5, 0))


# -- trained models: `mevae evaluate` end to end, the ME-VAE's headline property ---------------
# Budget: a few epochs on 300 synthetic canonical cells (32 px).  In so short a run the latents
# of both models stay close to the prior (tiny spread), and ``invariance_report``'s leakage
# probes standardise every latent dimension, so they read the nuisance from dimensions that carry
# almost no variance: measured over seeds 0, 1, 2 the ME-VAE's standardised rotation leakage is
# NOT reliably below the VAE's at this budget (see docs/benchmarks.md, "Fig. 2 reproduction").
# What is robust, and asserted here, is the pose correction the ME-VAE is trained for: from a
# rotated and flipped cell it reconstructs the canonical cell far better than a VAE trained on
# rotated cells.
SIZE, LATENT, EPOCHS, N_TRAIN, N_TEST, LR = 32, 16, 4, 300, 120, 2e-3
KEYS = (
    "rotation_leakage",
    "polarity_leakage",
    "content_kept",
    "neighbour_content_kept",
    "reconstruction_corr",
)


def train(kind: str, crops: np.ndarray, seed: int):
    nz = ("rotation", "polarity")
    if kind == "vae":
        ds, k = NuisanceAutoencode(crops, nz, seed=seed), 1
    else:
        ds, k = NuisancePairs(crops, nz, seed=seed), 2
    cfg = MEVAEConfig(
        image_size=SIZE, channels=1, latent_dim=LATENT, inter_dim=64, n_encoders=k, beta=0.0625
    )
    opts = TrainOptions(
        epochs=EPOCHS, batch_size=32, learn_rate=LR, seed=seed, earlystop=False, device="cpu"
    )
    return Trainer(cfg, ds, opts).train()


@pytest.fixture(scope="module")
def data():
    train_crops, _ = synthetic_crops(N_TRAIN, SIZE, seed=0)
    test_crops, classes = synthetic_crops(N_TEST, SIZE, seed=1000)
    return train_crops, test_crops, classes


@pytest.fixture(scope="module")
def models(data):
    return {kind: train(kind, data[0], seed=0) for kind in ("vae", "mevae")}


def test_evaluate_command(models, data, tmp_path, capsys):
    _, test_crops, classes = data
    folder = tmp_path / "cells"
    names = [f"cell_{i}" for i in range(len(test_crops))]
    for name, crop in zip(names, test_crops, strict=True):
        write_image(folder / f"{name}.tif", crop)
    pd.DataFrame({"filename": [f"{n}.tif" for n in names], "class": classes}).to_csv(
        tmp_path / "classes.csv", index=False
    )
    ckpt = save_checkpoint(tmp_path / "run", models["mevae"])
    out = tmp_path / "report.json"
    argv = ["evaluate", "--checkpoint", str(ckpt), "--targets", str(folder), "--out", str(out)]
    assert main([*argv, "--classes", str(tmp_path / "classes.csv")]) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report  # printed and written alike
    assert report["n_cells"] == len(test_crops)
    for key in (*KEYS, "nmi", "purity"):
        assert 0.0 <= report[key] <= 1.0, (key, report[key])
    assert report["purity"] >= 1 / 3  # k-means purity is at least the largest class share
    # the CLI reads the files back (uint8 / 255) and measures exactly what the library measures
    quantised = np.round(test_crops * 255) / 255
    direct = invariance_report(models["mevae"], quantised, classes=classes, seed=0)
    for key in (*KEYS, "nmi", "purity"):
        assert report[key] == pytest.approx(direct[key], abs=1e-4), key

    # --first/--last select cells (natural name order); fewer than 10 cells is a clear error
    assert main([*argv, "--first", "20", "--last", "80"]) == 0
    assert json.loads(out.read_text())["n_cells"] == 60
    assert main([*argv, "--first", "0", "--last", "5"]) == 2
    assert "at least 10" in capsys.readouterr().err


def test_mevae_corrects_the_pose_a_vae_does_not(models, data):
    _, test_crops, _ = data
    vae = invariance_report(models["vae"], test_crops, seed=0)
    mevae = invariance_report(models["mevae"], test_crops, seed=0)
    # measured with seeds 0, 1, 2 (data and training): ME-VAE 0.85 / 0.91 / 0.86, VAE 0.75 /
    # 0.72 / 0.71 (smallest gap 0.10); the standardised rotation leakage was 0.86 / 0.81 / 0.60
    # (ME-VAE) vs 0.83 / 0.80 / 0.86 (VAE): not a robust difference at this budget
    assert mevae["reconstruction_corr"] > vae["reconstruction_corr"] + 0.07
    assert mevae["reconstruction_corr"] > 0.82
    for rep in (vae, mevae):
        assert all(0.0 <= rep[k] <= 1.0 for k in KEYS)
