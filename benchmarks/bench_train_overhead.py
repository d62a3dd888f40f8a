"""What the Train button spends beside training: checkpoints and preview reconstructions.

    python benchmarks/bench_train_overhead.py             # writes docs/benchmarks.md
    python benchmarks/bench_train_overhead.py --no-write --epochs 100

Trains the napari plugin's sample as its Train button does (the Cells and Model tabs'
defaults, 8 preview cells, a save folder, one thread as the dock's training process gets on
2 cores) through :func:`napari_mevae.workflow.run_training`, twice in one run: with a
checkpoint and a preview after every epoch (CHECKPOINT_SECONDS and PREVIEW_SECONDS set to 0:
how it was), and with the defaults (a checkpoint at most every CHECKPOINT_SECONDS, a preview
at most every PREVIEW_SECONDS).  The sample's 40 cells make 1,000 epochs of one step each.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def train_once(epochs: int | None, every_epoch: bool) -> dict:
    """Seconds, checkpoints written (and their bytes) and previews of one sample run."""
    import torch

    import napari_mevae.training as training
    from napari_mevae import workflow
    from napari_mevae._sample_data import synthetic_cells
    from napari_mevae.config import CHECKPOINT_SECONDS, CropSettings, TrainOptions

    torch.set_num_threads(1)
    (image, _, _), (labels, _, _) = synthetic_cells(seed=0)
    crops = workflow.crop_cells(image, labels, CropSettings(channel_axis=0, scale="fit")).crops
    cfg = workflow.build_config(
        "mevae",
        image_size=crops.shape[-1],
        channels=crops.shape[1],
        nuisances=["rotation", "polarity"],
        latent_dim=16,
    )
    saved = []
    real_save = training.save_checkpoint

    def counting_save(*args, **kwargs):
        path = real_save(*args, **kwargs)
        saved.append(path.stat().st_size)
        return path

    old = training.CHECKPOINT_SECONDS, workflow.PREVIEW_SECONDS
    training.save_checkpoint = counting_save
    if every_epoch:
        training.CHECKPOINT_SECONDS, workflow.PREVIEW_SECONDS = 0.0, 0.0
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            opts = TrainOptions(epochs=epochs, seed=0, threads=1, device="cpu", save_dir=run_dir)
            trainer = training.Trainer(
                cfg, workflow.training_dataset(crops, cfg.nuisances, seed=0), opts
            )
            t0 = time.perf_counter()
            previews = 0
            for rep in workflow.run_training(
                trainer, Path(run_dir) / "training.log", None, crops[:8]
            ):
                previews += rep.preview is not None
            seconds = time.perf_counter() - t0
    finally:
        training.save_checkpoint = real_save
        training.CHECKPOINT_SECONDS, workflow.PREVIEW_SECONDS = old
    return {
        "rule": "every epoch (before)"
        if every_epoch
        else f"at most every {CHECKPOINT_SECONDS:.0f} s (now)",
        "epochs": len(trainer.history),
        "seconds": seconds,
        "checkpoints": len(saved),
        "MB written": sum(saved) / 1e6,
        "previews": previews,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| checkpoints and previews | epochs | seconds | checkpoints written | MB written | previews |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['rule']} | {r['epochs']} | {r['seconds']:.1f} | {r['checkpoints']} | "
            f"{r['MB written']:.0f} | {r['previews']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=None, help="default: the budget (1,000)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    rows = [train_once(args.epochs, every) for every in (True, False)]
    ratio = rows[0]["seconds"] / rows[1]["seconds"]
    body = (
        f"Measured with `python benchmarks/bench_train_overhead.py` on {platform.node()} "
        f"({platform.machine()}, 2 cores), {time.strftime('%Y-%m-%d')}: the napari sample "
        "trained as the Train button does (its defaults, 8 preview cells, a save folder on "
        "disk, one thread), both runs in one process.\n\n"
        + table(rows)
        + f"\n\nThe run takes {ratio:.2f}x as long when it writes a checkpoint and decodes the "
        "preview after every epoch."
    )
    print(body)
    if not args.no_write:
        from _docs import replace_section

        replace_section(
            REPO / "docs" / "benchmarks.md",
            "Checkpoints and previews during training",
            body,
            keep_from="^### ",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
