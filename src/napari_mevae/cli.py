"""The ``mevae`` command: the reference's flags and folder layout, its outputs, its defects fixed.

mevae train   --data_dir InputImages1/ --input2_dir InputImages2/ --out1_dir OutputImages/ ...
mevae train   --targets OutputImages/ --nuisances rotation,polarity ...   (fresh pairs each epoch)
mevae encode  --checkpoint Outputs/ --data_dir NewCells/ --out encodings.csv
mevae pairs   --image IMG.tif --labels LABELS.tif --out DIR
mevae evaluate --checkpoint Outputs/ --targets OutputImages/ --out report.json
mevae export  --checkpoint Outputs/ --out model.zip --authors "..."   (BioImage Model Zoo)
mevae demo    [--out mevae-demo]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .config import MODEL_KINDS, PRECISIONS, CheckpointError, InputError, TrainingDiverged

log = logging.getLogger("mevae")

#: how the run's precision (config.PRECISIONS after "auto") is announced
PRECISION_NAMES = {
    "float32": " (float32)",
    "bf16": " (bf16 autocast)",
    "fp16": " (float16 autocast, loss scaling)",
}


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
        choices=tuple(MODEL_KINDS.values()),
        default="mevae",
        help="mevae (K encoders), vae (standard VAE baseline) or betavae (beta-VAE baseline)",
    )
    g.add_argument(
        "--beta",
        type=float,
        default=None,
        help="KL weight, exactly as given (default: the reference's balance at this image size, "
        "(S/128)^2; 4x that for betavae)",
    )
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
    g.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs (default: a budget that fits the data: 30 passes over it, but at least "
        "40,000 and at most 400,000 images seen)",
    )
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
        "--patience",
        type=int,
        default=8,
        help="early-stopping patience in epochs (default 8; at least 5,000 images on small sets)",
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
        "--threads", type=int, default=None, help="torch threads (default: one per core)"
    )
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
        choices=PRECISIONS,
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

    p = sub.add_parser(
        "export",
        help="write a trained model as a BioImage Model Zoo package (.zip), validated and tested",
    )
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint file, training save_dir or package"
    )
    p.add_argument("--out", required=True, help="the package to write (.zip)")
    p.add_argument(
        "--targets",
        help="canonical crops of the training data (a folder of images or a crops .npy) for the "
        "test tensors and the cover (default: the run's Truth_images.png)",
    )
    p.add_argument("--name", help="the model's name (letters, digits, spaces, _+-())")
    p.add_argument(
        "--authors",
        help='comma-separated names ("Ada Lovelace, Alan Turing"; ";" if names hold ",")',
    )
    p.add_argument("--description", help="one or two sentences on the model")
    p.add_argument("--license", default="CC-BY-4.0", help="SPDX licence id (default CC-BY-4.0)")
    p.add_argument(
        "--tags", default="", help="extra comma-separated tags, e.g. fluorescence-light-microscopy"
    )
    p.add_argument(
        "--no-test", action="store_true", help="skip bioimageio.core's test run (validation stays)"
    )
    p.add_argument("--verbose", type=int, default=1)

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
        raise InputError(
            "encoder inputs must be given in order: --data_dir, then --input2_dir, then --input3_dir"
        )
    return dirs + list(args.input_dir or [])


def _nuisances(text: str) -> list[str]:
    from .nuisances import get_nuisances

    return [n.name for n in get_nuisances(text)]


# -- commands ----------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from . import workflow
    from .checkpoints import check_compatible, load_checkpoint
    from .config import MODEL_KINDS, model_kind
    from .training import Trainer, TrainOptions

    save_dir = Path(args.save_dir)
    ckpt = None
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
    elif args.phase == "load":
        raise InputError(
            "--phase load needs --checkpoint (a checkpoint file or a training save_dir)"
        )
    if ckpt is not None:
        # the checkpoint defines the architecture; flags only describe the data
        args.image_size, args.nchannel = ckpt.config.image_size, ckpt.config.channels
        if ckpt.config.n_encoders == 1 and args.model == "mevae":
            args.model = MODEL_KINDS[model_kind(ckpt.config)]
    nuisances = _nuisances(args.nuisances) if args.targets else []
    data = workflow.load_train_data(
        model=args.model,
        image_size=args.image_size,
        channels=args.nchannel,
        targets=args.targets,
        nuisances=nuisances,
        input_dirs=[] if args.targets else _input_dirs(args),
        target_dir=args.out1_dir,
        lazy=args.lazy,
        seed=args.seed or 0,
    )
    if ckpt is not None:
        if ckpt.config.n_encoders != data.n_encoders:
            given = f"--nuisances {args.nuisances} gives" if args.targets else "the data has"
            raise InputError(
                f"the checkpoint's model has K={ckpt.config.n_encoders} encoders but {given} "
                f"{data.n_encoders} input(s)"
            )
        check_compatible(ckpt.config, args.image_size, args.nchannel, data.n_encoders)

    if args.phase == "load":
        model = ckpt.build_model(_device(args))
        log.info("loaded %s; encoding %d images without training", ckpt.path, len(data.filenames))
        workflow.write_run_outputs(
            save_dir, model, data, args.num_save, args.latent_samp, args.verbose
        )
        _say(
            args,
            f"encoded {len(data.filenames)} images with {ckpt.path} -> {save_dir / 'encodings.csv'}",
        )
        return 0

    rank, world = _dist_rank_world()
    if ckpt is not None:
        config = ckpt.config
        if args.beta is not None:
            config.beta = args.beta
    else:
        config = workflow.build_config(
            args.model,
            image_size=args.image_size,
            channels=args.nchannel,
            nuisances=data.nuisances,
            n_encoders=data.n_encoders,
            beta=args.beta,
            latent_dim=args.latent_dim,
            inter_dim=args.inter_dim,
            nlayers=args.nlayers,
            nfilters=args.nfilters,
            kernel_size=args.kernel_size,
            recon_loss=args.recon_loss,
            epsilon_std=args.epsilon_std,
        )
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
        threads=args.threads,
    )
    trainer = Trainer(ckpt.build_model() if ckpt else config, data.dataset, opts, resume=ckpt)
    if rank == 0:
        _say(
            args,
            f"training {_describe(config)} on {len(data.dataset)} pairs, device {trainer.device}"
            + PRECISION_NAMES[trainer.precision]
            + (f", {world} processes" if world > 1 else ""),
        )
    reports = workflow.run_training(trainer, save_dir / "training.log" if rank == 0 else None)
    bar = None
    try:
        for rep in reports:
            if rank != 0:
                continue
            if rep.kind == "step":
                if bar is None:
                    desc = f"epoch {rep.epoch + 1}/{rep.epochs}"
                    bar = _progress(rep.steps_per_epoch, desc, args.verbose, "batch")
                bar.update(1)
                bar.set_postfix(loss=f"{rep.loss:.2f}", img_s=f"{rep.images_per_s:.0f}")
            elif rep.kind == "epoch":
                if bar is not None:
                    bar.close()
                    bar = None
                _say(
                    args,
                    f"epoch {rep.epoch}/{rep.epochs}  loss {rep.loss:.3f}  (recon {rep.recon:.3f}, "
                    f"KL {rep.kl:.3f})  {rep.images_per_s:.0f} images/s",
                )
            elif rep.kind == "end":
                _say(args, rep.message)
                _say(args, workflow.dims_in_use(trainer.model_unwrapped))
    except TrainingDiverged as err:
        raise InputError(str(err)) from err
    except KeyboardInterrupt:
        reports.close()  # saves the checkpoint of what was learned
        _say(args, f"interrupted; model kept in {save_dir / 'models'}")
        return 130
    finally:
        if bar is not None:
            bar.close()
    if rank == 0:
        workflow.write_run_outputs(
            save_dir, trainer.model_unwrapped, data, args.num_save, args.latent_samp, args.verbose
        )
        _say(args, f"outputs written to {save_dir}")
    trainer.close()
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from .checkpoints import check_compatible, load_checkpoint
    from .folders import FolderPairs
    from .workflow import open_targets, write_encodings_csv

    ckpt = load_checkpoint(args.checkpoint)
    cfg = ckpt.config
    model = ckpt.build_model(_device(args))
    if args.targets:
        inputs, names, _ = open_targets(args.targets, cfg.image_size, cfg.channels, args.lazy)
    else:
        dirs = _input_dirs(args)
        if not dirs:
            raise InputError(
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

    from .config import CropSettings
    from .folders import export_pairs
    from .workflow import crop_cells

    image = tifffile.imread(args.image)
    labels = tifffile.imread(args.labels)
    names = _nuisances(args.nuisances)
    settings = CropSettings(
        size=args.size,
        channel_axis=args.channel_axis,
        scale=args.scale,
        normalize=args.normalize,
        min_area=args.min_area,
        max_area=args.max_area,
        border=args.border,
    )
    bar = _progress(0, "cropping cells", args.verbose, "cell")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        cells = crop_cells(image, labels, settings, progress=progress)
    finally:
        bar.close()
    out = Path(args.out)
    if len(cells.crops) == 0:
        summary = ", ".join(f"{r}: {c}" for r, c in cells.skip_summary().items())
        raise InputError("no cell could be cropped; see the skip reasons: " + summary)
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


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .checkpoints import load_checkpoint
    from .evaluation import invariance_report
    from .workflow import open_targets

    ckpt = load_checkpoint(args.checkpoint)
    model = ckpt.build_model("cpu")
    all_crops, _, stems = open_targets(args.targets, ckpt.config.image_size, ckpt.config.channels)
    sel = slice(args.first, args.last)
    crops = np.asarray(all_crops[sel])
    if len(crops) < 10:
        raise InputError(f"only {len(crops)} cell(s) selected; the report needs at least 10")
    classes = None
    if args.classes:
        import pandas as pd

        table = pd.read_csv(args.classes)
        lookup = dict(
            zip(table["filename"].map(lambda s: Path(str(s)).stem), table["class"], strict=True)
        )
        missing = [n for n in stems[sel] if n not in lookup]
        if missing:
            raise InputError(f"--classes lacks {len(missing)} cell(s), e.g. {missing[:5]}")
        classes = np.array([lookup[n] for n in stems[sel]])
    report = invariance_report(model, crops, classes=classes, seed=args.seed)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .modelzoo import export_package

    result = export_package(
        args.checkpoint,
        args.out,
        targets=args.targets,
        name=args.name,
        authors=args.authors,
        description=args.description,
        license=args.license,
        tags=[t.strip() for t in args.tags.split(",") if t.strip()],
        test=not args.no_test,
    )
    for warning in result.warnings:
        _say(args, f"bioimageio.spec warns: {warning}")
    tested = (
        f", bioimageio.core test {result.test}" if result.test else ", not test-run (--no-test)"
    )
    _say(
        args,
        f"wrote {result.path}: bioimageio.spec {result.validation}{tested}; test tensors from "
        f"{result.crops_from}; load it with --checkpoint {result.path}",
    )
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
    from .config import model_kind

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
    "export": cmd_export,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="mevae: %(message)s")
    start = time.perf_counter()
    try:
        code = COMMANDS[args.command](args)
    except (InputError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"mevae {args.command}: error: {err}", file=sys.stderr)
        return 2
    log.info("done in %.1f s", time.perf_counter() - start)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
