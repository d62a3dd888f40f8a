"""`mevae evaluate` end to end, and the ME-VAE's headline property on synthetic cells (32 px).

Budget: a few epochs on 300 synthetic canonical cells.  In so short a run the latents of both
models stay close to the prior (tiny spread), and ``invariance_report``'s leakage probes
standardise every latent dimension, so they read the nuisance from dimensions that carry almost
no variance: measured over seeds 0, 1, 2 the ME-VAE's standardised rotation leakage is NOT reliably
below the VAE's at this budget (see docs/benchmarks.md, "Fig. 2 reproduction").  What is robust,
and asserted here, is the pose correction the ME-VAE is trained for: from a rotated and flipped
cell it reconstructs the canonical cell far better than a VAE trained on rotated cells.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from napari_mevae.checkpoints import save_checkpoint
from napari_mevae.cli import main
from napari_mevae.config import MEVAEConfig, TrainOptions
from napari_mevae.evaluation import invariance_report
from napari_mevae.folders import write_image
from napari_mevae.nuisances import NuisanceAutoencode, NuisancePairs
from napari_mevae.synthetic import synthetic_crops
from napari_mevae.training import Trainer

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
