"""What the training budget and the guards against latent collapse do to an ME-VAE: dimensions
in use, rotation/polarity leakage, content kept and k-means NMI on held-out synthetic cells.

    python benchmarks/diagnostics/collapse.py --images 40000              # the default budget
    python benchmarks/diagnostics/collapse.py --images 40000 --warm 0.25  # KL warm-up
    python benchmarks/diagnostics/collapse.py --images 40000 --free_bits 0.25
    python benchmarks/diagnostics/collapse.py --images 80000 --beta_scale 0.5

One JSON line per run (the table in docs/benchmarks.md, "Defaults that learn", is these lines).
Cells: ``synthetic_crops`` (3 classes), 480 for training and 300 held out, 32 px, 1 channel; an
ME-VAE with K = 2 (rotation, polarity), latent 16, the KL weight of ``config.kl_weight`` times
``--beta_scale``; early stopping off so every run sees its whole budget.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from napari_mevae import workflow
from napari_mevae.config import TrainOptions
from napari_mevae.evaluation import invariance_report
from napari_mevae.synthetic import synthetic_crops
from napari_mevae.training import Trainer

KEYS = (
    "rotation_leakage",
    "polarity_leakage",
    "paired_rotation_leakage",
    "paired_polarity_leakage",
    "content_kept",
    "nmi",
)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--n", type=int, default=480, help="training cells")
    p.add_argument("--images", type=int, default=40_000, help="images seen (the budget)")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warm", type=float, default=0.0, help="KL warm-up, fraction of the epochs")
    p.add_argument("--free_bits", type=float, default=0.0)
    p.add_argument("--beta_scale", type=float, default=1.0, help="x the default KL weight")
    p.add_argument("--eps", type=float, default=1.0, help="sampling noise std")
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    train, _ = synthetic_crops(a.n, a.size, 1, 3, seed=a.seed)
    test, classes = synthetic_crops(300, a.size, 1, 3, seed=1000 + a.seed)
    cfg = workflow.build_config(
        "mevae",
        image_size=a.size,
        channels=1,
        nuisances=["rotation", "polarity"],
        latent_dim=a.latent,
        free_bits=a.free_bits,
        epsilon_std=a.eps,
    )
    cfg.beta *= a.beta_scale
    epochs = max(1, round(a.images / a.n))
    opts = TrainOptions(
        epochs=epochs,
        batch_size=a.batch,
        learn_rate=a.lr,
        seed=a.seed,
        kl_warmup=a.warm * epochs,
        earlystop=False,
        device="cpu",
    )
    t0 = time.time()
    model = Trainer(cfg, workflow.training_dataset(train, cfg.nuisances, seed=a.seed), opts).train()
    seconds = time.time() - t0
    report = invariance_report(model, test, classes=classes, seed=0)
    out = dict(vars(a), epochs=epochs, seconds=round(seconds, 1), dims=model.n_active)
    out.update({k: round(report[k], 3) for k in KEYS})
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
