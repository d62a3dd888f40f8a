"""What the widgets run in thread workers.  Plain functions of numpy arrays and dataclasses:
they never touch a layer or a Qt widget, they yield/return values that the GUI thread shows.

torch, umap and the core modules are imported here lazily, inside the functions, so that
importing the widgets (and so starting napari) stays fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "TrainJob",
    "ExtractSettings",
    "extract_job",
    "preview_pairs_job",
    "train_job",
    "encode_job",
    "cluster_job",
    "steps_per_epoch",
    "MODEL_TYPES",
    "PRECISIONS",
]

#: training precisions, as napari_mevae.training.PRECISIONS (kept here: importing training
#: would import torch when napari opens)
PRECISIONS = ("auto", "float32", "bf16", "fp16")

#: model type shown in the widget -> model preset of the core
MODEL_TYPES = {"ME-VAE": "mevae", "VAE": "vae", "beta-VAE": "betavae"}


@dataclass
class ExtractSettings:
    """The Cells tab's choices, kept with the crops (and in checkpoints) for reproducibility."""

    size: int = 48
    channel_axis: int | None = None
    stack: bool = False
    normalize: str | None = "percentile"
    scale: str = "fixed"
    min_area: int = 0
    border: str = "drop"
    align: bool = True
    mask: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def extract_job(
    image: np.ndarray,
    labels: np.ndarray,
    settings: ExtractSettings,
    progress: Callable[[int, int], None] | None = None,
) -> Any:
    """Crop every labelled cell (cells.extract_cells); returns a CellCrops."""
    from ..cells import extract_cells

    return extract_cells(
        np.asarray(image),
        np.asarray(labels),
        size=settings.size,
        channel_axis=settings.channel_axis,
        stack=settings.stack,
        scale=settings.scale,
        mask=settings.mask,
        normalize=settings.normalize,
        min_area=settings.min_area,
        border=settings.border,
        align=settings.align,
        progress=progress,
    )


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def make_dataset(crops: np.ndarray, nuisances: Sequence[str], baseline: bool, seed: int = 0) -> Any:
    """The training set: nuisance pairs for an ME-VAE (K = number of nuisances), the
    autoencoding set for the VAE / beta-VAE baselines (K = 1)."""
    from .. import nuisances as transforms

    if baseline:
        if nuisances:
            return transforms.NuisanceAutoencode(crops, list(nuisances), seed=seed)
        import torch
        from torch.utils.data import TensorDataset

        t = torch.from_numpy(np.ascontiguousarray(crops, dtype=np.float32))
        return TensorDataset(t[:, None], t)
    if not nuisances:
        raise ValueError(
            "an ME-VAE needs at least one nuisance to remove (rotation, polarity, scale): "
            "tick one in the Cells tab, or choose the VAE model type"
        )
    return transforms.NuisancePairs(crops, list(nuisances), seed=seed)


def preview_pairs_job(
    crops: np.ndarray, nuisances: Sequence[str], n: int = 6, seed: int = 0
) -> tuple[np.ndarray, int]:
    """A few training examples as one row each: the K encoder inputs, then the target.

    Returns ``(images (n*(K+1), C, S, S), K)``."""
    ds = make_dataset(np.asarray(crops[:n]), nuisances, baseline=not nuisances, seed=seed)
    if hasattr(ds, "set_epoch"):
        ds.set_epoch(0)
    rows = []
    k = 1
    for i in range(min(n, len(ds))):
        inputs, target = ds[i]
        inputs = _numpy(inputs)
        if inputs.ndim == 3:
            inputs = inputs[None]
        k = inputs.shape[0]
        rows.extend([*inputs, _numpy(target)])
    return np.stack(rows), k


def steps_per_epoch(n_cells: int, batch_size: int) -> int:
    return max(1, math.ceil(n_cells / max(1, batch_size)))


@dataclass
class TrainJob:
    """Shared by the GUI and the training thread: a stop flag and the trainer once built.

    Plain Python (no Qt): setting a flag is safe across threads."""

    stop_requested: bool = False
    trainer: Any = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def stop(self) -> None:
        """Ask the run to end after the current step; the trainer keeps the model."""
        self.stop_requested = True
        if self.trainer is not None:
            self.trainer.stop()

    @property
    def model(self) -> Any:
        if self.trainer is None:
            return None
        model = self.trainer.model
        return getattr(model, "module", model)


def train_job(
    job: TrainJob,
    crops: np.ndarray,
    nuisances: Sequence[str],
    model_type: str,
    config_kw: dict[str, Any],
    options_kw: dict[str, Any],
    model: Any = None,
    preview: np.ndarray | None = None,
    history: Sequence[dict[str, Any]] = (),
    optimizer_state: dict[str, Any] | None = None,
) -> Generator[tuple[str, Any, Any], None, Any]:
    """Train in a worker thread, yielding ``(kind, TrainReport, extra)``:

    ``("started", None, steps_per_epoch)``, then ``("step", report, None)`` per step,
    ``("epoch", report, recon)`` per epoch with reconstructions ``(n, C, S, S)`` of
    ``preview`` cells, and ``("end", report, None)``.  Returns the trained model.
    ``model`` (an MEVAE) continues training it ("train more") from its ``history`` (epoch
    count and loss curve) and ``optimizer_state`` when known; otherwise a new one is built.
    """
    from ..analysis import reconstruct
    from ..checkpoints import Checkpoint
    from ..config import TrainOptions, preset
    from ..training import Trainer

    baseline = MODEL_TYPES[model_type] != "mevae"
    seed = options_kw.get("seed") or 0
    dataset = make_dataset(crops, nuisances, baseline, seed=seed)
    resume = None
    if model is None:
        k = 1 if baseline else len(nuisances)
        model = preset(
            MODEL_TYPES[model_type], n_encoders=k, nuisances=list(nuisances), **config_kw
        )
    else:
        done = [h for h in history if not h.get("partial")]
        resume = Checkpoint(
            config=model.config,
            model_state=model.state_dict(),
            optimizer_state=optimizer_state,
            epoch=len(done),
            history=list(history),
        )
    trainer = Trainer(model, dataset, TrainOptions(**options_kw), resume=resume)
    job.trainer = trainer
    if job.stop_requested:
        trainer.stop()
    yield "started", None, steps_per_epoch(len(dataset), trainer.options.batch_size)
    gen = trainer.run()
    while True:
        try:
            report = next(gen)
        except StopIteration as stop:
            job.history = list(trainer.history)
            return stop.value
        extra = None
        if report.kind == "epoch" and preview is not None and len(preview):
            extra = reconstruct(job.model, preview)
        yield report.kind, report, extra


@dataclass
class Encoded:
    latents: np.ndarray
    recon: np.ndarray


def encode_job(
    model: Any, crops: np.ndarray, batch_size: int = 128
) -> Generator[tuple[int, int], None, Encoded]:
    """Encode every cell (analysis.iter_encode, yielding ``(done, total)``), then reconstruct
    them; returns :class:`Encoded`."""
    from ..analysis import iter_encode, reconstruct

    gen = iter_encode(model, crops, batch_size=batch_size)
    while True:
        try:
            yield next(gen)
        except StopIteration as stop:
            latents = stop.value
            break
    return Encoded(latents, reconstruct(model, crops, batch_size=batch_size))


def cluster_job(
    latents: np.ndarray,
    method: str,
    n_clusters: int,
    embedding: np.ndarray | None = None,
    with_umap: bool = True,
    seed: int = 0,
) -> tuple[np.ndarray | None, np.ndarray]:
    """UMAP (unless given or not wanted) and cluster ids; returns ``(embedding, clusters)``."""
    from ..analysis import cluster, run_umap

    if with_umap and embedding is None:
        embedding = run_umap(latents, seed=seed)
    clusters = cluster(latents, method=method, n_clusters=n_clusters, seed=seed)
    return embedding, clusters
