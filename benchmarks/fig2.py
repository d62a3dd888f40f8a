"""Reproduce the paper's Fig. 2 table (nuisance leakage of the latent space, time per epoch).

Real data: the 2000 LINCS cell pairs of ../shared/data/lincs_example (unzipped to a temporary
folder, or ``--data DIR`` holding InputImages1/, InputImages2/, OutputImages/).  Cells
Image_0..Image_1499 train, Image_1500..Image_1999 are measured (canonical OutputImages) with
``mevae evaluate`` (fresh uniform random angles and flips).  Four models, same budget, all through
the ``mevae`` command line:

- ``vae``: standard VAE autoencoding the raw InputImages1 cells (``--model vae``);
- ``betavae``: the same with beta 4 (``--model betavae``);
- ``mevae_fixed``: ME-VAE on the published fixed pairs InputImages1/2 -> OutputImages;
- ``mevae_fresh``: ME-VAE from OutputImages with fresh rotation + polarity nuisances every epoch.

Synthetic data with ground-truth classes (``--synthetic``): the same four kinds of model trained
through the library (Trainer + NuisanceAutoencode / NuisancePairs) on synthetic canonical crops;
NMI / purity of k-means against the true classes, plus the leakages.

    python benchmarks/fig2.py --image-size 32 --epochs 15 --syn-epochs 8 --beta-scale 0.0625 \
        --write-doc docs/benchmarks.md

(about 10-25 min on 2 shared CPU cores; ``--beta-scale (S/128)**2`` keeps the reference's
reconstruction / KL balance at image size S, since the loss scales the reconstruction by S*S).
Re-running replaces the tables of the "## Fig. 2 reproduction" section and keeps its
"### What the numbers say" notes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from _docs import replace_section  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
ZIPS = ROOT.parent / "shared" / "data" / "lincs_example"
FOLDERS = ("InputImages1", "InputImages2", "OutputImages")
LINCS_MODELS = ("vae", "betavae", "mevae_fixed", "mevae_fresh", "mevae_pose", "mevae_fresh_bf16")
LABELS = {
    "vae": "standard VAE",
    "betavae": "beta-VAE (beta 4)",
    "mevae_fixed": "ME-VAE, published fixed pairs",
    "mevae_fresh": "ME-VAE, fresh nuisances every epoch",
    "mevae_pose": "ME-VAE, fresh pose (rotation + mirror) and polarity",
    "mevae_fresh_bf16": "ME-VAE, fresh nuisances, trained with `--precision bf16`",
}
PAPER = {  # MEVAE.md: Fig. 2 (rotation, polarity correlation, s/epoch) and Fig. 3 (NMI)
    "vae": ("0.45", "0.32", "54", "0.03"),
    "betavae": ("0.59", "0.40", "53", "0.04"),
    "mevae_fixed": ("0.02", "0.05", "64", "0.48"),
    "mevae_fresh": ("-", "-", "-", "-"),
    "mevae_pose": ("-", "-", "-", "-"),
    "mevae_fresh_bf16": ("-", "-", "-", "-"),
}
METRICS = (
    "rotation_leakage",
    "polarity_leakage",
    "paired_rotation_leakage",
    "paired_polarity_leakage",
    "content_kept",
    "paired_content_kept",
    "reconstruction_corr",
)


# -- data ---------------------------------------------------------------------------------------
def find_data(data: str | None, work: Path) -> Path:
    """A folder with InputImages1/, InputImages2/, OutputImages/ (each <dir>/train/*.tif)."""
    if data:
        root = Path(data)
        missing = [f for f in FOLDERS if not (root / f).is_dir()]
        if missing:
            sys.exit(f"--data {root} lacks {', '.join(missing)}")
        return root
    root = work / "lincs"
    for name in FOLDERS:
        if not (root / name).is_dir():
            src = ZIPS / f"{name}.zip"
            if not src.exists():
                sys.exit(f"{src} not found; give --data DIR")
            with zipfile.ZipFile(src) as zf:
                zf.extractall(root)
    return root


def split(root: Path, work: Path, n_train: int, n_test: int) -> tuple[Path, Path]:
    """train/ and test/ folders of symlinks: Image_0..n_train-1, then the next n_test."""
    parts = {"train": range(0, n_train), "test": range(n_train, n_train + n_test)}
    out = {}
    for part, ids in parts.items():
        base = work / f"split_{n_train}_{n_test}" / part
        for name in FOLDERS:
            src_dir = root / name / "train" if (root / name / "train").is_dir() else root / name
            dst = base / name / "train"
            if dst.is_dir() and len(os.listdir(dst)) == len(ids):
                continue
            shutil.rmtree(dst, ignore_errors=True)
            dst.mkdir(parents=True)
            for i in ids:
                src = src_dir / f"Image_{i}.tif"
                if not src.exists():
                    sys.exit(f"{src} missing")
                (dst / src.name).symlink_to(src.resolve())
        out[part] = base
    return out["train"], out["test"]


# -- LINCS: train and evaluate through the CLI ------------------------------------------------
def train_args(kind: str, train: Path, save: Path, a: argparse.Namespace) -> list[str]:
    common = [
        "--save_dir", str(save), "--image_size", str(a.image_size), "--latent_dim",
        str(a.latent_dim), "--batch_size", str(a.batch_size), "--epochs", str(a.epochs),
        "--learn_rate", str(a.lr), "--seed", str(a.seed), "--earlystop", "0", "--verbose", "1",
    ]  # fmt: skip
    beta = 4.0 if kind == "betavae" else 1.0
    if a.beta_scale != 1.0:
        common += ["--beta", f"{beta * a.beta_scale:g}"]
    if a.kl_warmup:
        common += ["--kl_warmup", f"{a.kl_warmup:g}"]
    common += ["--invariance", f"{a.invariance:g}"]  # 0: the paper's loss
    # float32 unless the row is the bf16 one (the default, auto, follows the hardware)
    common += ["--precision", "bf16" if kind.endswith("_bf16") else "float32"]
    if kind in ("vae", "betavae"):
        data = ["--model", kind, "--data_dir", str(train / "InputImages1")]
    elif kind == "mevae_fixed":
        data = [
            "--data_dir", str(train / "InputImages1"), "--input2_dir",
            str(train / "InputImages2"), "--out1_dir", str(train / "OutputImages"),
        ]  # fmt: skip
    else:
        nuisances = "pose,polarity" if kind == "mevae_pose" else "rotation,polarity"  # fmt: skip
        data = ["--targets", str(train / "OutputImages"), "--nuisances", nuisances]
    return ["train", *data, *common]


EPOCH_RE = re.compile(r"epoch (\d+)/(\d+)\s+loss ([\d.]+).*?(\d+) images/s")


def run_cli(argv: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[float, str]:
    """``mevae ARGV`` in a process of its own (``env``: extra environment variables): output to
    ``log``, one line on a failure; returns (wall-clock seconds, output)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "napari_mevae", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **env} if env else None,
    )
    wall = time.perf_counter() - start
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"mevae {argv[0]} failed ({proc.returncode}); see {log}")
    return wall, proc.stdout + proc.stderr


def lincs(a: argparse.Namespace, work: Path) -> dict[str, dict]:
    root = find_data(a.data, work)
    train, test = split(root, work, a.n_train, a.n_test)
    results: dict[str, dict] = {}
    for kind in a.models:
        save = work / f"run_{kind}"
        res_file = save / "fig2_result.json"
        if a.reuse and res_file.exists():
            rep = json.loads(res_file.read_text())
            results[kind] = refresh_report(save, test, rep, a.seed)
            print(f"{kind}: reused {res_file}", flush=True)
            continue
        shutil.rmtree(save, ignore_errors=True)
        save.mkdir(parents=True)
        argv = train_args(kind, train, save, a)
        wall, text = run_cli(argv, save / "train_stdout.txt")
        rates = [int(m.group(4)) for m in EPOCH_RE.finditer(text)]
        losses = [float(m.group(3)) for m in EPOCH_RE.finditer(text)]
        # trainer's images/s per epoch -> seconds per epoch of the training loop itself
        s_epoch = float(np.median([a.n_train / r for r in rates])) if rates else float("nan")
        report = save / "report.json"
        eval_argv = [
            "evaluate", "--checkpoint", str(save), "--targets", str(test / "OutputImages"),
            "--seed", str(a.seed), "--out", str(report),
        ]  # fmt: skip
        run_cli(eval_argv, save / "evaluate_stdout.txt")
        rep = json.loads(report.read_text())
        rep.update(
            s_per_epoch=s_epoch,
            wall_s=wall,
            final_loss=losses[-1] if losses else float("nan"),
            command="mevae " + " ".join(argv),
        )
        res_file.write_text(json.dumps(rep, indent=2))
        results[kind] = refresh_report(save, test, rep, a.seed)
        print(
            f"{kind}: " + ", ".join(f"{k} {rep[k]:.3f}" for k in METRICS)
            + f", {s_epoch:.1f} s/epoch, {wall:.0f} s wall",
            flush=True,
        )  # fmt: skip
    return results


def refresh_report(run: Path, test: Path, rep: dict, seed: int) -> dict:
    """Results written before ``invariance_report`` had its newest key: measure the checkpoint
    again with the current report (same draws, so the older keys come out the same) and keep
    its keys.  Results that have the newest key are returned as they are, also when they carry
    keys the report has dropped since (the tables do not read those).  A checkpoint from before
    training measured the dimensions in use reports all of them as used."""
    from napari_mevae.checkpoints import load_checkpoint
    from napari_mevae.evaluation import invariance_report
    from napari_mevae.folders import FolderTargets

    if "paired_neighbour_content_kept" in rep:  # the newest key: measured by this version
        return rep
    ckpt = load_checkpoint(run)
    model = ckpt.build_model("cpu")
    crops = FolderTargets(test / "OutputImages", ckpt.config.image_size, 1).array
    rep.update(invariance_report(model, np.asarray(crops), seed=seed))
    (run / "fig2_result.json").write_text(json.dumps(rep, indent=2))
    return rep


# -- synthetic: library API, ground-truth classes ----------------------------------------------
def synthetic(a: argparse.Namespace) -> dict[str, dict]:
    import torch

    from napari_mevae.analysis import encode
    from napari_mevae.config import MEVAEConfig, TrainOptions
    from napari_mevae.evaluation import invariance_report
    from napari_mevae.nuisances import NuisanceAutoencode, NuisancePairs
    from napari_mevae.synthetic import synthetic_crops
    from napari_mevae.training import Trainer

    class FixedPairs(NuisancePairs):
        """One draw per cell for the whole run: the published, pre-made pairs."""

        def set_epoch(self, epoch: int) -> None:
            self.epoch = 0

    class FixedAutoencode(NuisanceAutoencode):
        def set_epoch(self, epoch: int) -> None:
            self.epoch = 0

    torch.set_num_threads(max(1, torch.get_num_threads()))
    size, nz = a.syn_size, ("rotation", "polarity")
    train, _ = synthetic_crops(a.syn_train, size, seed=a.seed)
    test, classes = synthetic_crops(a.syn_test, size, seed=a.seed + 1000)
    results = {}
    for kind in a.models:
        nuis = ["pose", "polarity"] if kind == "mevae_pose" else list(nz)
        if kind in ("vae", "betavae"):  # the raw cells: pose fixed per cell, as in a data set
            ds, k, nuis = FixedAutoencode(train, nz, seed=a.seed), 1, []
        elif kind == "mevae_fixed":
            ds, k = FixedPairs(train, nz, seed=a.seed), 2
        else:
            ds, k = NuisancePairs(train, nuis, seed=a.seed), 2
        cfg = MEVAEConfig(
            nuisances=nuis,
            image_size=size,
            channels=1,
            latent_dim=a.latent_dim,
            n_encoders=k,
            beta=(4.0 if kind == "betavae" else 1.0) * a.beta_scale,
        )
        opts = TrainOptions(
            epochs=a.syn_epochs,
            batch_size=a.batch_size,
            learn_rate=a.lr,
            seed=a.seed,
            earlystop=False,
            device="cpu",
            kl_warmup=a.kl_warmup,
            invariance=a.invariance,
            precision="bf16" if kind.endswith("_bf16") else "float32",
        )
        start = time.perf_counter()
        model = Trainer(cfg, ds, opts).train()
        secs = (time.perf_counter() - start) / max(1, a.syn_epochs)
        rep = invariance_report(model, test, classes=classes, seed=a.seed)
        rep["latent_std_max"] = float(encode(model, test).std(0).max())
        rep["s_per_epoch"] = secs
        results[kind] = rep
        print(
            f"synthetic {kind}: "
            + ", ".join(f"{m} {rep[m]:.3f}" for m in (*METRICS, "nmi", "purity")),
            flush=True,
        )
    return results


# -- report -------------------------------------------------------------------------------------
def fmt(v: float) -> str:
    return f"{v:.2f}" if np.isfinite(v) else "-"


def pair(r: dict, key: str) -> str:
    """'same / paired' for one metric (see ``invariance_report``)."""
    return f"{fmt(r[key])} / {fmt(r.get('paired_' + key, float('nan')))}"


def all_dims(r: dict) -> str:
    """The paired probes on the raw product of the means, unused dimensions included."""
    keys = ("paired_rotation_leakage_all_dims", "paired_polarity_leakage_all_dims")
    return " / ".join(fmt(r.get(k, float("nan"))) for k in keys)


def dims_in_use(r: dict) -> str:
    used = r.get("model_active_dims", float("nan"))
    return f"{used:.0f}" if np.isfinite(used) else "-"


def lincs_table(res: dict[str, dict], epochs: int) -> str:
    rows = [
        "| model | rotation leakage: same / paired | polarity leakage: same / paired | "
        "paired, raw product of all dims: rotation / polarity | dims in use | content kept: "
        "same / paired | content kept by neighbours: same / paired | reconstruction corr | "
        "s/epoch: trainer / wall | paper: rotation / polarity / s/epoch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in [m for m in LINCS_MODELS if m in res]:
        r, p = res[kind], PAPER[kind]
        rows.append(
            f"| {LABELS[kind]} | {pair(r, 'rotation_leakage')} | {pair(r, 'polarity_leakage')} | "
            f"{all_dims(r)} | {dims_in_use(r)} | {pair(r, 'content_kept')} | "
            f"{pair(r, 'neighbour_content_kept')} | {fmt(r['reconstruction_corr'])} | "
            f"{r['s_per_epoch']:.1f} / {r['wall_s'] / epochs:.1f} | {p[0]} / {p[1]} / {p[2]} |"
        )
    return "\n".join(rows)


def synthetic_table(res: dict[str, dict]) -> str:
    rows = [
        "| model | NMI | purity | rotation leakage: same / paired | polarity leakage: same / "
        "paired | paired, raw product of all dims: rotation / polarity | dims in use | content "
        "kept: same / paired | content kept by neighbours: same / paired | reconstruction corr "
        "| max latent std | s/epoch | paper NMI (TGF-beta vs PBS) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in [m for m in LINCS_MODELS if m in res]:
        r = res[kind]
        rows.append(
            f"| {LABELS[kind]} | {fmt(r['nmi'])} | {fmt(r['purity'])} | "
            f"{pair(r, 'rotation_leakage')} | {pair(r, 'polarity_leakage')} | "
            f"{all_dims(r)} | {dims_in_use(r)} | "
            f"{pair(r, 'content_kept')} | {pair(r, 'neighbour_content_kept')} | "
            f"{fmt(r['reconstruction_corr'])} | {r['latent_std_max']:.3f} | {r['s_per_epoch']:.1f} | {PAPER[kind][3]} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", help="folder with InputImages1/2, OutputImages (default: unzip)")
    p.add_argument("--work", help="work folder (default: a temporary folder, kept)")
    p.add_argument("--models", default=",".join(LINCS_MODELS), help="subset, comma-separated")
    p.add_argument("--image-size", dest="image_size", type=int, default=32)
    p.add_argument("--latent-dim", dest="latent_dim", type=int, default=32)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument(
        "--beta-scale",
        type=float,
        default=1.0,
        help="multiply every model's KL weight (1 = the reference's loss at this image size)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", dest="n_train", type=int, default=1500)
    p.add_argument("--n-test", dest="n_test", type=int, default=500)
    p.add_argument("--skip-lincs", action="store_true")
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--syn-train", dest="syn_train", type=int, default=600)
    p.add_argument("--syn-test", dest="syn_test", type=int, default=300)
    p.add_argument("--syn-size", dest="syn_size", type=int, default=32)
    p.add_argument("--syn-epochs", dest="syn_epochs", type=int, default=None)
    p.add_argument(
        "--kl-warmup",
        dest="kl_warmup",
        type=float,
        default=0.0,
        help="epochs of KL warm-up for every model (mevae train --kl_warmup)",
    )
    p.add_argument(
        "--invariance",
        type=float,
        default=0.0,
        help="the ME-VAE's invariance term (mevae train --invariance; default 0: the paper's "
        "loss, which this table reproduces)",
    )
    p.add_argument("--reuse", action="store_true", help="reuse finished runs in --work")
    p.add_argument("--write-doc", help="markdown file whose '## Fig. 2 reproduction' to replace")
    a = p.parse_args(argv)
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    bad = [m for m in a.models if m not in LINCS_MODELS]
    if bad:
        p.error(f"unknown model(s) {bad}; choose from {LINCS_MODELS}")
    a.syn_epochs = a.syn_epochs or a.epochs
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="mevae-fig2-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {work}", flush=True)
    out: dict[str, dict] = {}
    if not a.skip_lincs:
        out["lincs"] = lincs(a, work)
    syn_file = work / "synthetic.json"
    if not a.skip_synthetic and a.reuse and syn_file.exists():
        out["synthetic"] = json.loads(syn_file.read_text())
    elif not a.skip_synthetic:
        out["synthetic"] = synthetic(a)
        (work / "synthetic.json").write_text(json.dumps(out["synthetic"], indent=2))
    shown, skip = [], 0
    for arg in argv if argv is not None else sys.argv[1:]:  # run-local flags left out
        if skip:
            skip -= 1
        elif arg in ("--work", "--data"):
            skip = 1
        elif arg != "--reuse":
            shown.append(arg)
    command = "python benchmarks/fig2.py " + " ".join(shown)
    parts = [f"Command: `{command}`", ""]
    settings = (
        f"Settings: image size {a.image_size} px (LINCS, resized from 128), latent {a.latent_dim}, "
        f"batch {a.batch_size}, {a.epochs} epochs, RMSprop lr {a.lr:g}, seed {a.seed}, "
        f"KL weight x{a.beta_scale:g}"
        + (f", KL warm-up over {a.kl_warmup:g} epochs" if a.kl_warmup else "")
        + (f", invariance term {a.invariance:g} per pixel" if a.invariance else "")
        + f", no early stopping; train Image_0..{a.n_train - 1}, "
        f"measure Image_{a.n_train}..{a.n_train + a.n_test - 1}. s/epoch: trainer = training "
        "loop only (cells / the trainer's images/s, median over epochs); wall = the whole "
        "`mevae train` command (reading the images, training, writing every output) / epochs. "
        "Leakage and content kept are measured two ways (`evaluation.invariance_report`): "
        "**same** = every encoder sees the same rotated (or flipped) cell, as when one image of "
        "a cell is analysed; **paired** = each encoder sees the cell under its own freshly "
        "drawn nuisance, as in training and in the reference's InputImages1/2 (the paper's "
        "setting); for one-encoder models the two coincide. Both read the features as "
        "exported: dimensions the model does not use (variance of their mean over the training "
        "cells < 0.01, measured by the trainer) are 0. *Raw product of all dims* repeats the "
        "paired probes on the product of the encoder means with those dimensions left in. "
        "*Content kept* = cross-validated R^2 of five pose-invariant cell descriptors (mean "
        "intensity, area, radius of gyration, elongation, intensity spread) from the features "
        "by a linear probe that standardises every dimension; *by neighbours* = the same "
        "descriptors predicted from each cell's 10 nearest cells in feature space (Euclidean, "
        "features as exported): what UMAP, clustering and distances see."
    )
    if "lincs" in out:
        parts += [settings, "", lincs_table(out["lincs"], a.epochs), ""]
    if "synthetic" in out:
        parts += [
            f"Synthetic cells with ground truth: {a.syn_train} train / {a.syn_test} test crops "
            f"at {a.syn_size} px, {a.syn_epochs} epochs, same latent/batch/lr; NMI and purity of "
            "k-means (k = 3 true classes) on the latents of rotated + flipped test cells.",
            "",
            synthetic_table(out["synthetic"]),
            "",
        ]
    text = "\n".join(parts)
    print(text)
    (work / "fig2.md").write_text(text)
    if a.write_doc:
        replace_section(
            Path(a.write_doc), "Fig. 2 reproduction", text, keep_from=r"^### What the numbers say"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
