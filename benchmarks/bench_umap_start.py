"""The first UMAP in a new process, with UMAP's numba code compiled anew (before) and loaded
from numba's on-disk cache (:func:`napari_mevae.analysis.import_umap`, now).

    python benchmarks/bench_umap_start.py              # writes docs/benchmarks.md
    python benchmarks/bench_umap_start.py --rounds 1 --no-write

Every new process that runs UMAP paid its compilation: ``mevae demo``, ``mevae features
--umap``, the napari Analyse tab's process when a model is loaded rather than trained.  Each
measurement is a fresh Python process timing ``import umap`` and ``run_umap`` on 500 cells of
16 features; the two kinds alternate, after one process that fills the cache.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import napari_mevae.analysis as analysis
if sys.argv[1] == "compile":  # as before: umap imported without the on-disk cache
    analysis.import_umap = lambda: __import__("umap")
x = np.random.default_rng(0).normal(size=(500, 16)).astype(np.float32)
analysis.run_umap(x)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def one(kind: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, kind], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.splitlines()[-1])["seconds"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="processes of each kind (default 3)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    one("cached")  # fills the cache, as the first UMAP on a machine does
    times: dict[str, list[float]] = {"compile": [], "cached": []}
    for _ in range(args.rounds):
        for kind in times:
            times[kind].append(one(kind))
    before, now = (statistics.median(times[k]) for k in ("compile", "cached"))
    body = (
        f"Measured with `python benchmarks/bench_umap_start.py` on {platform.node()} "
        f"({platform.machine()}, 2 cores), {time.strftime('%Y-%m-%d')}: a new Python process "
        "imports napari_mevae and umap and embeds 500 cells of 16 features, "
        f"{args.rounds} processes of each kind, alternating.\n\n"
        "| UMAP's numba code | seconds (median) | each run |\n|---|---|---|\n"
        f"| compiled in the process (before) | {before:.1f} | "
        f"{', '.join(f'{t:.1f}' for t in times['compile'])} |\n"
        f"| loaded from numba's cache (now) | {now:.1f} | "
        f"{', '.join(f'{t:.1f}' for t in times['cached'])} |\n\n"
        f"The first UMAP of a new process takes {before / now:.1f}x as long when it compiles "
        "UMAP's numba code. Only the first process on a machine (and the first after umap, "
        "pynndescent or numba change) compiles it now."
    )
    print(body)
    if not args.no_write:
        from _docs import replace_section

        replace_section(REPO / "docs" / "benchmarks.md", "The first UMAP of a process", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
