"""End-to-end pipeline: image + labels -> crops -> latents -> UMAP -> k-means -> features CSV.

    python benchmarks/bench_pipeline.py --write-doc docs/benchmarks.md   # 1k, 10k, 100k cells
    python benchmarks/bench_pipeline.py --quick                          # 1k, 3k, 10k cells

Each size runs in a fresh subprocess (so its peak RSS, ``ru_maxrss``, is its own).  The field is a
stack of 2048 x 2048 single-channel planes with cells (ellipses ~22 x 13 px, random orientation
and brightness) on a 24 px grid; crops are 32 px.  The model is a fixed, untrained ME-VAE
(K = 2, latent 32, seed 0): encoding cost does not depend on the weights.  Stages timed:
``extract_cells``, ``encode``, ``run_umap``, ``cluster`` (k-means, k = 5), ``features_table`` +
``export_features_csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _docs import replace_section  # benchmarks/ is on sys.path when run as a script

SIDE, PITCH, CROP = 2048, 24, 32
STAGES = ("crop", "encode", "umap", "cluster", "csv")
UMAP_NOTE = (
    "Cropping, encoding, k-means and the CSV grow about linearly (or better: fixed costs are "
    "amortised). UMAP does not follow a clean line: umap-learn runs 500 optimisation epochs up "
    "to 10,000 cells and 200 above, and computes exact neighbours below 4,096 cells, so its "
    "cost per cell is highest around 10,000 cells; it dominates the pipeline at every size. "
    "Peak RSS includes ~0.6 GB of libraries (torch, numba, UMAP) and the label stack."
)


def make_stack(n_cells: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(P, SIDE, SIDE)`` uint8 image and int32 labels with ``n_cells`` cells (labels unique
    over the stack), ellipses stamped on a grid, fast (one stamp copy per cell)."""
    from skimage.draw import ellipse

    rng = np.random.default_rng(seed)
    per_row = SIDE // PITCH
    per_plane = per_row * per_row
    planes = -(-n_cells // per_plane)
    half = PITCH // 2
    stamps = []
    for rot in np.linspace(0, np.pi, 16, endpoint=False):
        m = np.zeros((PITCH, PITCH), bool)
        rr, cc = ellipse(half, half, 11, 6.5, rotation=rot, shape=m.shape)
        m[rr, cc] = True
        stamps.append(m)
    labels = np.zeros((planes, SIDE, SIDE), np.int32)
    image = rng.integers(5, 25, (planes, SIDE, SIDE), dtype=np.uint8)
    which = rng.integers(0, len(stamps), n_cells)
    bright = rng.integers(80, 230, n_cells).astype(np.uint8)
    for i in range(n_cells):
        p, slot = divmod(i, per_plane)
        y, x = (slot // per_row) * PITCH, (slot % per_row) * PITCH
        m = stamps[which[i]]
        labels[p, y : y + PITCH, x : x + PITCH][m] = i + 1
        image[p, y : y + PITCH, x : x + PITCH][m] = bright[i]
    return image, labels


def run_one(n_cells: int, out_dir: Path) -> dict[str, float]:
    """The whole pipeline on ``n_cells`` cells in this process; seconds per stage, peak RSS."""
    import torch

    from napari_mevae.analysis import cluster, encode, export_features_csv, features_table, run_umap
    from napari_mevae.cells import extract_cells
    from napari_mevae.config import MEVAEConfig
    from napari_mevae.model import MEVAE

    torch.manual_seed(0)
    model = MEVAE(MEVAEConfig(image_size=CROP, channels=1, latent_dim=32, n_encoders=2)).eval()
    t0 = time.perf_counter()
    image, labels = make_stack(n_cells)
    res: dict[str, float] = {"n": n_cells, "make_field": time.perf_counter() - t0}
    res["planes"] = image.shape[0]
    t = time.perf_counter()  # numba compiles UMAP on first use: a one-off cost, kept apart
    run_umap(np.random.default_rng(0).normal(size=(300, 32)).astype(np.float32), seed=0)
    res["umap_jit"] = time.perf_counter() - t
    timings = {}

    t = time.perf_counter()
    cells = extract_cells(image, labels, size=CROP, stack=True)
    timings["crop"] = time.perf_counter() - t
    t = time.perf_counter()
    z = encode(model, cells.crops, batch_size=512)
    timings["encode"] = time.perf_counter() - t
    t = time.perf_counter()
    emb = run_umap(z, seed=0)
    timings["umap"] = time.perf_counter() - t
    t = time.perf_counter()
    ids = cluster(z, "kmeans", n_clusters=5, seed=0)
    timings["cluster"] = time.perf_counter() - t
    t = time.perf_counter()
    table = features_table(cells.kept, z, emb, ids)
    path = export_features_csv(table, out_dir / f"features_{n_cells}.csv", {"image": "synthetic"})
    timings["csv"] = time.perf_counter() - t
    res.update(timings)
    res["kept"] = len(cells.crops)
    res["total"] = sum(timings.values())
    res["encode_cells_per_s"] = len(cells.crops) / timings["encode"]
    with open(path) as fh:
        res["csv_rows"] = sum(1 for _ in fh) - 1
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def table(rows: list[dict[str, float]]) -> str:
    head = (
        "| cells | kept | crop s | encode s | encode cells/s | UMAP s | k-means s | table+CSV s "
        "| total s | x time vs smallest | peak RSS (MB) |\n|---:|---:|---:|---:|---:|---:|---:|---:"
        "|---:|---:|---:|"
    )
    lines = [head]
    base = rows[0]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {int(r['kept']):,} | {r['crop']:.2f} | {r['encode']:.2f} | "
            f"{r['encode_cells_per_s']:,.0f} | {r['umap']:.1f} | {r['cluster']:.2f} | "
            f"{r['csv']:.2f} | {r['total']:.1f} | {r['total'] / base['total']:.1f} "
            f"(cells x{r['n'] / base['n']:.0f}) | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def ratios(rows: list[dict[str, float]]) -> str:
    first, last = rows[0], rows[-1]
    k = last["n"] / first["n"]
    parts = [f"{s} x{last[s] / max(first[s], 1e-9):.1f}" for s in STAGES]
    return (
        f"Growth from {first['n']:,} to {last['n']:,} cells (x{k:.0f}): "
        + ", ".join(parts)
        + f"; whole pipeline x{last['total'] / first['total']:.1f}."
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1k, 3k, 10k cells")
    p.add_argument("--sizes", help="comma-separated cell counts (overrides the defaults)")
    p.add_argument("--write-doc", help="markdown file whose '## End-to-end pipeline' to replace")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(a.one, Path(a.out))))
        return 0
    sizes = [1000, 3000, 10000] if a.quick else [1000, 10000, 100000]
    if a.sizes:
        sizes = [int(s) for s in a.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mevae-pipeline-") as tmp:
        for n in sizes:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", str(n), "--out", tmp],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )
            if proc.returncode:
                sys.exit(f"{n} cells failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(
                f"{n:>7} cells: " + ", ".join(f"{s} {r[s]:.2f} s" for s in STAGES)
                + f", total {r['total']:.1f} s, peak {r['peak_rss_mb']:.0f} MB",
                flush=True,
            )  # fmt: skip
    import torch

    command = "python benchmarks/bench_pipeline.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    body = "\n".join(
        [
            f"Command: `{command}` on {platform.machine()}, {os.cpu_count()} cores (shared with "
            f"other jobs: expect +-30 %), Python {platform.python_version()}, torch "
            f"{torch.__version__}, {torch.get_num_threads()} torch threads.",
            "",
            f"Input: stacks of {SIDE} x {SIDE} single-channel planes (uint8), cells = ellipses "
            f"~22 x 13 px on a {PITCH} px grid; {CROP} px crops (`extract_cells(..., stack=True)`, "
            "defaults otherwise), an untrained ME-VAE (K = 2, latent 32), UMAP (seeded, 1 "
            "thread), k-means (k = 5, 10 inits), features table + CSV. Each size in a fresh "
            "process; peak RSS = `ru_maxrss` of that process (includes the field itself). "
            "Field generation and UMAP's one-off numba compilation (done first on 300 random "
            f"points, {np.median([r['umap_jit'] for r in rows]):.0f} s per process) are not "
            "timed.",
            "",
            table(rows),
            "",
            ratios(rows),
            "",
            UMAP_NOTE,
        ]
    )
    print(body)
    if a.write_doc:
        replace_section(Path(a.write_doc), "End-to-end pipeline", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
