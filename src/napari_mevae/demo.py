"""``mevae demo``: the whole job on built-in synthetic cells, ending with files a person opens.

segmented image -> canonical crops -> ME-VAE trained with fresh nuisances every epoch ->
features CSV, reconstruction grid, UMAP coloured by cluster and by true class, invariance report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

    from .synthetic import SyntheticCells


#: cells per synthetic field of the demo
PER_FIELD = 50
#: the report's cells come from the fields seeded from seed + REPORT_SEED on, never trained on
REPORT_SEED = 1000


def _say(verbose: int, text: str) -> None:
    if verbose > 0:
        print(text, file=sys.stderr, flush=True)


def _n_fields(n_cells: int) -> int:
    """Synthetic fields of PER_FIELD cells needed for ``n_cells`` (at least one)."""
    return max(1, -(-n_cells // PER_FIELD))


def demo_cells(
    n_cells: int = 600, size: int = 32, seed: int = 0
) -> tuple[np.ndarray, pd.DataFrame, np.ndarray, SyntheticCells]:
    """The cells the demo trains on and measures: ``(crops, table, true classes, first
    field)``.  Synthetic fields of PER_FIELD cells (seeds ``seed``, ``seed + 1``, ...), cropped
    to fit the cell at ``size`` px; the table's ``plane`` is the field.  Kept apart so that
    diagnostics measure the very cells ``mevae demo`` does."""
    import pandas as pd

    from . import workflow
    from .config import CropSettings
    from .synthetic import make_synthetic_cells

    settings = CropSettings(size=size, channel_axis=0, scale="fit")
    crops, tables, truth, first = [], [], [], None
    for f in range(_n_fields(n_cells)):
        syn = make_synthetic_cells(n_cells=PER_FIELD, shape=(384, 384), channels=2, seed=seed + f)
        if first is None:
            first = syn
        cells = workflow.crop_cells(syn.image, syn.labels, settings)
        kept = cells.kept.copy()
        kept["plane"] = f  # one "plane" per synthetic field
        crops.append(cells.crops)
        tables.append(kept)
        truth += [syn.classes[int(lbl)] for lbl in kept["label"]]
    crops_arr = np.concatenate(crops)[:n_cells]
    table = pd.concat(tables, ignore_index=True).iloc[: len(crops_arr)]
    return crops_arr, table, np.asarray(truth[: len(crops_arr)]), first


def run_demo(
    out: Path,
    epochs: int | None = None,
    n_cells: int = 600,
    size: int = 32,
    seed: int = 0,
    verbose: int = 1,
    latent_dim: int = 16,
    beta: float | None = None,
) -> dict[str, float]:
    """Run the demo into ``out``; returns the invariance/cluster report.

    The model and its training are what every front end gets by default (latent 16 as the
    napari widget): the KL-weight rule, the training budget (``epochs`` None: 40,000 images,
    83 epochs of the 480 training cells), batch, learning rate, early stopping and invariance
    term.  The report measures ``n_cells`` more cells from fields the model never saw.  Seeds
    0 / 1 / 2 on a 2-core machine with AMX, about a minute each: 3 / 3 / 2 latent dimensions
    in use (2 directions), rotation leakage 0.00, polarity 0.05 / 0.00 / 0.01, content kept
    0.63 / 0.64 / 0.64, NMI 0.90 / 0.95 / 0.94 (docs/benchmarks.md, "`mevae demo` on another
    machine").  Its own settings before (60 epochs, batch 32, lr 1e-3, a narrower model) used
    one dimension on seed 0, with NMI 0.67.

    ``beta`` defaults to the KL-weight rule of :func:`napari_mevae.config.kl_weight`."""
    import tifffile
    from tqdm.auto import tqdm

    from . import workflow
    from .analysis import encode, export_features_csv, features_table, reconstruct
    from .config import TrainOptions
    from .evaluation import invariance_report
    from .figures import montage, save_png, save_umap_plot, to_display
    from .outputs import atomic_write
    from .training import Trainer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fields = _n_fields(n_cells)
    _say(verbose, f"1/4 making {fields} synthetic field(s) of {PER_FIELD} cells and cropping them")
    crops_arr, table, truth_arr, first = demo_cells(n_cells, size, seed)
    for name, arr in (("cells_image.tif", first.image), ("cells_labels.tif", first.labels)):
        with atomic_write(out / name, "wb") as fh:  # every output whole or absent
            tifffile.imwrite(fh, arr)
    class_names = first.class_names

    nuisances = ["rotation", "polarity"]
    cfg = workflow.build_config(
        "mevae",
        image_size=size,
        channels=crops_arr.shape[1],
        nuisances=nuisances,
        beta=beta,
        latent_dim=latent_dim,
    )
    n_train = int(len(crops_arr) * 0.8)
    dataset = workflow.training_dataset(crops_arr[:n_train], nuisances, "mevae", seed=seed)
    # the training every front end gets by default: the budget, batch, learning rate, early
    # stopping and invariance term of TrainOptions (``epochs`` None = the budget)
    opts = TrainOptions(epochs=epochs, seed=seed, save_dir=out)
    trainer = Trainer(cfg, dataset, opts)
    _say(
        verbose,
        f"2/4 training an ME-VAE (K={cfg.n_encoders}) on {n_train} cells for {trainer.epochs} "
        "epochs"
        + (
            f" (up to {trainer.max_epochs} while the loss still falls)"
            if trainer.max_epochs > trainer.epochs
            else ""
        ),
    )
    bar = tqdm(total=trainer.epochs, unit="epoch", disable=verbose <= 0, file=sys.stderr)
    for rep in workflow.run_training(trainer, out / "training.log"):
        if rep.kind == "epoch":
            bar.total = rep.epochs  # the budget grows while the loss still falls
            bar.update(1)
            bar.set_postfix(loss=f"{rep.loss:.1f}")
    bar.close()
    model = trainer.model_unwrapped

    _say(verbose, "3/4 encoding every cell, UMAP and k-means clustering")
    latents = encode(model, crops_arr)
    embedding, clusters = workflow.cluster_cells(
        latents, "kmeans", n_clusters=len(class_names), seed=seed
    )
    feats = features_table(table, latents, embedding, clusters)
    names = np.asarray(class_names)[truth_arr]  # the class by name, as the UMAP plot's legend
    feats.insert(feats.columns.get_loc("cluster") + 1, "true_class", names)
    export_features_csv(feats, out / "features.csv", sources={"image": "synthetic cells"})

    recon = reconstruct(model, crops_arr[:32])
    pairs = np.empty((64, *to_display(crops_arr[:1]).shape[1:]), np.float32)
    pairs[0::2] = to_display(crops_arr[:32])
    pairs[1::2] = to_display(recon)
    grid = montage(pairs, ncols=8)
    zoom = 3  # nearest-neighbour: a 32 px cell is too small to look at
    save_png(out / "reconstructions.png", grid.repeat(zoom, axis=0).repeat(zoom, axis=1))
    save_umap_plot(
        out / "umap_clusters.png", embedding, clusters, truth=truth_arr, truth_names=class_names
    )

    _say(verbose, "4/4 measuring what is left of rotation and polarity on held-out cells")
    # as many cells again, from fields the model never saw (seeds from seed + REPORT_SEED): on
    # the 120 held out of the training fields the flip probe's standard error was about 0.05,
    # as large as the leakage it is there to show
    held_out, _, held_truth, _ = demo_cells(n_cells, size, seed + REPORT_SEED)
    report = invariance_report(model, held_out, classes=held_truth, seed=seed)
    report["epochs"] = float(len(trainer.history))  # epochs trained (early stopping)
    with atomic_write(out / "report.json") as fh:
        fh.write(json.dumps(report, indent=2) + "\n")
    _say(
        verbose,
        f"done: {out}/features.csv, reconstructions.png (odd columns input, even columns "
        f"reconstruction), umap_clusters.png, report.json: rotation leakage "
        f"{report['rotation_leakage']:.2f}, polarity leakage {report['polarity_leakage']:.2f}, "
        f"NMI vs true classes {report['nmi']:.2f}",
    )
    return report
