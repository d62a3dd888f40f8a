"""How much of the linear probe's verdict is the product's heavy tails?  Diagnosis for
docs/benchmarks.md ("Content kept").

    python benchmarks/diagnostics/feature_scale.py --train train/OutputImages --test test/OutputImages RUN/ ...

A multi-encoder model's features are the product of K encoder means, so each dimension is
distributed like a product of K roughly normal numbers: heavy-tailed, a few cells far out.
A linear probe that standardises every dimension is then fitted mostly to those few cells.
For each run this prints, in the paired protocol and with the same draws as
``evaluation.invariance_report``:

- the dimensions in use and the largest |skewness| among them;
- content kept (linear probe and by neighbours), rotation and polarity leakage, each read
  from the features as exported and from their signed K-th root ``sign(z) |z|^(1/K)``
  (a monotone map per dimension: the same information, on the scale of one encoder's mean);
- the linear probe's R^2 per cell descriptor, for both.

One-encoder models (VAE, beta-VAE) are their own root; for them both columns agree.
"""

from __future__ import annotations

import numpy as np

# this folder is on sys.path when run as a script
from dims_in_use import measured_model, parse_runs, report_features

PAIRED = ("content", "neighbours", "rotation", "polarity")
DESCRIPTORS = ("intensity", "area", "radius", "elongation", "spread")


def signed_root(z: np.ndarray, k: int) -> np.ndarray:
    """``sign(z) |z|^(1/k)``: the geometric mean of k factors whose product is ``z``."""
    return np.sign(z) * np.abs(z) ** (1.0 / k)


def paired_features(model, crops: np.ndarray, seed: int = 0):  # -> (z, angles, z_flip, flips)
    """The features ``invariance_report`` reads for its ``paired_*`` keys, with its draws
    (:func:`dims_in_use.report_features`): for the rotation probe and content (``z``) and for
    the polarity probe (``z_flip``).  A one-encoder model has nothing to pair; the report reads
    its rotated and its flipped cells."""
    feats = report_features(model, crops, seed)
    (z, angles), (z_flip, flips) = feats["paired_rotation"], feats["paired_polarity"]
    return z, angles, z_flip, flips


def per_descriptor_r2(z: np.ndarray, crops: np.ndarray, seed: int = 0) -> np.ndarray:
    """``content_kept``'s probe, one cross-validated R^2 (0..1) per descriptor."""
    from napari_mevae.evaluation import _descriptor_r2s, _linear_probe

    return np.clip(_descriptor_r2s(_linear_probe(), z, crops, 5, seed), 0, 1)


def measure(model, crops: np.ndarray, seed: int = 0) -> dict[str, object]:
    from napari_mevae.evaluation import (
        angle_leakage,
        content_kept,
        discrete_leakage,
        neighbour_content_kept,
    )

    z, angles, z_flip, flips = paired_features(model, crops, seed)
    used = np.abs(z).sum(0) > 0
    zu = z[:, used]
    skew = ((zu - zu.mean(0)) ** 3).mean(0) / np.maximum(zu.std(0), 1e-12) ** 3
    out: dict[str, object] = {
        "K": model.config.n_encoders,
        "dims": int(used.sum()),
        "max_abs_skew": float(np.abs(skew).max()) if used.any() else 0.0,
    }
    k = model.config.n_encoders
    for name, f, f_flip in (
        ("features", z, z_flip),
        ("root", signed_root(z, k), signed_root(z_flip, k)),
    ):
        out[f"content_{name}"] = content_kept(f, crops, seed=seed)
        out[f"neighbours_{name}"] = neighbour_content_kept(f, crops, seed=seed)
        out[f"rotation_{name}"] = angle_leakage(f, angles, seed=seed)
        out[f"polarity_{name}"] = discrete_leakage(f_flip, flips, seed=seed)
        out[f"per_descriptor_{name}"] = per_descriptor_r2(f, crops, seed).tolist()
    return out


def main() -> None:
    a, train, test = parse_runs(__doc__)
    print(
        "| run | K | dims in use | max abs skewness | content kept: features / root "
        "| by neighbours: features / root | rotation leakage: features / root "
        "| polarity leakage: features / root | per descriptor, linear ("
        + ", ".join(DESCRIPTORS)
        + "): features / root |"
    )
    print("|---" * 9 + "|")
    for run in a.runs:
        r = measure(measured_model(run, train, a.seed), test, a.seed)
        pair = {k: f"{r[k + '_features']:.2f} / {r[k + '_root']:.2f}" for k in PAIRED}
        per = " / ".join(
            " ".join(f"{v:.2f}" for v in r[f"per_descriptor_{n}"]) for n in ("features", "root")
        )
        print(
            f"| {run} | {r['K']} | {r['dims']} | {r['max_abs_skew']:.1f} | {pair['content']} "
            f"| {pair['neighbours']} | {pair['rotation']} | {pair['polarity']} | {per} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
