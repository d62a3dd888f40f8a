"""How many directions of the latent space does a model really use, and where is its leakage?

    python benchmarks/diagnostics/latent_directions.py --checkpoint RUN/ \
        --train train/OutputImages --test test/OutputImages [--classes classes.csv]

"Dimensions in use" counts latent axes whose fused mean varies across the training cells by
more than ``ACTIVE_VARIANCE`` (0.01).  Axes can be in use and still carry one signal between
them: this script takes the principal directions of the exported features over the training
cells, prints their variances, then measures the invariance report's probes (same protocol:
every encoder sees the same rotated / flipped held-out cell) on the features projected onto
the directions whose variance exceeds a threshold.  Threshold 0 keeps every direction: the
features as exported.
"""

from __future__ import annotations

import argparse

import numpy as np

THRESHOLDS = (0.0, 1e-4, 1e-3, 1e-2)


def directions(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, principal directions (rows) and their variances of features ``z`` (N, L)."""
    z = np.asarray(z, dtype=np.float64)
    mean = z.mean(0)
    _, s, vt = np.linalg.svd(z - mean, full_matrices=False)
    return mean, vt, s**2 / max(len(z) - 1, 1)


def project(z: np.ndarray, mean: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """``z`` with everything outside the span of ``basis`` (rows) removed, in the same axes."""
    return mean + (np.asarray(z, dtype=np.float64) - mean) @ basis.T @ basis


def measure(
    model, train: np.ndarray, test: np.ndarray, classes=None, thresholds=THRESHOLDS, seed=0
) -> tuple[np.ndarray, list[dict[str, float]]]:
    """The direction variances over ``train`` and, per threshold, the probes on ``test``."""
    from napari_mevae.analysis import encode
    from napari_mevae.evaluation import (
        angle_leakage,
        cluster_agreement,
        content_kept,
        discrete_leakage,
    )
    from napari_mevae.nuisances import draw_and_apply

    mean, vt, var = directions(encode(model, train))
    rng = np.random.default_rng(seed)  # the invariance report's draws
    rotated, angles = draw_and_apply(test, "rotation", rng)
    flipped, flips = draw_and_apply(test, "polarity", rng)
    both, _ = draw_and_apply(rotated, "polarity", rng)
    z_rot, z_flip, z_both = (encode(model, x) for x in (rotated, flipped, both))
    rows = []
    for thr in thresholds:
        basis = vt[var > thr] if thr > 0 else vt
        row = {
            "threshold": thr,
            "directions": float(len(basis)),
            "rotation_leakage": angle_leakage(project(z_rot, mean, basis), angles, seed=seed),
            "polarity_leakage": discrete_leakage(project(z_flip, mean, basis), flips, seed=seed),
            "content_kept": content_kept(project(z_rot, mean, basis), test, seed=seed),
        }
        if classes is not None:
            z = project(z_both, mean, basis)
            row["nmi"] = cluster_agreement(z, classes, seed=seed)["nmi"]
        rows.append(row)
    return var, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--train", required=True, help="folder of the canonical training crops")
    p.add_argument("--test", required=True, help="folder of canonical held-out crops")
    p.add_argument("--classes", default=None, help="CSV with filename,class for --test")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    import pandas as pd

    from napari_mevae.checkpoints import load_checkpoint
    from napari_mevae.folders import FolderTargets

    model = load_checkpoint(a.checkpoint).build_model().eval()
    size, channels = model.config.image_size, model.config.channels
    train = FolderTargets(a.train, size, channels)
    test = FolderTargets(a.test, size, channels)
    classes = None
    if a.classes:
        table = pd.read_csv(a.classes).set_index("filename")["class"]
        classes = np.asarray([table[p.name] for p in test.paths])
    var, rows = measure(model, train.array, test.array, classes, seed=a.seed)
    print(f"dimensions in use (axes): {model.n_active}")
    print("variances of the first directions: " + " ".join(f"{v:.2g}" for v in var[:10]))
    keys = [k for k in rows[0] if k != "threshold"]
    print("| variance threshold | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for r in rows:
        print(f"| {r['threshold']:g} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
