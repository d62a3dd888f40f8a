"""Features of a whole screen: a trained model + a STORE -> one table, one row per labelled cell
(the cell table's columns, ``z0..``, ``UMAP0``/``UMAP1``, ``cluster``), as Parquet or CSV.

Memory stays bounded whatever the screen: crops are read and encoded chunk by chunk
(:func:`napari_mevae.analysis.iter_encode_chunks`), only the latents (N x L float32) are held,
and the table is written in row groups.  UMAP and clustering scale by fitting on a subsample:

- UMAP (:func:`napari_mevae.analysis.run_umap`) is fitted on ``fit_max`` random cells; every
  other cell is placed at the distance-weighted mean of the embeddings of its
  ``n_neighbors`` nearest fitted cells in latent space (UMAP's own starting point for
  ``transform``, without its refinement epochs, which cost ~0.3 ms a cell).
- k-means and HDBSCAN (:func:`napari_mevae.analysis.cluster`) are fitted on ``fit_max`` random
  cells; the others take the cluster of the nearest k-means centre, or of their nearest fitted
  cell for HDBSCAN (noise included); a Gaussian mixture is fitted on the subsample and predicts
  the rest.

Under torchrun each rank encodes a contiguous share of the cells (a whole number of batches,
so every cell is encoded in the same batch as in one process); rank 0 gathers the latents in
cell order and does the rest.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import InputError

__all__ = ["FIT_MAX", "place_rest", "screen_features", "scaled_cluster", "scaled_umap"]

#: above this many cells, UMAP and clustering are fitted on a random subsample of this size
FIT_MAX = 20_000
_ROWS_PER_GROUP = 65_536


def _active(z: np.ndarray) -> np.ndarray:
    """The latent columns that vary (the model's unused dimensions are all 0)."""
    cols = np.flatnonzero(z.std(axis=0) > 0)
    return z[:, cols] if len(cols) else z


def _sample(n: int, fit_max: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    fit = np.sort(np.random.default_rng(seed).choice(n, fit_max, replace=False))
    rest = np.setdiff1d(np.arange(n), fit)
    return fit, rest


def _neighbours(fitted: np.ndarray, query: np.ndarray, k: int, chunk: int = 65_536):
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k).fit(fitted)
    for a in range(0, len(query), chunk):
        dist, ind = nn.kneighbors(query[a : a + chunk])
        yield a, dist, ind


def place_rest(
    fitted: np.ndarray, embedding: np.ndarray, query: np.ndarray, k: int = 15
) -> np.ndarray:
    """Each ``query`` point at the distance-weighted mean of the ``embedding`` of its ``k``
    nearest ``fitted`` points (in chunks: memory stays small)."""
    out = np.empty((len(query), embedding.shape[1]), np.float32)
    k = min(k, len(fitted))
    for a, dist, ind in _neighbours(fitted, query, k):
        w = 1.0 / (dist + 1e-6)
        w /= w.sum(axis=1, keepdims=True)
        out[a : a + len(ind)] = np.einsum("nk,nkd->nd", w, embedding[ind])
    return out


def scaled_umap(z: np.ndarray, seed: int = 0, fit_max: int = FIT_MAX) -> np.ndarray:
    """2-D UMAP of every cell, fitted on at most ``fit_max`` of them (see module doc)."""
    from .analysis import run_umap

    x = _active(np.asarray(z, np.float32))
    if len(x) <= fit_max:
        return run_umap(x, seed=seed, fit_max=fit_max)
    fit, rest = _sample(len(x), fit_max, seed)
    out = np.empty((len(x), 2), np.float32)
    out[fit] = run_umap(x[fit], seed=seed, fit_max=fit_max)
    out[rest] = place_rest(x[fit], out[fit], x[rest])
    return out


def scaled_cluster(
    z: np.ndarray, method: str, n_clusters: int, seed: int = 0, fit_max: int = FIT_MAX
) -> np.ndarray:
    """Cluster ids 1..k of every cell (0 = HDBSCAN noise), fitted on at most ``fit_max``."""
    from .analysis import CLUSTER_METHODS, cluster

    if method not in CLUSTER_METHODS:
        raise InputError(f"--method must be one of {', '.join(CLUSTER_METHODS)}, got {method!r}")
    x = _active(np.asarray(z, np.float32))
    if len(x) <= fit_max:
        return cluster(x, method, n_clusters, seed=seed)
    fit, rest = _sample(len(x), fit_max, seed)
    out = np.empty(len(x), np.int32)
    if method == "gmm":
        from sklearn.mixture import GaussianMixture

        gmm = GaussianMixture(
            n_components=n_clusters, random_state=seed, covariance_type="diag", reg_covar=1e-4
        ).fit(x[fit])
        for a in range(0, len(x), 262_144):
            out[a : a + 262_144] = gmm.predict(x[a : a + 262_144]) + 1
        return out
    out[fit] = cluster(x[fit], method, n_clusters, seed=seed)
    if method == "kmeans":  # the nearest centre, by ||x||^2 - 2 x.c + ||c||^2
        ids = np.unique(out[fit])
        centres = np.stack([x[fit][out[fit] == i].mean(0) for i in ids])
        norms = (centres**2).sum(1)
        for a in range(0, len(rest), 65_536):
            chunk = rest[a : a + 65_536]
            out[chunk] = ids[(norms - 2 * x[chunk] @ centres.T).argmin(1)]
    else:  # hdbscan: the cluster of the nearest fitted cell
        for a, _, ind in _neighbours(x[fit], x[rest], 1):
            out[rest[a : a + len(ind)]] = out[fit][ind[:, 0]]
    return out


def _write_table(table: pd.DataFrame, z: np.ndarray, extra: dict[str, Any], out: Path) -> Path:
    """The cell table, the latents ``z`` (row ``i`` = ``crop_index`` ``i``; NaN for skipped
    cells) and the ``extra`` per-row columns, written row group by row group (Parquet) or
    block by block (CSV), complete or not at all."""
    from .outputs import OutputSet

    parquet = out.suffix.lower() == ".parquet"
    names = [f"z{d}" for d in range(z.shape[1])]
    rows = table["crop_index"].to_numpy()
    with OutputSet() as files, files.writing(out) as tmp:
        writer = None
        try:
            for a in range(0, max(len(table), 1), _ROWS_PER_GROUP):
                b = a + _ROWS_PER_GROUP
                part = table.iloc[a:b].reset_index(drop=True)
                block = np.full((len(part), z.shape[1]), np.nan, np.float32)
                here = rows[a:b]
                block[here >= 0] = z[here[here >= 0]]  # rows gathered, not columns
                cols = pd.DataFrame(block, columns=names)
                for k, v in extra.items():
                    cols[k] = v[a:b]
                part = pd.concat([part, cols], axis=1)
                if parquet:
                    import pyarrow as pa
                    import pyarrow.parquet as pq

                    arrow = pa.Table.from_pandas(part, preserve_index=False)
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, arrow.schema)
                    writer.write_table(arrow)
                else:
                    part.to_csv(tmp, mode="w" if a == 0 else "a", header=a == 0, index=False)
        finally:
            if writer is not None:
                writer.close()
    return out


def screen_features(
    checkpoint: str | os.PathLike,
    store: str | os.PathLike,
    out: str | os.PathLike,
    *,
    umap: bool = False,
    n_clusters: int | None = None,
    method: str = "kmeans",
    batch_size: int = 512,
    seed: int = 0,
    fit_max: int = FIT_MAX,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Encode every kept cell of ``store`` with ``checkpoint`` (a run folder, ``.pt`` or
    Model Zoo ``.zip``), optionally UMAP and cluster, and write ``out`` (``.parquet`` or
    ``.csv``).  ``progress(stage, done, total)``.  Returns the timings per stage (rank 0)."""
    import time

    from .analysis import encode
    from .checkpoints import load_checkpoint
    from .outputs import output_target
    from .screen_store import ScreenStore, StoreCrops
    from .screens import _Dist

    out = Path(out)
    if out.suffix.lower() not in (".parquet", ".csv"):
        raise InputError(f"--out {out}: the table is .parquet or .csv (by its extension)")
    output_target(out)
    if n_clusters is not None and n_clusters < 1:
        raise InputError(f"--clusters must be >= 1, got {n_clusters}")
    screen = ScreenStore(store)
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.config
    want = (cfg.channels, cfg.image_size, cfg.image_size)
    if screen.crop_shape != want:
        raise InputError(
            f"{store} holds crops of shape {screen.crop_shape} (C, S, S); the model wants {want}"
        )
    model = ckpt.build_model("cpu")
    dist = _Dist()
    times: dict[str, float] = {}
    try:
        n = len(screen)
        per = -(-n // (dist.world * batch_size)) * batch_size  # whole batches per rank
        a, b = min(n, dist.rank * per), min(n, (dist.rank + 1) * per)
        t = time.perf_counter()
        share = StoreCrops(screen.path / "crops.zarr", a, b)
        say = None
        if progress is not None:
            say = lambda d, tot: progress("encode", d, tot)  # noqa: E731
            say(0, len(share))  # the start: a rate (cells/s) counts from here
        z = encode(model, share, batch_size, progress=say)
        parts = out.parent / f".{out.name}.{dist.run_id}.parts"
        if dist.world > 1:
            parts.mkdir(parents=True, exist_ok=True)
            np.save(parts / f"z{dist.rank}.npy", z)
            dist.barrier()
            if dist.rank == 0:
                z = np.concatenate([np.load(parts / f"z{r}.npy") for r in range(dist.world)])
        times["encode"] = time.perf_counter() - t
        times["encode_peak_mb"] = _peak_mb()
        if dist.rank == 0:
            _analyse_and_write(screen, z, out, umap, n_clusters, method, seed, fit_max, times)
        dist.barrier()
    finally:
        if dist.world > 1 and dist.rank == 0:
            import shutil

            shutil.rmtree(out.parent / f".{out.name}.{dist.run_id}.parts", ignore_errors=True)
        dist.close()
    return times


def _peak_mb() -> float:
    """This process's peak resident memory so far (MB; 0 where unknown)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except (ImportError, OSError):  # pragma: no cover
        return 0.0


def _analyse_and_write(screen, z, out, umap, n_clusters, method, seed, fit_max, times) -> None:
    import time

    extra: dict[str, Any] = {}
    table = screen.table
    rows = table["crop_index"].to_numpy()
    kept = rows >= 0

    def spread(values: np.ndarray, dtype=np.float32) -> np.ndarray:
        """Per-cell values of the kept cells -> one per table row, NaN for skipped cells."""
        col = np.full(len(table), np.nan, dtype)
        col[kept] = values[rows[kept]]
        return col

    if umap and len(z):
        t = time.perf_counter()
        emb = scaled_umap(z, seed=seed, fit_max=fit_max)
        times["umap"] = time.perf_counter() - t
        times["umap_peak_mb"] = _peak_mb()
        extra["UMAP0"], extra["UMAP1"] = spread(emb[:, 0]), spread(emb[:, 1])
    if n_clusters is not None and len(z):
        t = time.perf_counter()
        ids = scaled_cluster(z, method, n_clusters, seed=seed, fit_max=fit_max)
        times["cluster"] = time.perf_counter() - t
        times["cluster_peak_mb"] = _peak_mb()
        extra["cluster"] = pd.array(spread(ids, float), dtype="Int64")  # missing when skipped
    t = time.perf_counter()
    _write_table(table, z, extra, out)
    times["write"] = time.perf_counter() - t
    times["write_peak_mb"] = _peak_mb()
