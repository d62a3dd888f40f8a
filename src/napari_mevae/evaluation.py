"""How invariant a model is: probes of the rotation and polarity left in the features, how much
of the cell they keep, and agreement with known classes (``mevae evaluate``, the demo's
report.json, the benchmarks).  Every key of :func:`invariance_report` is explained there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .analysis import cluster, encode, reconstruct
from .config import REFERENCE_NUISANCES

if TYPE_CHECKING:
    from .model import MEVAE

__all__ = [
    "angle_leakage",
    "cell_descriptors",
    "cluster_agreement",
    "content_kept",
    "discrete_leakage",
    "encoder_nuisances",
    "feature_directions",
    "invariance_report",
    "neighbour_content_kept",
    "paired_inputs",
    "pixel_correlation",
]


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


def feature_directions(latents: np.ndarray, threshold: float | None = None) -> int:
    """Independent directions the features vary in: principal directions of ``latents``
    across cells with variance >= ``threshold`` (default the active-units threshold,
    :data:`~napari_mevae.config.ACTIVE_VARIANCE`).  "Dimensions in use" counts axes, and
    several axes can carry one signal between them (seen at 48-64 px: 7-8 axes, 1-2
    directions)."""
    from .config import ACTIVE_VARIANCE

    z = np.asarray(latents, dtype=np.float64)
    if len(z) < 2:
        return 0
    var = np.linalg.svd(z - z.mean(0), compute_uv=False) ** 2 / (len(z) - 1)
    return int((var >= (ACTIVE_VARIANCE if threshold is None else threshold)).sum())


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


#: the :func:`cell_descriptors` of each channel, in order: the names of the report's
#: ``content_kept_<name>`` keys
DESCRIPTORS = ("mean_intensity", "area", "radius_of_gyration", "elongation", "intensity_spread")


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


def content_kept_by_descriptor(
    latents: np.ndarray, crops: np.ndarray, folds: int = 5, seed: int = 0
) -> dict[str, float]:
    """:func:`content_kept` per descriptor (:data:`DESCRIPTORS`, each averaged over the
    channels, clipped to 0..1): which part of the cell a model leaves out.  On LINCS the
    ME-VAE's shortfall against the VAE is all in one of them, the elongation."""
    r2 = _descriptor_r2s(_linear_probe(), latents, crops, folds, seed)
    per = r2.reshape(-1, len(DESCRIPTORS)).mean(0)  # (channels, descriptors) -> descriptors
    return {name: float(np.clip(v, 0.0, 1.0)) for name, v in zip(DESCRIPTORS, per, strict=True)}


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


ROTATION_LIKE = ("rotation", "pose")


def encoder_nuisances(model: MEVAE) -> list[str] | None:
    """The nuisance each encoder was trained to remove: from the config (``--targets``
    training), else the reference's convention for two encoders (InputImages1 = rotation,
    InputImages2 = polarity); ``None`` when unknown."""
    cfg = model.config
    if cfg.nuisances and len(cfg.nuisances) == cfg.n_encoders:
        return list(cfg.nuisances)
    if cfg.n_encoders == 2:
        return list(REFERENCE_NUISANCES)
    return None


def paired_inputs(
    crops: np.ndarray, nuisances: list[str], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Encoder inputs ``(N, K, C, S, S)`` as in training: encoder k sees the cell under its own
    nuisance, freshly drawn.  Rotation-like encoders share one uniform angle per cell, polarity
    encoders one flip; returns the inputs, the angles and the flips (``None`` if no encoder
    has that nuisance)."""
    from .nuisances import draw_and_apply

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
    """How much rotation and polarity the features of canonical ``crops`` still hold and how
    much of the cell they keep: the report ``mevae evaluate`` writes, and the demo's
    report.json.  This docstring is where its keys are explained.

    Each cell gets a freshly drawn uniform random angle and, separately, a random flip
    (identity, left-right, up-down, 180 degrees): one nuisance at a time, so each score has the
    full 0..1 range (under a uniform rotation a 180-degree flip would be just another rotation).
    Every probe reads the features as exported, the dimensions the model does not use being 0
    and the others kept to the directions in use (:meth:`MEVAE.encode`), except the
    ``*_all_dims`` keys.  Two protocols:

    - same (keys without ``paired_``): every encoder sees the same transformed cell, as when
      one image of a cell is analysed;
    - paired (``paired_*``): each encoder sees the cell under its own freshly drawn nuisance,
      as in training and in the paper (:func:`paired_inputs`; the nuisances the model was
      trained with, or rotation and polarity for two encoders trained on pair folders:
      :func:`encoder_nuisances`).  For a one-encoder model they equal the same-protocol keys.
      A model whose encoders' nuisances are unknown (more than two encoders trained on pair
      folders) has no ``paired_*`` keys, and a paired leakage key (with its ``*_all_dims``) is
      there only if an encoder was trained on that nuisance (rotation or pose for rotation).

    Keys (floats; leakage and content 0..1):

    - ``rotation_leakage``, ``paired_rotation_leakage``: cross-validated R^2 of (cos, sin) of
      the angle from the rotated cells' features (:func:`angle_leakage`); 0 = no rotation left.
    - ``polarity_leakage``, ``paired_polarity_leakage``: cross-validated balanced accuracy of
      the flip from the flipped cells' features, above chance (:func:`discrete_leakage`);
      0 = chance.
    - ``content_kept``, ``paired_content_kept``: cross-validated R^2 of pose-invariant
      descriptors of the canonical cells (:func:`cell_descriptors`) from the rotated cells'
      features, by a linear probe that standardises every dimension (:func:`content_kept`).
    - ``content_kept_mean_intensity``, ``content_kept_area``,
      ``content_kept_radius_of_gyration``, ``content_kept_elongation``,
      ``content_kept_intensity_spread``: ``content_kept`` per descriptor (same protocol; each
      averaged over the channels, 0..1; :func:`content_kept_by_descriptor`): which part of the
      cell is missing when ``content_kept`` is low.
    - ``neighbour_content_kept``, ``paired_neighbour_content_kept``: the same descriptors
      predicted from each cell's 10 nearest cells in feature space, features as exported
      (:func:`neighbour_content_kept`): whether the cells UMAP, clustering and distances put
      together are alike.
    - ``reconstruction_corr``: pixel correlation (:func:`pixel_correlation`) of the model's
      output from the rotated and flipped cell with the canonical cell; 1 for a model that
      fully corrects the pose.
    - ``model_active_dims``: latent dimensions the model uses (:attr:`MEVAE.n_active`,
      measured by the trainer over the training cells; all of them for a model without that
      record; 0 while none is in use, and then the features keep every dimension).
    - ``feature_directions``: independent directions the features of these (rotated) cells
      vary in by at least the active-units threshold (:func:`feature_directions`): at most
      ``model_active_dims``, fewer when axes in use carry the same signal.
    - ``paired_rotation_leakage_all_dims``, ``paired_polarity_leakage_all_dims``: the paired
      leakage probes on the raw product of the encoder means, unused dimensions included.
    - ``n_cells``: the number of cells measured.
    - ``nmi``, ``purity`` (only when ``classes`` are given): of k-means with k = the number of
      classes on the features of the rotated and flipped cells, against ``classes``
      (:func:`cluster_agreement`).
    """
    import torch

    from .nuisances import draw_and_apply

    crops = np.asarray(crops, dtype=np.float32)
    rng = np.random.default_rng(seed)
    rotated, angles = draw_and_apply(crops, "rotation", rng)
    flipped, flips = draw_and_apply(crops, "polarity", rng)
    both, _ = draw_and_apply(rotated, "polarity", rng)

    def raw_and_features(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # one encoding gives both the raw product and the features as exported
        raw = encode(model, x, batch_size=batch_size, inactive_to_zero=False)
        with torch.no_grad():
            used = model.used_part(torch.from_numpy(raw).to(model.latent_variance.device))
        return raw, used.cpu().numpy()

    raw_rot, z_rot = raw_and_features(rotated)
    raw_flip, z_flip = raw_and_features(flipped)
    report = {
        "rotation_leakage": angle_leakage(z_rot, angles, seed=seed),
        "polarity_leakage": discrete_leakage(z_flip, flips, seed=seed),
        "content_kept": content_kept(z_rot, crops, seed=seed),
        **{
            f"content_kept_{name}": value
            for name, value in content_kept_by_descriptor(z_rot, crops, seed=seed).items()
        },
        "neighbour_content_kept": neighbour_content_kept(z_rot, crops, seed=seed),
        "reconstruction_corr": pixel_correlation(reconstruct(model, both, batch_size), crops),
        "n_cells": float(len(crops)),
        "model_active_dims": float(model.n_active),
        "feature_directions": float(feature_directions(z_rot)),
    }
    nuisances = encoder_nuisances(model)
    if model.config.n_encoders == 1:
        report["paired_rotation_leakage"] = report["rotation_leakage"]
        report["paired_polarity_leakage"] = report["polarity_leakage"]
        report["paired_content_kept"] = report["content_kept"]
        report["paired_neighbour_content_kept"] = report["neighbour_content_kept"]
        raw = {"rotation": (raw_rot, angles), "polarity": (raw_flip, flips)}
    elif nuisances is not None:
        inputs, p_angles, p_flips = paired_inputs(crops, nuisances, rng)
        raw_pair, z_pair = raw_and_features(inputs)
        if p_angles is not None:
            report["paired_rotation_leakage"] = angle_leakage(z_pair, p_angles, seed=seed)
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
