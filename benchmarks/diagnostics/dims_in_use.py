"""Invariance of checkpoints trained before the trainer measured the latent dimensions in use.

    python benchmarks/diagnostics/dims_in_use.py --train train/OutputImages --test test/OutputImages RUN/ ...

Since the trainer records each fused dimension's variance during the last epoch
(``MEVAE.latent_variance``), encodings set the unused ones (variance < 0.01) to 0.  Older
checkpoints lack that record.  This script measures it after training, the same way: the
variance of the fused means over the training cells, each encoder seeing the cell under its own
freshly drawn nuisance as in training (one view for one-encoder models), then prints the
invariance report on the test cells.  Checkpoints that carry the trainer's record keep it.
Two more columns probe the orientation of the cell's axis (``axis_leakage``, same and paired):
the "Axis orientation" note of docs/benchmarks.md.  Used for the "Repeated runs" table there.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

KEYS = (
    "model_active_dims",
    "rotation_leakage",
    "paired_rotation_leakage",
    "polarity_leakage",
    "paired_polarity_leakage",
    "paired_rotation_leakage_all_dims",
    "paired_polarity_leakage_all_dims",
    "content_kept",
    "paired_content_kept",
    "neighbour_content_kept",
    "paired_neighbour_content_kept",
)
AXIS_KEYS = ("axis_leakage", "paired_axis_leakage")


def measured_model(run: str, train: np.ndarray, seed: int = 0):  # -> MEVAE
    """The checkpoint's model, in eval mode, with the latent dimensions in use known: the
    trainer's own record, or for older checkpoints measured here on the ``train`` crops."""
    from napari_mevae.analysis import encode
    from napari_mevae.checkpoints import load_checkpoint
    from napari_mevae.evaluation import encoder_nuisances, paired_inputs

    model = load_checkpoint(run).build_model("cpu").eval()
    if not model.activity_measured:  # trained before the trainer kept its own record
        views = train
        if model.config.n_encoders > 1:
            nuisances = encoder_nuisances(model) or ["rotation"] * model.config.n_encoders
            views = paired_inputs(train, nuisances, np.random.default_rng(seed + 1))[0]
        z = encode(model, views, inactive_to_zero=False)
        model.latent_variance.copy_(torch.from_numpy(z.var(0)))
    return model


def report_features(model, crops: np.ndarray, seed: int = 0) -> dict[str, tuple]:
    """The features ``invariance_report`` reads for its rotation and polarity probes, with its
    draws (same seed, same order), as ``(features, truth)``: ``rotation`` / ``polarity`` with
    every encoder seeing the same transformed cell, ``paired_rotation`` / ``paired_polarity``
    with each encoder seeing its own nuisance (for a one-encoder model the same two; absent
    when no encoder was trained on that nuisance or the encoders' nuisances are unknown)."""
    from napari_mevae.analysis import encode
    from napari_mevae.evaluation import encoder_nuisances, paired_inputs
    from napari_mevae.nuisances import draw_and_apply

    crops = np.asarray(crops, dtype=np.float32)
    rng = np.random.default_rng(seed)
    rotated, angles = draw_and_apply(crops, "rotation", rng)
    flipped, flips = draw_and_apply(crops, "polarity", rng)
    draw_and_apply(rotated, "polarity", rng)  # the report's third draw: keeps the stream aligned
    out = {
        "rotation": (encode(model, rotated), angles),
        "polarity": (encode(model, flipped), flips),
    }
    nuisances = encoder_nuisances(model)
    if model.config.n_encoders == 1:
        out["paired_rotation"], out["paired_polarity"] = out["rotation"], out["polarity"]
    elif nuisances is not None:
        inputs, p_angles, p_flips = paired_inputs(crops, nuisances, rng)
        z = encode(model, inputs)
        if p_angles is not None:
            out["paired_rotation"] = (z, p_angles)
        if p_flips is not None:
            out["paired_polarity"] = (z, p_flips)
    return out


def axis_leakage(model, crops: np.ndarray, seed: int = 0) -> dict[str, float]:
    """The report's rotation probe on (cos 2a, sin 2a) (``angle_leakage(..., harmonic=2)``) with
    its draws: how much of the orientation of the cell's axis, an angle modulo 180 degrees
    that the probe of the angle itself can miss, the features hold.  ``axis_leakage`` with
    every encoder seeing the same rotated cell, ``paired_axis_leakage`` with each encoder
    seeing its own nuisance (absent when no encoder was trained on rotation)."""
    from napari_mevae.evaluation import angle_leakage

    feats = report_features(model, crops, seed)
    return {
        f"{prefix}axis_leakage": angle_leakage(*feats[f"{prefix}rotation"], seed=seed, harmonic=2)
        for prefix in ("", "paired_")
        if f"{prefix}rotation" in feats
    }


def parse_runs(description: str) -> tuple[argparse.Namespace, np.ndarray, np.ndarray]:
    """The command line both diagnosis scripts share: runs, ``--train`` / ``--test`` crop
    folders, ``--size``, ``--seed``; returns the arguments and the two sets of crops."""
    from napari_mevae.folders import FolderTargets

    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("runs", nargs="+", help="checkpoints or training save_dirs")
    p.add_argument("--train", required=True, help="folder of canonical training crops")
    p.add_argument("--test", required=True, help="folder of canonical test crops")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    train = np.asarray(FolderTargets(a.train, a.size, 1).array)
    test = np.asarray(FolderTargets(a.test, a.size, 1).array)
    return a, train, test


def main() -> None:
    from napari_mevae.evaluation import invariance_report

    a, train, test = parse_runs(__doc__)
    keys = (*KEYS, *AXIS_KEYS)
    print("| run | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for run in a.runs:
        model = measured_model(run, train, a.seed)
        rep = invariance_report(model, test, seed=a.seed)
        rep.update(axis_leakage(model, test, a.seed))
        print(f"| {run} | " + " | ".join(f"{rep.get(k, float('nan')):.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
