"""What `mevae train` gives with default settings on the real LINCS cells, against a VAE trained
the same way: the issue "Defaults that learn"'s LINCS criterion (leakage <= 0.05 with content
kept >= the VAE's).

    python benchmarks/bench_lincs_defaults.py --write-doc docs/benchmarks.md  # 48 px, 3 seeds
    python benchmarks/bench_lincs_defaults.py --sizes 32 --seeds 2 --models mevae --no-write

The Fig. 2 split of ../shared/data/lincs_example (Image_0..1499 train, Image_1500..1999 are
measured; fig2.py's `find_data` and `split`).  Each run: `mevae train --targets
train/OutputImages --nuisances rotation,polarity --image_size S --seed K` and nothing else (the
default budget, KL weight, early stopping, invariance term); the VAE adds `--model vae` (the
nuisances are then its augmentations).  Then `mevae evaluate` on the 500 held-out cells.  Runs
go two at a time (`--jobs`), one thread each, so times are those of a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
KEYS = (
    "model_active_dims",
    "feature_directions",
    "rotation_leakage",
    "paired_rotation_leakage",
    "polarity_leakage",
    "paired_polarity_leakage",
    "content_kept",
    "content_kept_elongation",
    "neighbour_content_kept",
)


def mevae(log: Path, *args: object) -> float:
    """``mevae ARGS`` in a process of its own on one thread (fig2's runner); its seconds."""
    from fig2 import run_cli

    return run_cli([str(a) for a in args], log, ONE_THREAD)[0]


def run_one(work: Path, train: Path, test: Path, model: str, size: int, seed: int) -> dict:
    run = work / f"{model}-{size}-{seed}"
    report_path = run / "eval.json"
    if not report_path.exists():
        run.mkdir(parents=True, exist_ok=True)
        extra = ["--model", "vae"] if model == "vae" else []
        seconds = mevae(run / "train.log", "train", "--targets", train / "OutputImages",
                        "--nuisances", "rotation,polarity", "--image_size", size,
                        "--seed", seed, "--save_dir", run / "run",
                        "--verbose", 0, *extra)  # fmt: skip
        mevae(run / "evaluate.log", "evaluate", "--checkpoint", run / "run",
              "--targets", test / "OutputImages", "--out", report_path)  # fmt: skip
        (run / "seconds").write_text(f"{seconds:.1f}\n")
    report = json.loads(report_path.read_text())
    log = (run / "run" / "training.log").read_text().splitlines()
    said = (run / "train.log").read_text()
    ended = "early stop" if "early stop:" in said else "budget"
    return {"model": model, "size": size, "seed": seed, "epochs": len(log) - 1, "ended": ended,
            "loss": float(log[-1].split()[1]), "train_s": float((run / "seconds").read_text()),
            **{k: report[k] for k in KEYS}}  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = [
        "| model | px | seed | epochs (end) | loss at the end | train s | dims in use / "
        "directions | content kept | elongation | by neighbours | rotation leakage same / "
        "paired | polarity leakage same / paired |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {'ME-VAE' if r['model'] == 'mevae' else 'VAE'} | {r['size']} | {r['seed']} | "
            f"{r['epochs']} ({r['ended']}) | {r['loss']:.1f} | {r['train_s']:.0f} | "
            f"{r['model_active_dims']:.0f} / {r['feature_directions']:.0f} | "
            f"{r['content_kept']:.2f} | {r['content_kept_elongation']:.2f} | "
            f"{r['neighbour_content_kept']:.2f} | {r['rotation_leakage']:.2f} / "
            f"{r['paired_rotation_leakage']:.2f} | {r['polarity_leakage']:.2f} / "
            f"{r['paired_polarity_leakage']:.2f} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Per image size: the ME-VAE's content kept against the VAE's, and the largest leakage."""
    out = []
    for size in sorted({r["size"] for r in rows}):
        me = [r for r in rows if r["size"] == size and r["model"] == "mevae"]
        vae = [r for r in rows if r["size"] == size and r["model"] == "vae"]
        if not me or not vae:
            continue
        leak = max(r[k] for r in me for k in KEYS[2:6])

        def mean(rs: list[dict], k: str) -> float:
            return sum(r[k] for r in rs) / len(rs)

        out.append(
            f"- {size} px: content kept, ME-VAE {mean(me, 'content_kept'):.2f} "
            f"({min(r['content_kept'] for r in me):.2f}-{max(r['content_kept'] for r in me):.2f})"
            f" against the VAE's {mean(vae, 'content_kept'):.2f} "
            f"({min(r['content_kept'] for r in vae):.2f}-{max(r['content_kept'] for r in vae):.2f})"
            f"; by neighbours {mean(me, 'neighbour_content_kept'):.2f} against "
            f"{mean(vae, 'neighbour_content_kept'):.2f}; the ME-VAE's largest leakage {leak:.2f}."
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="folder with InputImages1/2, OutputImages")
    p.add_argument("--work", type=Path, default=None, help="work folder (runs are reused)")
    p.add_argument("--sizes", default="48")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--models", default="mevae,vae")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    p.add_argument("--write-doc", type=Path, default=None)
    p.add_argument("--no-write", action="store_true", help="print only")
    a = p.parse_args(argv)
    from fig2 import find_data, split

    work = a.work or Path(tempfile.mkdtemp(prefix="lincs-defaults-"))
    train, test = split(find_data(a.data, work), work, 1500, 500)
    jobs = [
        (model, int(size), int(seed))
        for size in a.sizes.split(",")
        for model in a.models.split(",")
        for seed in a.seeds.split(",")
    ]
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        futures = [pool.submit(run_one, work, train, test, *job) for job in jobs]
        rows = []
        for f in futures:
            rows.append(f.result())
            print(json.dumps(rows[-1]), flush=True)
    import torch

    body = (
        f"Command: `python benchmarks/bench_lincs_defaults.py --write-doc docs/benchmarks.md` "
        f"on {platform.machine()}, 2 cores, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}. The Fig. 2 split (1,500 LINCS cells to train on, 500 "
        "held out); `mevae train --targets train/OutputImages --nuisances rotation,polarity "
        "--image_size S --seed K` with nothing else set (the VAE adds `--model vae`); `mevae "
        "evaluate` on the held-out cells. Two runs at a time, one thread each. *Elongation*: "
        "content kept of that descriptor alone (`content_kept_elongation`).\n\n"
        + table(rows)
        + "\n\n"
        + summary(rows)
    )
    print(body)
    if a.write_doc and not a.no_write:
        from _docs import replace_section

        replace_section(a.write_doc, "Defaults on LINCS cells", body, keep_from="^### ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
