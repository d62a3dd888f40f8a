"""Where an ME-VAE's encoder means start, and what it does to the latent space it ends with.

    python benchmarks/diagnostics/saddle.py --cells demo --seed 3 --start 0   # before
    python benchmarks/diagnostics/saddle.py --cells demo --seed 3             # now (model.FUSION_START)
    python benchmarks/diagnostics/saddle.py --cells continuous --seed 0 [--start 0]

The product fusion has a saddle at 0: with every encoder's means near 0 (PyTorch's
initialisation) the product and each encoder's gradient start near 0.  ``--start`` sets the
encoders' mean bias before training (the package starts it at ``model.FUSION_START``, 0.5).

Cells: ``demo`` = what ``mevae demo --seed S`` trains on (12 synthetic fields of 50 cells, 2
channels, 32 px crops that fit the cell, 480 to train, 120 held out); ``continuous`` = canonical
synthetic crops (32 px, 1 channel, 3 classes by nucleus size and spots) whose elongation,
nucleus size, spot count and brightness also vary continuously within each class, as real
phenotypes do (480 to train, 300 held out); the R^2 of a linear probe for each of these
factors from the features is printed too.  Everything else is the default training (the
budget, KL weight, invariance term, early stopping off so every run sees its whole budget),
latent 16 as the napari widget and ``mevae demo``, one thread.  Prints the dimensions in use
every 8 epochs, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy import ndimage

from napari_mevae import workflow
from napari_mevae.analysis import encode
from napari_mevae.config import TrainOptions
from napari_mevae.demo import demo_cells
from napari_mevae.evaluation import invariance_report
from napari_mevae.synthetic import _render
from napari_mevae.training import Trainer

FACTORS = ("elongation", "nucleus", "spots", "brightness")


def continuous_crops(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` canonical crops, their classes and their continuous factors ``(n, 4)``."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 3, n)
    factors = np.zeros((n, len(FACTORS)))
    crops = np.zeros((n, 1, size, size), np.float32)
    m = (size - 1) / 2.0
    dy, dx = np.mgrid[0:size, 0:size].astype(float) - m
    for i, c in enumerate(classes):
        elong = rng.uniform(1.6, 3.0)
        nucleus = (0.35, 0.6, 0.35)[c] * rng.uniform(0.8, 1.2)
        spots = (0, 0, 6)[c] + int(rng.integers(0, 3))
        bright = rng.uniform(0.6, 1.0)
        a = 0.4 * size
        cell, inten = _render(
            dy, dx, 0.0, False, a, a / elong, ("", elong, nucleus, spots, 0.05), 1, rng
        )
        inten = ndimage.gaussian_filter(inten, sigma=(0, 0.7, 0.7)) * bright
        inten += 0.02 * rng.standard_normal(inten.shape)
        crops[i] = np.clip(inten * cell, 0, 1)
        factors[i] = elong, nucleus, spots, bright
    return crops, classes, factors


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", choices=("demo", "continuous"), default="demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=float, default=None, help="encoder mean bias at the start")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    factors = None
    if a.cells == "demo":
        crops, _, truth, _ = demo_cells(seed=a.seed)
        train, test, classes = crops[:480], crops[480:], truth[480:]
    else:
        train, _, _ = continuous_crops(480, 32, a.seed)
        test, classes, factors = continuous_crops(300, 32, 1000 + a.seed)
    cfg = workflow.build_config(
        "mevae",
        image_size=32,
        channels=train.shape[1],
        nuisances=["rotation", "polarity"],
        latent_dim=16,
    )
    opts = TrainOptions(seed=a.seed, earlystop=False, device="cpu", threads=1)
    trainer = Trainer(cfg, workflow.training_dataset(train, cfg.nuisances, seed=a.seed), opts)
    model = trainer.model_unwrapped
    if a.start is not None:
        with torch.no_grad():
            for encoder in model.encoders:
                encoder.mean.bias.fill_(a.start)
    t0 = time.time()
    trace = []
    for rep in trainer.run():
        if rep.kind == "epoch" and rep.epoch % 8 == 1:
            trace.append(f"{rep.epoch}:{model.n_active}")
    seconds = time.time() - t0
    print("epoch:dimensions in use", " ".join(trace), flush=True)
    report = invariance_report(model, test, classes=classes, seed=a.seed)
    out = dict(cells=a.cells, seed=a.seed, start=a.start, seconds=round(seconds))
    out.update(dims=model.n_active, directions=model.n_directions)
    keys = ("rotation_leakage", "paired_rotation_leakage", "polarity_leakage")
    keys += ("paired_polarity_leakage", "content_kept", "nmi")
    out.update({k: round(float(report[k]), 2) for k in keys})
    if factors is not None:
        from sklearn.linear_model import RidgeCV
        from sklearn.model_selection import cross_val_score

        z = encode(model, test)
        for j, name in enumerate(FACTORS):
            r2 = cross_val_score(RidgeCV(), z, factors[:, j], cv=5, scoring="r2").mean()
            out[f"r2_{name}"] = round(float(r2), 2)
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
