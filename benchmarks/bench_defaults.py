"""What `mevae` gives with default settings on synthetic phenotype cells, as a user runs it:
`mevae pairs` -> `mevae train --targets ... --nuisances rotation,polarity` -> `mevae evaluate`
on held-out cells, at several crop sizes and seeds.

    python benchmarks/bench_defaults.py --write-doc docs/benchmarks.md   # 32, 48, 64 px x 3 seeds
    python benchmarks/bench_defaults.py --sizes 32 --seeds 0 --no-write

Each run: a synthetic field of 600 cells (`make_synthetic_cells`, 3 phenotype classes, one
channel) to train on and another of 300 (another seed) to measure on, both cropped by `mevae
pairs --size S --scale fit`; `mevae train` with no training flag but the image size (the default
budget, KL weight and early stopping); `mevae evaluate --classes` on the held-out crops. Every
command is a process of its own; the training time is the `mevae train` command's wall clock.
Leakage is the invariance report's: *same* = both encoders see the same rotated (flipped) cell,
*paired* = each its own nuisance, as in training.  NMI: k-means (k = 3) on the features of the
held-out cells, rotated and flipped, against their true classes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

TRAIN_CELLS, TEST_CELLS = 600, 300
KEYS = (
    "model_active_dims",
    "feature_directions",
    "rotation_leakage",
    "paired_rotation_leakage",
    "polarity_leakage",
    "paired_polarity_leakage",
    "content_kept",
    "nmi",
)


def mevae(log: Path, *args: object) -> float:
    """``mevae ARGS`` in a process of its own (fig2's runner: output to ``log``, one line on a
    failure); its wall-clock seconds."""
    from fig2 import run_cli

    return run_cli([str(a) for a in args], log)[0]


def field(folder: Path, n: int, seed: int, size: int) -> dict[str, int]:
    """A synthetic field as TIFFs, cropped by `mevae pairs`; returns label -> class."""
    import tifffile

    from napari_mevae.synthetic import make_synthetic_cells

    side = int(1400 * (n / 600) ** 0.5)  # ~600 cells of radius 12 fit in 1400 x 1400
    syn = make_synthetic_cells(n_cells=n, shape=(side, side), channels=1, seed=seed)
    folder.mkdir(parents=True)
    tifffile.imwrite(folder / "image.tif", syn.image[0])
    tifffile.imwrite(folder / "labels.tif", syn.labels)
    mevae(folder / "pairs.log", "pairs", "--image", folder / "image.tif",
          "--labels", folder / "labels.tif", "--out", folder / "pairs", "--size", size,
          "--scale", "fit", "--seed", seed, "--verbose", 0)  # fmt: skip
    return syn.classes


def run_one(work: Path, size: int, seed: int, extra: list[str] = ()) -> dict[str, float]:
    import pandas as pd

    train, test = work / "train", work / "test"
    field(train, TRAIN_CELLS, seed, size)
    classes = field(test, TEST_CELLS, 1000 + seed, size)
    kept = pd.read_csv(test / "pairs" / "cells.csv")
    kept = kept[kept["crop_index"] >= 0]
    pd.DataFrame(
        {"filename": kept["filename"], "class": [classes[int(i)] for i in kept["label"]]}
    ).to_csv(work / "classes.csv", index=False)
    seconds = mevae(work / "train.log", "train", "--targets", train / "pairs" / "OutputImages",
                    "--nuisances", "rotation,polarity", "--image_size", size, "--seed", seed,
                    "--save_dir", work / "run", "--verbose", 0, *extra)  # fmt: skip
    mevae(work / "evaluate.log", "evaluate", "--checkpoint", work / "run",
          "--targets", test / "pairs" / "OutputImages",
          "--classes", work / "classes.csv", "--out", work / "report.json")  # fmt: skip
    report = json.loads((work / "report.json").read_text())
    log = (work / "run" / "training.log").read_text().splitlines()
    return {"size": size, "seed": seed, "train_s": seconds, "epochs": len(log) - 1,
            "cells": len(kept), **{k: report[k] for k in KEYS}}  # fmt: skip


def table(rows: list[dict]) -> str:
    head = (
        "| px | seed | epochs | train s | dims in use | directions | rotation leakage same / paired | "
        "polarity leakage same / paired | content kept | NMI |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['seed']} | {r['epochs']} | {r['train_s']:.0f} | "
            f"{r['model_active_dims']:.0f} | {r['feature_directions']:.0f} | "
            f"{r['rotation_leakage']:.2f} / "
            f"{r['paired_rotation_leakage']:.2f} | {r['polarity_leakage']:.2f} / "
            f"{r['paired_polarity_leakage']:.2f} | {r['content_kept']:.2f} | {r['nmi']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="32,48,64")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument(
        "--train-args", default="", help="extra `mevae train` flags (experiments; not defaults)"
    )
    p.add_argument("--write-doc", type=Path, default=None)
    p.add_argument("--no-write", action="store_true", help="print only")
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in map(int, a.sizes.split(",")):
            for seed in map(int, a.seeds.split(",")):
                extra = a.train_args.split()
                rows.append(run_one(Path(tmp) / f"{size}-{seed}", size, seed, extra))
                print(json.dumps(rows[-1]), flush=True)
    import torch

    body = (
        f"Command: `python benchmarks/bench_defaults.py --write-doc docs/benchmarks.md` on "
        f"{platform.machine()}, 2 cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. "
        f"{TRAIN_CELLS} synthetic cells to train on and {TEST_CELLS} held out (`make_synthetic_"
        "cells`, 3 classes, 1 channel), cropped by `mevae pairs --scale fit`; `mevae train "
        "--targets ... --nuisances rotation,polarity --image_size S` with nothing else set; "
        "`mevae evaluate --classes` on the held-out crops. *Dims in use*: latent axes whose "
        "fused mean varies over the training cells (`model_active_dims`); *directions*: "
        "independent directions the held-out features vary in (`feature_directions`).\n\n"
        + table(rows)
    )
    print(body)
    if a.write_doc and not a.no_write and not a.train_args:
        from _docs import replace_section

        replace_section(a.write_doc, "Defaults on synthetic cells", body, keep_from="^### ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
