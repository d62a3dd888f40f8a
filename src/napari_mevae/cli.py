"""The ``mevae`` command: the reference's flags and folder layout, its outputs, its defects fixed.

mevae train   --data_dir InputImages1/ --input2_dir InputImages2/ --out1_dir OutputImages/ ...
mevae train   --targets OutputImages/ --nuisances rotation,polarity ...   (fresh pairs each epoch)
mevae encode  --checkpoint Outputs/ --data_dir NewCells/ --out encodings.csv
mevae pairs   --image IMG.tif --labels LABELS.tif --out DIR
mevae evaluate --checkpoint Outputs/ --targets OutputImages/ --out report.json
mevae demo    [--out mevae-demo]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("mevae")

MODEL_CHOICES = ("mevae", "vae", "betavae")
#: how the run's precision (training.PRECISIONS after "auto") is announced
PRECISION_NAMES = {
    "float32": " (float32)",
    "bf16": " (bf16 autocast)",
    "fp16": " (float16 autocast, loss scaling)",
}


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


# -- argument parsing ------------------------------------------------------------------------
def _bool01(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0 or 1, got {text!r}")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (reference flags and defaults)")
    g.add_argument(
        "--image_size", type=int, default=128, help="crop side S in pixels (default 128)"
    )
    g.add_argument("--nchannel", type=int, default=1, help="image channels (default 1)")
    g.add_argument("--latent_dim", type=int, default=128, help="latent dimensions (default 128)")
    g.add_argument("--nlayers", type=int, default=3, help="conv layers per encoder (default 3)")
    g.add_argument("--inter_dim", type=int, default=128, help="dense layer width (default 128)")
    g.add_argument(
        "--nfilters", type=int, default=16, help="filters of the first conv (default 16)"
    )
    g.add_argument("--kernel_size", type=int, default=3, help="conv kernel size (default 3)")
    g.add_argument(
        "--epsilon_std", type=float, default=1.0, help="sampling noise std (default 1.0)"
    )
    g.add_argument(
        "--model",
        choices=MODEL_CHOICES,
        default="mevae",
        help="mevae (K encoders), vae (standard VAE baseline) or betavae (beta-VAE baseline)",
    )
    g.add_argument("--beta", type=float, default=None, help="KL weight (default 1; betavae 4)")
    g.add_argument(
        "--recon_loss", choices=("bce", "mse"), default="bce", help="reconstruction loss"
    )


def _add_data_args(p: argparse.ArgumentParser, train: bool) -> None:
    g = p.add_argument_group("data (reference folder layout: <dir>/train/*.tif or <dir>/*.tif)")
    g.add_argument("--data_dir", help="encoder-1 inputs (e.g. InputImages1/)")
    g.add_argument("--input2_dir", help="encoder-2 inputs (e.g. InputImages2/)")
    g.add_argument("--input3_dir", help="encoder-3 inputs, for K = 3")
    g.add_argument(
        "--input_dir",
        action="append",
        default=[],
        metavar="DIR",
        help="further encoder inputs, repeatable (encoders 4, 5, ...)",
    )
    if train:
        g.add_argument("--out1_dir", help="targets: the corrected cells (e.g. OutputImages/)")
        g.add_argument(
            "--targets",
            help="train from canonical crops (a folder of images, or a .npy crops file read "
            "lazily) with fresh random nuisances every epoch, instead of "
            "--data_dir/--input2_dir/--out1_dir",
        )
        g.add_argument(
            "--nuisances",
            default="rotation,polarity",
            help="with --targets: nuisances to remove, one encoder each (default rotation,polarity)",
        )


def _add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--batch_size", type=int, default=50, help="GLOBAL batch size (default 50)")
    g.add_argument("--epochs", type=int, default=10, help="epochs (default 10)")
    g.add_argument("--learn_rate", type=float, default=0.0005, help="RMSprop learning rate")
    g.add_argument(
        "--earlystop", type=_bool01, default=True, help="1 = early stopping on loss (default 1)"
    )
    g.add_argument(
        "--kl_warmup",
        type=float,
        default=0.0,
        help="epochs over which the KL weight ramps from 0 to beta (default 0 = off, as the "
        "reference); against latent collapse on small images",
    )
    g.add_argument(
        "--patience", type=int, default=8, help="early-stopping patience in epochs (default 8)"
    )
    g.add_argument(
        "--verbose", type=int, default=1, help="0 = quiet, 1 = progress bars (default 1)"
    )
    g.add_argument(
        "--latent_samp", type=int, default=10, help="steps of the latent walk (default 10)"
    )
    g.add_argument(
        "--num_save", type=int, default=8, help="images per row of the saved grids (default 8)"
    )
    g.add_argument("--image_res", type=int, default=8, help="accepted for compatibility; unused")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible runs")
    g.add_argument(
        "--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps"
    )
    g.add_argument("--num_workers", type=int, default=0, help="data-loader worker processes")
    g.add_argument(
        "--distributed", action="store_true", help="DistributedDataParallel (under torchrun)"
    )
    g.add_argument(
        "--lazy",
        action="store_true",
        help="read images from disk as needed instead of loading them all (large data sets)",
    )
    g.add_argument(
        "--compile", action="store_true", help="torch.compile the model (pays on long runs)"
    )
    g.add_argument(
        "--precision",
        choices=("auto", *PRECISION_NAMES),
        default="auto",
        help="auto (default): bfloat16 autocast where the CPU/GPU runs it natively, float16 "
        "with loss scaling on older CUDA GPUs (T4, V100), else float32; float32: neither; "
        "bf16: wherever supported; fp16: float16 with loss scaling. Weights and loss stay "
        "float32",
    )
    g.add_argument("--bf16", action="store_true", help="same as --precision bf16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mevae",
        description="Multi-Encoder VAE features for single-cell images (napari-mevae).",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"napari-mevae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train (or, with --phase load, encode with) an ME-VAE")
    _add_data_args(p, train=True)
    p.add_argument("--save_dir", default="Outputs/", help="where outputs go (default Outputs/)")
    p.add_argument(
        "--phase", choices=("train", "load"), default="train", help="train, or load = encode only"
    )
    p.add_argument(
        "--checkpoint", help="checkpoint file or training save_dir; resumes with --phase train"
    )
    _add_model_args(p)
    _add_run_args(p)

    p = sub.add_parser("encode", help="encode cells with a trained model into a CSV")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or training save_dir")
    _add_data_args(p, train=False)
    p.add_argument("--targets", help="folder of canonical crops (every encoder sees the same cell)")
    p.add_argument("--out", default="encodings.csv", help="CSV to write (default encodings.csv)")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--lazy", action="store_true", help="read images as needed (large data sets)")
    p.add_argument("--verbose", type=int, default=1)

    p = sub.add_parser("pairs", help="crop segmented cells into the reference folder layout")
    p.add_argument(
        "--image", required=True, help="intensity image (TIFF): (Y,X), (C,Y,X) or (Y,X,C)"
    )
    p.add_argument("--labels", required=True, help="label image (TIFF) of segmented cells, (Y,X)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=int, default=64, help="crop size in pixels (default 64)")
    p.add_argument("--channel-axis", type=int, default=None, help="axis of channels in --image")
    p.add_argument("--nuisances", default="rotation,polarity", help="one encoder input folder each")
    p.add_argument(
        "--scale", choices=("fixed", "fit"), default="fixed", help="pixel scale or fit the cell"
    )
    p.add_argument("--normalize", choices=("percentile", "max", "none"), default="percentile")
    p.add_argument("--min-area", type=int, default=0)
    p.add_argument("--max-area", type=int, default=None)
    p.add_argument(
        "--border", choices=("drop", "pad"), default="drop", help="cells touching the border"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--npy",
        action="store_true",
        help="also write DIR/crops.npy (+ crops.csv): the canonical crops in one file, read "
        "lazily by `mevae train --targets DIR/crops.npy` (for data sets larger than memory)",
    )
    p.add_argument("--verbose", type=int, default=1)

    p = sub.add_parser("evaluate", help="invariance report: rotation/polarity left in the latents")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--targets", required=True, help="folder of canonical crops to measure on")
    p.add_argument("--classes", help="CSV with columns filename,class for NMI/purity (optional)")
    p.add_argument("--first", type=int, default=0, help="first cell (by natural name order)")
    p.add_argument("--last", type=int, default=None, help="one past the last cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the report")

    p = sub.add_parser("demo", help="the whole job on built-in synthetic cells, in about a minute")
    p.add_argument("--out", default="mevae-demo", help="output folder (default mevae-demo)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--cells", type=int, default=600)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", type=int, default=1)
    return parser


# -- helpers ---------------------------------------------------------------------------------
def _progress(total: int, desc: str, verbose: int, unit: str = "it"):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit=unit, disable=verbose <= 0, leave=False, file=sys.stderr
    )


def _input_dirs(args: argparse.Namespace) -> list[str]:
    dirs = [d for d in (args.data_dir, args.input2_dir, args.input3_dir) if d]
    if (args.input3_dir and not args.input2_dir) or (args.input2_dir and not args.data_dir):
        raise CLIError(
            "encoder inputs must be given in order: --data_dir, then --input2_dir, then --input3_dir"
        )
    return dirs + list(args.input_dir or [])


def _model_config(args: argparse.Namespace, n_encoders: int, nuisances: list[str]):
    from .model import MEVAEConfig

    beta = args.beta if args.beta is not None else (4.0 if args.model == "betavae" else 1.0)
    return MEVAEConfig(
        image_size=args.image_size,
        channels=args.nchannel,
        latent_dim=args.latent_dim,
        inter_dim=args.inter_dim,
        nlayers=args.nlayers,
        nfilters=args.nfilters,
        kernel_size=args.kernel_size,
        n_encoders=n_encoders,
        beta=beta,
        recon_loss=args.recon_loss,
        epsilon_std=args.epsilon_std,
        nuisances=nuisances,
    )


@dataclass
class TrainData:
    """What a training run reads: a dataset for the trainer, arrays for encoding and grids."""

    dataset: Any
    filenames: list[str]  # rows of filenames.csv / encodings.csv
    encode_inputs: Any  # (N, K, C, S, S) or (N, C, S, S)
    grid_inputs: list[np.ndarray]
    targets: np.ndarray
    n_encoders: int
    nuisances: list[str]


def open_targets(
    source: str, image_size: int, channels: int, lazy: bool = False
) -> tuple[Any, list[str], list[str]]:
    """Canonical crops from a folder of images or a ``.npy`` crops file (read lazily).

    Returns the crops (an array, or a lazy store with the same indexing), the file names for
    encodings.csv and the image stems."""
    from .store import CropStore, LazyFolderTargets

    path = Path(source)
    if path.suffix == ".npy":
        store = CropStore(path)
        if store.shape[1:] != (channels, image_size, image_size):
            raise CLIError(
                f"{path} holds crops of shape {store.shape[1:]} (C, S, S); the model wants "
                f"({channels}, {image_size}, {image_size}): set --nchannel/--image_size"
            )
        names = [f"{path.stem}[{i}]" for i in range(len(store))]
        return store, names, names
    if lazy:
        tg = LazyFolderTargets(path, image_size, channels)
        return tg, tg.filenames, tg.names
    from .folders import FolderTargets

    tg = FolderTargets(path, image_size, channels)
    return tg.array, tg.filenames, tg.names


def load_train_data(args: argparse.Namespace, n_encoders_hint: int | None = None) -> TrainData:
    """Folder pairs (reference layout) or canonical targets with on-the-fly nuisances."""
    from .folders import FolderPairs

    size, channels = args.image_size, args.nchannel
    baseline = args.model in ("vae", "betavae")
    if args.targets:
        if args.data_dir or args.out1_dir:
            raise CLIError("use either --targets or --data_dir/--out1_dir, not both")
        from .transforms import NuisancePairs, get_nuisances

        names = [n.name for n in get_nuisances(args.nuisances)]
        crops, filenames, _ = open_targets(args.targets, size, channels, args.lazy)
        if baseline:
            from .transforms import NuisanceAutoencode

            ds = NuisanceAutoencode(crops, names, seed=args.seed or 0)
            k = 1
        else:
            ds = NuisancePairs(crops, names, seed=args.seed or 0)
            k = len(names)
        if n_encoders_hint is not None and n_encoders_hint != k:
            raise CLIError(
                f"the checkpoint's model has K={n_encoders_hint} encoders but --nuisances "
                f"{args.nuisances} gives {k}"
            )
        first = range(min(64, len(ds)))
        grid = [np.stack([ds[i][0][j].numpy() for i in first]) for j in range(k)]
        targets = np.stack([np.asarray(crops[i]) for i in first])
        return TrainData(ds, filenames, crops, grid, targets, k, names)

    dirs = _input_dirs(args)
    if not dirs:
        raise CLIError(
            "no training data: give --data_dir (+ --input2_dir, --out1_dir) or --targets"
        )
    if baseline:
        # The paper's baselines: a plain (beta-)VAE autoencodes the raw cells of --data_dir.
        ds = FolderPairs([dirs[0]], dirs[0], size, channels, in_memory=not args.lazy)
        k = 1
    else:
        if not args.out1_dir:
            raise CLIError("--out1_dir (the corrected target cells) is needed to train an ME-VAE")
        ds = FolderPairs(dirs, args.out1_dir, size, channels, in_memory=not args.lazy)
        k = len(dirs)
    if n_encoders_hint is not None and n_encoders_hint != k:
        raise CLIError(
            f"the checkpoint's model has K={n_encoders_hint} encoders but {k} input folder(s) were given"
        )
    grid = [ds.inputs_array(j)[:64] for j in range(k)]
    return TrainData(ds, ds.filenames, ds.pairs_array(), grid, ds.targets_array(), k, [])


def write_encodings_csv(
    path: Path, names: Sequence[str], model, inputs, verbose: int = 1, batch_size: int = 256
) -> Path:
    """Encode and stream rows to ``path``: header ``filename,z0,z1,...``, one row per image in
    ``names`` order.  Only one batch of latents is in memory at a time."""
    from .analysis import iter_encode_chunks

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    bar = _progress(len(names), "encoding", verbose, unit="cell")
    try:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["filename", *[f"z{i}" for i in range(model.config.latent_dim)]])
            for start, z in iter_encode_chunks(model, inputs, batch_size):
                for name, row in zip(names[start : start + len(z)], z, strict=True):
                    w.writerow([name, *[f"{v:.7g}" for v in row]])
                bar.update(len(z))
        os.replace(tmp, path)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
    return path


def write_run_outputs(save_dir: Path, model, data: TrainData, args: argparse.Namespace) -> None:
    """Everything the reference writes (except training.log, written while training)."""
    from .analysis import latent_walk, reconstruct
    from .figures import save_grid, save_latent_walk

    save_dir.mkdir(parents=True, exist_ok=True)
    with open(save_dir / "filenames.csv", "w", newline="") as fh:
        for f in data.filenames:
            fh.write(f + "\n")
    write_encodings_csv(
        save_dir / "encodings.csv", data.filenames, model, data.encode_inputs, args.verbose
    )
    ncols = max(1, args.num_save)
    n = ncols * ncols
    for k, imgs in enumerate(data.grid_inputs):
        save_grid(
            save_dir / ("input_images.png" if k == 0 else f"input{k + 1}_images.png"),
            imgs,
            n,
            ncols,
        )
    save_grid(save_dir / "Truth_images.png", data.targets[:n], n, ncols)
    first = data.encode_inputs[:n]
    save_grid(save_dir / "recon_images_final1.tif", reconstruct(model, first), n, ncols)
    save_latent_walk(
        save_dir / "latent_walk_final.png", latent_walk(model, max(2, args.latent_samp))
    )
    import torch

    from .training import CHECKPOINT_NAME, save_checkpoint

    models = save_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    if not (models / CHECKPOINT_NAME).exists():  # --phase load: keep the run self-contained
        save_checkpoint(models, model)

    for k, enc in enumerate(model.encoders):
        torch.save(enc.state_dict(), models / f"encoder{k + 1}.pt")
    torch.save(model.decoder.state_dict(), models / "decoder.pt")


# -- commands ----------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from .model import model_kind, size_scaled_beta
    from .training import (
        Trainer,
        TrainingDiverged,
        TrainOptions,
        check_compatible,
        load_checkpoint,
    )

    save_dir = Path(args.save_dir)
    ckpt = None
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
    elif args.phase == "load":
        raise CLIError("--phase load needs --checkpoint (a checkpoint file or a training save_dir)")
    if ckpt is not None:
        # the checkpoint defines the architecture; flags only describe the data
        args.image_size, args.nchannel = ckpt.config.image_size, ckpt.config.channels
        if ckpt.config.n_encoders == 1 and args.model == "mevae":
            args.model = {"VAE": "vae", "beta-VAE": "betavae"}[model_kind(ckpt.config)]
    data = load_train_data(args, ckpt.config.n_encoders if ckpt else None)
    if ckpt is not None:
        check_compatible(ckpt.config, args.image_size, args.nchannel, data.n_encoders)

    if args.phase == "load":
        model = ckpt.build_model(_device(args))
        log.info("loaded %s; encoding %d images without training", ckpt.path, len(data.filenames))
        write_run_outputs(save_dir, model, data, args)
        _say(
            args,
            f"encoded {len(data.filenames)} images with {ckpt.path} -> {save_dir / 'encodings.csv'}",
        )
        return 0

    rank, world = _dist_rank_world()
    config = ckpt.config if ckpt else _model_config(args, data.n_encoders, data.nuisances)
    if ckpt is not None and args.beta is not None:
        config.beta = args.beta
    opts = TrainOptions(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learn_rate=args.learn_rate,
        seed=args.seed,
        device=args.device,
        earlystop=args.earlystop,
        patience=args.patience,
        save_dir=save_dir if rank == 0 else None,
        num_workers=args.num_workers,
        distributed=args.distributed or world > 1,
        compile=args.compile,
        precision="bf16" if args.bf16 else args.precision,
        kl_warmup=args.kl_warmup,
    )
    trainer = Trainer(config, data.dataset, opts, resume=ckpt)
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        _say(
            args,
            f"training {_describe(config)} on {len(data.dataset)} pairs, device {trainer.device}"
            + PRECISION_NAMES[trainer.precision]
            + (f", {world} processes" if world > 1 else ""),
        )
    log_path = save_dir / "training.log"
    gen = trainer.run()
    bar = None
    logfh = None
    if rank == 0:
        new_log = ckpt is None or not log_path.exists()
        logfh = open(log_path, "w" if new_log else "a")  # noqa: SIM115 (closed in finally)
        if new_log:
            logfh.write("epoch\tloss\n")
            logfh.flush()
    try:
        while True:
            try:
                rep = next(gen)
            except StopIteration:
                break
            if rep.kind == "step" and rank == 0:
                if bar is None:
                    bar = _progress(
                        rep.steps_per_epoch,
                        f"epoch {rep.epoch + 1}/{rep.epochs}",
                        args.verbose,
                        "batch",
                    )
                bar.update(1)
                bar.set_postfix(loss=f"{rep.loss:.2f}", img_s=f"{rep.images_per_s:.0f}")
            elif rep.kind == "epoch" and rank == 0:
                if bar is not None:
                    bar.close()
                    bar = None
                logfh.write(f"{rep.epoch - 1}\t{rep.loss:.6f}\n")
                logfh.flush()
                _say(
                    args,
                    f"epoch {rep.epoch}/{rep.epochs}  loss {rep.loss:.3f}  (recon {rep.recon:.3f}, "
                    f"KL {rep.kl:.3f})  {rep.images_per_s:.0f} images/s",
                )
            elif rep.kind == "end" and rank == 0:
                _say(args, rep.message)
                m = trainer.model_unwrapped
                if m.activity_measured and m.n_active:
                    _say(
                        args,
                        f"latent dimensions in use: {m.n_active} of {m.config.latent_dim} "
                        "(the others are 0 in the encodings)",
                    )
                elif m.activity_measured:
                    size = m.config.image_size
                    _say(
                        args,
                        "latent dimensions in use: 0: the model has not learned to use its "
                        "latent space yet; the encodings keep every dimension. Train longer, "
                        f"or lower --beta: at image size {size}, --beta "
                        f"{size_scaled_beta(1.0, size):g} keeps the reference's balance "
                        "between reconstruction and KL (its 1 is meant for 128 px)",
                    )
    except TrainingDiverged as err:
        raise CLIError(str(err)) from err
    except KeyboardInterrupt:
        gen.close()  # saves the checkpoint of what was learned
        _say(args, f"interrupted; model kept in {save_dir / 'models'}")
        return 130
    finally:
        if bar is not None:
            bar.close()
        if logfh is not None:
            logfh.close()
    if rank == 0:
        write_run_outputs(save_dir, trainer.model_unwrapped, data, args)
        _say(args, f"outputs written to {save_dir}")
    trainer.close()
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from .folders import FolderPairs
    from .training import check_compatible, load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    cfg = ckpt.config
    model = ckpt.build_model(_device(args))
    if args.targets:
        inputs, names, _ = open_targets(args.targets, cfg.image_size, cfg.channels, args.lazy)
    else:
        dirs = _input_dirs(args)
        if not dirs:
            raise CLIError(
                "give --data_dir (and --input2_dir ... for one folder per encoder) or --targets"
            )
        ds = FolderPairs(dirs, dirs[0], cfg.image_size, cfg.channels, in_memory=not args.lazy)
        if len(dirs) == 1:
            inputs = ds.inputs_array(0)  # every encoder sees the same cell
        else:
            check_compatible(cfg, cfg.image_size, cfg.channels, len(dirs))
            inputs = ds.pairs_array()
        names = ds.filenames
    out = write_encodings_csv(Path(args.out), names, model, inputs, args.verbose, args.batch_size)
    _say(args, f"encoded {len(names)} images -> {out}")
    return 0


def cmd_pairs(args: argparse.Namespace) -> int:
    import tifffile

    from .cells import extract_cells
    from .transforms import export_pairs, get_nuisances

    image = tifffile.imread(args.image)
    labels = tifffile.imread(args.labels)
    names = [n.name for n in get_nuisances(args.nuisances)]
    bar = _progress(0, "cropping cells", args.verbose, "cell")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        cells = extract_cells(
            image,
            labels,
            size=args.size,
            channel_axis=args.channel_axis,
            scale=args.scale,
            normalize=None if args.normalize == "none" else args.normalize,
            min_area=args.min_area,
            max_area=args.max_area,
            border=args.border,
            progress=progress,
        )
    finally:
        bar.close()
    out = Path(args.out)
    if len(cells.crops) == 0:
        raise CLIError(
            "no cell could be cropped; see the skip reasons: " + _skip_summary(cells.table)
        )
    files = export_pairs(cells.crops, out, names, seed=args.seed)
    table = cells.table.copy()
    table.insert(0, "filename", "")
    kept = table["crop_index"] >= 0
    table.loc[kept, "filename"] = [Path(files[i]).name for i in table.loc[kept, "crop_index"]]
    table.to_csv(out / "cells.csv", index=False)
    if args.npy:
        cells.save(out / "crops.npy")
    _say(
        args,
        f"{int(kept.sum())} cells cropped ({int((~kept).sum())} skipped) -> {out}; "
        f"train with: mevae train --data_dir {out / 'InputImages1'} "
        + " ".join(
            f"--{'input' + str(k + 1) + '_dir'} {out / f'InputImages{k + 1}'}"
            for k in range(1, len(names))
        )
        + f" --out1_dir {out / 'OutputImages'} --image_size {args.size}",
    )
    return 0


def _skip_summary(table) -> str:
    if "skip_reason" not in table or table.empty:
        return "no cells in the label image"
    counts = table.loc[table["skip_reason"] != "", "skip_reason"].value_counts()
    return ", ".join(f"{r}: {c}" for r, c in counts.items())


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .analysis import invariance_report
    from .training import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    model = ckpt.build_model("cpu")
    all_crops, _, stems = open_targets(args.targets, ckpt.config.image_size, ckpt.config.channels)
    sel = slice(args.first, args.last)
    crops = np.asarray(all_crops[sel])
    if len(crops) < 10:
        raise CLIError(f"only {len(crops)} cell(s) selected; the report needs at least 10")
    classes = None
    if args.classes:
        import pandas as pd

        table = pd.read_csv(args.classes)
        lookup = dict(
            zip(table["filename"].map(lambda s: Path(str(s)).stem), table["class"], strict=True)
        )
        missing = [n for n in stems[sel] if n not in lookup]
        if missing:
            raise CLIError(f"--classes lacks {len(missing)} cell(s), e.g. {missing[:5]}")
        classes = np.array([lookup[n] for n in stems[sel]])
    report = invariance_report(model, crops, classes=classes, seed=args.seed)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(
        Path(args.out),
        epochs=args.epochs,
        n_cells=args.cells,
        size=args.size,
        seed=args.seed,
        verbose=args.verbose,
    )
    return 0


# -- plumbing ----------------------------------------------------------------------------------
def _describe(cfg) -> str:
    from .model import model_kind

    return (
        f"{model_kind(cfg)} (K={cfg.n_encoders}, {cfg.channels} channel(s), {cfg.image_size} px, "
        f"latent {cfg.latent_dim}, beta {cfg.beta:g})"
    )


def _device(args: argparse.Namespace):
    from .training import select_device

    return select_device(getattr(args, "device", "auto"))


def _dist_rank_world() -> tuple[int, int]:
    """This process's rank and the number of processes (set by torchrun; 0 and 1 otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world


def _say(args: argparse.Namespace, text: str) -> None:
    if getattr(args, "verbose", 1) > 0:
        print(text, file=sys.stderr, flush=True)


COMMANDS = {
    "train": cmd_train,
    "encode": cmd_encode,
    "pairs": cmd_pairs,
    "evaluate": cmd_evaluate,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="mevae: %(message)s")
    from .training import CheckpointError

    start = time.perf_counter()
    try:
        code = COMMANDS[args.command](args)
    except (CLIError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"mevae {args.command}: error: {err}", file=sys.stderr)
        return 2
    log.info("done in %.1f s", time.perf_counter() - start)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
