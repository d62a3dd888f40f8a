"""The one pipeline every front end calls: ``mevae`` (cli.py), ``mevae demo`` (demo.py) and the
napari widget (``_widgets``).  A fix made here reaches all three.

segmented image --crop_cells--> canonical crops --training_dataset--> (inputs, target) pairs
--run_training--> model (+ training.log, checkpoint) --encode_cells--> features
--cluster_cells--> UMAP + clusters --analysis.features_table--> one row per cell.

The configuration rules live in :mod:`napari_mevae.config` (no torch); this module imports
torch only inside the functions that need it, so importing it stays cheap.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import (
    CropSettings,
    InputError,
    MEVAEConfig,
    TrainOptions,
    kl_weight,
    preset,
)
from .runs import TrainData

if TYPE_CHECKING:
    from .cells import CellCrops
    from .model import MEVAE
    from .training import Trainer, TrainReport

__all__ = [
    "Encoded",
    "TrainData",
    "background_threads",
    "build_config",
    "cluster_cells",
    "crop_cells",
    "dims_in_use",
    "still_learning",
    "CLI_NAMES",
    "GUI_NAMES",
    "encode_cells",
    "load_train_data",
    "open_targets",
    "preview_pairs",
    "run_training",
    "steps_per_epoch",
    "train_on_crops",
    "training_dataset",
]


# -- configuration -----------------------------------------------------------------------------
def build_config(
    model: str = "mevae",
    *,
    image_size: int,
    channels: int,
    nuisances: Sequence[str] = (),
    n_encoders: int | None = None,
    beta: float | None = None,
    beta_factor: float | None = None,
    **arch: Any,
) -> MEVAEConfig:
    """The model config from a user's choices, by the same rules everywhere.

    Parameters
    ----------
    model : ``"mevae"``, ``"vae"`` or ``"betavae"``.
    image_size, channels : the crops' side and channel count.
    nuisances : what the encoders remove, one encoder each for an ME-VAE (for the baselines,
        the augmentations); stored in the config.
    n_encoders : K when it is not the number of nuisances (one per input folder).
    beta : the KL weight, exactly (:func:`napari_mevae.config.kl_weight`); default: the
        reference's balance at this crop size.
    beta_factor : the beta-VAE's weight relative to the VAE's (default 4).
    **arch : any other :class:`MEVAEConfig` field (latent_dim, inter_dim, nlayers...).
    """
    if model == "mevae":
        k = len(nuisances) if n_encoders is None else n_encoders
        if k < 1:
            raise InputError(
                "an ME-VAE needs at least one nuisance to remove (rotation, polarity, scale), "
                "one encoder each; or choose the VAE model"
            )
    else:
        k = 1
    return preset(
        model,
        image_size=image_size,
        channels=channels,
        n_encoders=k,
        nuisances=list(nuisances),
        beta=kl_weight(model, image_size, beta, beta_factor),
        **arch,
    )


def steps_per_epoch(n_cells: int, batch_size: int) -> int:
    return max(1, math.ceil(n_cells / max(1, batch_size)))


def background_threads() -> int:
    """Threads for work started from napari: all cores but one (at least one), so the viewer's
    event loop always has a core of its own."""
    return max(1, (os.cpu_count() or 2) - 1)


# -- data --------------------------------------------------------------------------------------
def crop_cells(
    image: Any,
    labels: Any,
    settings: CropSettings,
    progress: Callable[[int, int], None] | None = None,
) -> CellCrops:
    """Crop every labelled cell into canonical pose (:func:`napari_mevae.cells.extract_cells`)."""
    from .cells import extract_cells

    return extract_cells(
        np.asarray(image), np.asarray(labels), progress=progress, **settings.extract_kwargs()
    )


def training_dataset(
    crops: Any, nuisances: Sequence[str], model: str = "mevae", seed: int = 0
) -> Any:
    """What a model trains on, from canonical crops: for an ME-VAE, encoder k sees the cell with
    nuisance k freshly drawn every epoch and the target is the canonical cell; a baseline
    (VAE / beta-VAE) autoencodes the cell with every nuisance applied."""
    from . import nuisances as nz

    if model != "mevae":
        if nuisances:
            return nz.NuisanceAutoencode(crops, list(nuisances), seed=seed)
        import torch
        from torch.utils.data import TensorDataset

        t = torch.from_numpy(np.ascontiguousarray(crops, dtype=np.float32))
        return TensorDataset(t[:, None], t)
    if not nuisances:
        raise InputError(
            "an ME-VAE needs at least one nuisance to remove (rotation, polarity, scale), "
            "one encoder each; or choose the VAE model"
        )
    return nz.NuisancePairs(crops, list(nuisances), seed=seed)


def preview_pairs(
    crops: np.ndarray, nuisances: Sequence[str], n: int = 6, seed: int = 0
) -> tuple[np.ndarray, int]:
    """A few training examples, one row each: the K encoder inputs, then the target.

    Returns ``(images (n*(K+1), C, S, S), K)``."""
    model = "mevae" if nuisances else "vae"
    ds = training_dataset(np.asarray(crops[:n]), nuisances, model, seed=seed)
    if hasattr(ds, "set_epoch"):
        ds.set_epoch(0)
    rows, k = [], 1
    for i in range(min(n, len(ds))):
        inputs, target = (np.asarray(t, dtype=np.float32) for t in ds[i][:2])
        if inputs.ndim == 3:
            inputs = inputs[None]
        k = inputs.shape[0]
        rows.extend([*inputs, target])
    return np.stack(rows), k


def open_targets(
    source: str | Path, image_size: int, channels: int, lazy: bool = False
) -> tuple[Any, list[str], list[str]]:
    """Canonical crops from a folder of images, a ``.npy`` crops file or a cell store written
    by ``mevae crop`` (both read lazily).

    Returns the crops (an array, or a lazy store with the same indexing), the file names for
    encodings.csv and the image stems."""
    from .folders import FolderTargets, LazyFolderTargets
    from .screen_store import ScreenStore, is_store
    from .store import CropStore

    path = Path(source)
    if is_store(path):
        screen = ScreenStore(path)
        if screen.crop_shape != (channels, image_size, image_size):
            raise InputError(
                f"{path} holds crops of shape {screen.crop_shape} (C, S, S); the model wants "
                f"({channels}, {image_size}, {image_size}): set --nchannel/--image_size"
            )
        names = [f"{path.name}[{i}]" for i in range(len(screen))]
        return screen.crops, names, names
    if path.suffix == ".npy":
        store = CropStore(path)
        if store.shape[1:] != (channels, image_size, image_size):
            raise InputError(
                f"{path} holds crops of shape {store.shape[1:]} (C, S, S); the model wants "
                f"({channels}, {image_size}, {image_size}): set --nchannel/--image_size"
            )
        names = [f"{path.stem}[{i}]" for i in range(len(store))]
        return store, names, names
    if lazy:
        tg = LazyFolderTargets(path, image_size, channels)
        return tg, tg.filenames, tg.names
    tg = FolderTargets(path, image_size, channels)
    return tg.array, tg.filenames, tg.names


def load_train_data(
    *,
    model: str,
    image_size: int,
    channels: int,
    targets: str | Path | None = None,
    nuisances: Sequence[str] = (),
    input_dirs: Sequence[str | Path] = (),
    target_dir: str | Path | None = None,
    lazy: bool = False,
    seed: int = 0,
) -> TrainData:
    """What a run on files trains on and writes out.

    Parameters
    ----------
    model : ``"mevae"``, ``"vae"`` or ``"betavae"``.
    image_size, channels : what every image is read as (resized when it differs).
    targets : a folder of canonical crops, a ``.npy`` crops file or a cell store (``mevae
        crop``): the encoder inputs are made from it with ``nuisances`` drawn fresh every epoch.
    input_dirs, target_dir : instead of ``targets``, the reference's pair folders (one input
        folder per encoder, the target folder); a baseline reads the first input folder only.
    lazy : read images as needed instead of loading them all.
    seed : of the nuisance draws.
    """
    from .folders import FolderPairs

    baseline = model != "mevae"
    if targets:
        if input_dirs or target_dir:
            raise InputError("use either --targets or --data_dir/--out1_dir, not both")
        crops, filenames, _ = open_targets(targets, image_size, channels, lazy)
        ds = training_dataset(crops, nuisances, model, seed=seed)
        k = 1 if baseline else len(nuisances)
        first = range(min(64, len(ds)))
        grid = [np.stack([ds[i][0][j].numpy() for i in first]) for j in range(k)]
        shown = np.stack([np.asarray(crops[i]) for i in first])
        return TrainData(ds, filenames, crops, grid, shown, k, list(nuisances))
    if not input_dirs:
        raise InputError(
            "no training data: give --data_dir (+ --input2_dir, --out1_dir) or --targets"
        )
    if baseline:
        # The paper's baselines: a plain (beta-)VAE autoencodes the raw cells of the first folder.
        ds = FolderPairs([input_dirs[0]], input_dirs[0], image_size, channels, not lazy)
    else:
        if not target_dir:
            raise InputError("--out1_dir (the corrected target cells) is needed to train an ME-VAE")
        ds = FolderPairs(list(input_dirs), target_dir, image_size, channels, not lazy)
    k = ds.n_encoders
    grid = [ds.inputs_array(j)[:64] for j in range(k)]
    return TrainData(ds, ds.filenames, ds.pairs_array(), grid, ds.targets_array(), k, [])


# -- training ----------------------------------------------------------------------------------
#: reconstructions of the preview cells at most this often (seconds); napari shows them every 2 s
PREVIEW_SECONDS = 1.0


def run_training(
    trainer: Trainer,
    log_path: str | Path | None = None,
    should_stop: Callable[[], bool] | None = None,
    preview: np.ndarray | None = None,
) -> Generator[TrainReport, None, MEVAE]:
    """Run ``trainer``, yielding its reports and writing ``training.log`` (``epoch<TAB>loss``,
    appended to when the run resumes a checkpoint).

    The first report has kind ``start`` (its ``message`` says where and in what precision the
    run trains).  ``should_stop`` is polled after every step: True ends the run after that step,
    keeping the model.  With ``preview`` cells, an epoch report carries their reconstructions
    (``report.preview``) when PREVIEW_SECONDS have passed since the last, and so does the end
    report: a human rate, as the napari sample's epochs take a tenth of a second.  Returns the
    trained model.

    The run's folders (``trainer.options.save_dir``, the log's) are locked while it runs
    (:class:`~napari_mevae.outputs.DirLock`): a second run into them fails at once.  A new
    log replaces an older one only with the run's first checkpoint, so a run that fails before
    it saves anything leaves the previous ``training.log`` with its checkpoint."""
    from .analysis import reconstruct
    from .outputs import DirLock
    from .training import TrainReport

    folders = [trainer.options.save_dir, None if log_path is None else Path(log_path).parent]
    locks: list[DirLock] = []
    from .runs import RunLog

    start = trainer.start_epoch
    log = RunLog(Path(log_path), append=start > 0, start=start) if log_path else None
    try:
        for folder in dict.fromkeys(f for f in folders if f is not None):
            locks.append(DirLock(folder, "training").acquire())
        if log is not None:
            log.open()
        steps = steps_per_epoch(len(trainer.sampler), trainer.options.batch_size // trainer.world)
        total = trainer.start_epoch + trainer.epochs
        yield TrainReport(
            "start",
            trainer.start_epoch,
            0,
            steps,
            math.nan,
            math.nan,
            math.nan,
            0.0,
            total,
            message=f"{trainer.device.type}, {trainer.precision}",
        )
        gen = trainer.run()
        ended = False
        previewed = -math.inf
        try:
            while True:
                try:
                    report = next(gen)
                except StopIteration as stop:
                    ended = True
                    return stop.value
                if report.kind == "epoch" and log is not None:
                    log.row(report.epoch - 1, report.loss)
                shown = report.kind == "end" or (
                    report.kind == "epoch" and time.monotonic() - previewed >= PREVIEW_SECONDS
                )
                if shown and preview is not None and len(preview):
                    report.preview = reconstruct(trainer.model_unwrapped, preview)
                    trainer.model.train()
                    previewed = time.monotonic()
                yield report
                if should_stop is not None and should_stop():
                    trainer.stop()
        finally:
            gen.close()  # an interrupted run saves the checkpoint of what was learned
            if log is not None and (ended or trainer.last_checkpoint is not None):
                log.commit()
    finally:
        if log is not None:
            log.close()
        for lock in reversed(locks):
            lock.release()


def train_on_crops(
    crops: np.ndarray,
    config: MEVAEConfig,
    options: TrainOptions,
    model: str = "mevae",
    *,
    resume: str | Path | None = None,
    preview: np.ndarray | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Generator[TrainReport, None, str]:
    """Train a ``model`` (``mevae``, ``vae``, ``betavae``: which data set it learns from) on
    canonical crops with fresh nuisances (``config.nuisances``), or continue the checkpoint
    ``resume``; the napari widget runs this in its training process.

    ``options.save_dir`` receives ``training.log`` and ``models/checkpoint.pt`` (after the
    first epoch, at most every CHECKPOINT_SECONDS, and when the run ends).  Yields
    :func:`run_training`'s reports; returns the checkpoint's path."""
    from .checkpoints import load_checkpoint
    from .training import Trainer

    if options.save_dir is None:
        raise ValueError("train_on_crops needs options.save_dir (where the checkpoint goes)")
    ckpt = load_checkpoint(resume) if resume else None
    cfg = ckpt.config if ckpt is not None else config
    dataset = training_dataset(crops, cfg.nuisances, model, seed=options.seed or 0)
    trainer = Trainer(ckpt.build_model() if ckpt else cfg, dataset, options, resume=ckpt)
    yield from run_training(trainer, Path(options.save_dir) / "training.log", should_stop, preview)
    return str(trainer.last_checkpoint)


#: how each front end names the settings that dims_in_use suggests changing
CLI_NAMES = {"epochs": "--epochs", "beta": "--beta", "kl_warmup": "--kl_warmup"}
GUI_NAMES = {"epochs": "Epochs", "beta": "beta", "kl_warmup": "KL warm-up"}


def dims_in_use(model: MEVAE, names: dict[str, str] = CLI_NAMES) -> str:
    """One line on the latent dimensions the trained model uses and, when it uses fewer than 2
    (too few for clusters to mean much), what to change; every front end shows it after
    training, naming the settings as that front end does (``names``)."""
    if not model.activity_measured:
        return "latent dimensions in use: not measured (the model has not trained yet)"
    n, latent = model.n_active, model.config.latent_dim
    if n >= min(2, latent):
        d = model.n_directions
        varying = "" if d is None else f", varying in {d} independent direction{'s' * (d != 1)}"
        return (
            f"latent dimensions in use: {n} of {latent}{varying} (the others are 0 in the "
            "encodings)"
        )
    size = model.config.image_size
    balanced = kl_weight("mevae", size)
    if model.config.beta > balanced * 1.01:
        hint = (
            f"lower {names['beta']} to {balanced:g}, the default at image size {size}: the "
            "reference's balance between reconstruction and KL"
        )
    else:
        hint = (
            f"train longer (more {names['epochs']}) or ramp the KL weight up ({names['kl_warmup']})"
        )
    what = (
        "0: the model has not learned to use its latent space yet; the encodings keep every "
        "dimension"
        if n == 0
        else f"only {n} of {latent}: too few for clusters to mean much"
    )
    return f"latent dimensions in use: {what}. Try: {hint}"


#: the loss's fall over the last quarter of a run, relative, above which the default budget
#: grows (training.Trainer) and a run that ends still falling says more epochs may help: LINCS
#: after 30 passes fell 1.0-1.8 % (and 100 passes kept more of the cell), `mevae demo` 0.2-0.5 %
STILL_LEARNING = 0.008


def still_learning(
    history: list[dict], names: dict[str, str] = CLI_NAMES, reason: str = ""
) -> str | None:
    """A hint when the loss was still falling at the end of the run (None otherwise): the mean
    loss of the last quarter of the epochs against the quarter before.  Under fresh nuisances
    the loss is noisy from epoch to epoch, so single epochs say little.  ``reason`` is why the
    run ended (:class:`~napari_mevae.training.TrainReport`): after an early stop the loss had
    stopped improving by the trainer's own rule, so there is nothing to say."""
    if reason == "early_stop":
        return None
    losses = [float(h["loss"]) for h in history if not h.get("partial")]
    q = len(losses) // 4
    if q < 2:
        return None
    before = sum(losses[-2 * q : -q]) / q
    last = sum(losses[-q:]) / q
    fall = (before - last) / abs(before) if before else 0.0
    if not math.isfinite(fall) or fall < STILL_LEARNING:
        return None
    return (
        f"the loss was still falling at the end ({100 * fall:.1f} % over the last quarter of the "
        f"run): more {names['epochs']} may let the model keep more of the cell"
    )


# -- analysis ----------------------------------------------------------------------------------
@dataclass
class Encoded:
    latents: np.ndarray  # (N, L) features, unused dimensions 0
    recon: np.ndarray  # (N, C, S, S) corrected cells


def encode_cells(
    model: MEVAE, crops: np.ndarray, batch_size: int = 128, reconstructions: bool = True
) -> Generator[tuple[int, int], None, Encoded]:
    """Encode every cell, yielding ``(done, total)``; then reconstruct them.  Returns
    :class:`Encoded`."""
    from .analysis import iter_encode, reconstruct

    latents = yield from iter_encode(model, crops, batch_size=batch_size)
    recon = reconstruct(model, crops, batch_size=batch_size) if reconstructions else None
    return Encoded(latents, recon)


# -- jobs for a background process (child.ChildService: the napari widget's Analyse tab) --------
def warm_up(*, should_stop: Callable[[], bool] | None = None) -> Generator[None, None, float]:
    """Import and compile what the analysis needs (torch, UMAP's numba code, scikit-learn) in
    this process, so the user's first UMAP does not wait for it; returns the seconds taken."""
    from .analysis import cluster, run_umap
    from .model import MEVAE  # noqa: F401 (imports torch)

    t0 = time.perf_counter()
    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    run_umap(x)
    cluster(x, "kmeans", 2)
    return time.perf_counter() - t0
    yield  # a generator, as every job


_MODELS: dict[tuple[str, float], Any] = {}


def encode_job(
    checkpoint: str,
    crops: np.ndarray,
    batch_size: int = 128,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> Generator[tuple[int, int], None, Encoded | None]:
    """:func:`encode_cells` with the model of ``checkpoint`` (kept loaded while the file is
    unchanged); ``None`` when stopped."""
    from .checkpoints import load_checkpoint

    key = (str(checkpoint), Path(checkpoint).stat().st_mtime)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_checkpoint(checkpoint).build_model("cpu")
    gen = encode_cells(_MODELS[key], crops, batch_size)
    while True:
        try:
            item = next(gen)
        except StopIteration as done:
            return done.value
        yield item
        if should_stop is not None and should_stop():
            return None


def cluster_job(
    latents: np.ndarray,
    method: str = "kmeans",
    n_clusters: int = 3,
    embedding: np.ndarray | None = None,
    with_umap: bool = True,
    seed: int = 0,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> Generator[str, None, tuple[np.ndarray | None, np.ndarray]]:
    """:func:`cluster_cells` as a job (yields the stage it starts)."""
    yield "umap" if with_umap and embedding is None else "clusters"
    return cluster_cells(latents, method, n_clusters, embedding, with_umap, seed)


def cluster_cells(
    latents: np.ndarray,
    method: str = "kmeans",
    n_clusters: int = 3,
    embedding: np.ndarray | None = None,
    with_umap: bool = True,
    seed: int = 0,
) -> tuple[np.ndarray | None, np.ndarray]:
    """UMAP (unless given or not wanted) and cluster ids ``1..k``; returns
    ``(embedding, clusters)``."""
    from .analysis import cluster, run_umap

    if with_umap and embedding is None:
        embedding = run_umap(latents, seed=seed)
    clusters = cluster(latents, method=method, n_clusters=n_clusters, seed=seed)
    return embedding, clusters
