"""Where does a multi-encoder model's polarity leakage live?  Diagnosis for docs/benchmarks.md.

    python benchmarks/diagnostics/leakage_dims.py --checkpoint RUN/ --targets test/OutputImages --size 32

Paired protocol (each encoder sees the cell under its own nuisance, ``evaluation.paired_inputs``):
prints the std of every fused latent dimension, the polarity leakage read from each encoder's
mean alone, from the fused latent's top-k dimensions by variance, and from a logistic probe on
the raw (unstandardised) latents.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--targets", required=True, help="folder of canonical test crops")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from napari_mevae.checkpoints import load_checkpoint
    from napari_mevae.evaluation import discrete_leakage, encoder_nuisances, paired_inputs
    from napari_mevae.folders import FolderTargets

    model = load_checkpoint(a.checkpoint).build_model().eval()
    crops = FolderTargets(a.targets, a.size, model.config.channels).array
    names = encoder_nuisances(model)
    if names is None or "polarity" not in names:
        raise SystemExit("the model has no polarity encoder")
    x, _, flips = paired_inputs(crops, names, np.random.default_rng(a.seed))
    with torch.no_grad():
        means, _ = model.encode_all(torch.from_numpy(x))
    per_encoder = [m.numpy() for m in means]
    fused = np.prod(per_encoder, axis=0)
    std = fused.std(0)
    order = np.argsort(std)[::-1]
    print("fused latent std per dimension (sorted):", np.array2string(std[order], precision=4))
    for name, z in zip(names, per_encoder, strict=True):
        print(f"polarity leakage from the {name} encoder's mean: {discrete_leakage(z, flips):.3f}")
    for k in (4, 8, 16, fused.shape[1]):
        leak = discrete_leakage(fused[:, order[:k]], flips)
        print(f"polarity leakage from the fused top {k} dimensions: {leak:.3f}")
    cv = StratifiedKFold(5, shuffle=True, random_state=a.seed)
    pred = cross_val_predict(LogisticRegression(max_iter=5000), fused, flips, cv=cv)
    print(
        f"raw-latent logistic probe: balanced accuracy {balanced_accuracy_score(flips, pred):.3f}"
        f" (chance {1 / len(np.unique(flips)):.3f})"
    )


if __name__ == "__main__":
    main()
