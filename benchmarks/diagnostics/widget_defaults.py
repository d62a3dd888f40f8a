"""What the napari plugin's defaults train on its own sample: dimensions in use and k-means NMI
against the sample's true classes, as a user clicking Train gets them.

    python benchmarks/diagnostics/widget_defaults.py 0 1 2    # sample seeds

The Cells tab's defaults (48 px, percentile, fit the cell, drop border cells), the Model tab's
(ME-VAE, rotation + polarity, latent 16, the default budget, batch 50, lr 5e-4), one thread as
the widget's training process gets on 2 cores.  One JSON line per seed.
"""

from __future__ import annotations

import json
import sys
import time

from sklearn.metrics import normalized_mutual_info_score

from napari_mevae import workflow
from napari_mevae._sample_data import synthetic_cells
from napari_mevae.analysis import cluster, encode
from napari_mevae.config import CropSettings, TrainOptions
from napari_mevae.training import Trainer


def run(seed: int) -> dict:
    (image, _, _), (labels, labels_kw, _) = synthetic_cells(seed=seed)
    feats = labels_kw["features"]
    truth = dict(zip(feats["index"], feats["true_class"], strict=True))
    cells = workflow.crop_cells(image, labels, CropSettings(channel_axis=0, scale="fit"))
    crops = cells.crops
    cfg = workflow.build_config(
        "mevae",
        image_size=crops.shape[-1],
        channels=crops.shape[1],
        nuisances=["rotation", "polarity"],
        latent_dim=16,
    )
    trainer = Trainer(
        cfg,
        workflow.training_dataset(crops, cfg.nuisances, seed=0),
        TrainOptions(threads=1, device="cpu", seed=0),
    )
    t0 = time.time()
    model = trainer.train()
    seconds = time.time() - t0
    z = encode(model, crops)
    y = [truth[label] for label in cells.kept["label"]]
    k = len(feats["true_class"].cat.categories)  # k = the number of true classes
    nmi = normalized_mutual_info_score(y, cluster(z, "kmeans", k))
    out = dict(seed=seed, cells=len(crops), epochs=trainer.epochs, seconds=round(seconds, 1))
    out.update(dims=model.n_active, directions=model.n_directions, nmi=round(float(nmi), 3))
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    for s in sys.argv[1:] or ["0"]:
        run(int(s))
