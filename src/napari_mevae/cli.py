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
import contextlib
import json
import logging
import os
import re
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np

from .config import (
    MAX_CROP_SIZE,
    MAX_LATENT_SAMP,
    MAX_NUM_SAVE,
    MODEL_KINDS,
    PRECISIONS,
    CheckpointError,
    InputError,
    TrainingDiverged,
)

log = logging.getLogger("mevae")

#: how the run's precision (config.PRECISIONS after "auto") is announced
PRECISION_NAMES = {
    "float32": " (float32)",
    "bf16": " (bf16 autocast)",
    "fp16": " (float16 autocast, loss scaling)",
}


# -- argument parsing ------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (``mevae train: error: ...``), like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Given(argparse.Action):
    """Store the value and note that the user gave it: resuming a checkpoint refuses the
    architecture flags that differ from it, but not their defaults."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


def _int_in(low: int, high: int | None = None):
    """An argparse type: an integer from ``low`` (to ``high``), refused in one line otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def _bool01(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0 or 1, got {text!r}")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (reference flags and defaults)")
    g.add_argument(
        "--image_size",
        type=int,
        default=128,
        action=_Given,
        help="crop side S in pixels (default 128)",
    )
    g.add_argument(
        "--nchannel", type=int, default=1, action=_Given, help="image channels (default 1)"
    )
    g.add_argument(
        "--latent_dim",
        type=int,
        default=128,
        action=_Given,
        help="latent dimensions (default 128)",
    )
    g.add_argument(
        "--nlayers", type=int, default=3, action=_Given, help="conv layers per encoder (default 3)"
    )
    g.add_argument(
        "--inter_dim", type=int, default=128, action=_Given, help="dense layer width (default 128)"
    )
    g.add_argument(
        "--nfilters",
        type=int,
        default=16,
        action=_Given,
        help="filters of the first conv (default 16)",
    )
    g.add_argument(
        "--kernel_size", type=int, default=3, action=_Given, help="conv kernel size (default 3)"
    )
    g.add_argument(
        "--epsilon_std",
        type=float,
        default=1.0,
        action=_Given,
        help="sampling noise std (default 1.0)",
    )
    g.add_argument(
        "--model",
        choices=tuple(MODEL_KINDS.values()),
        default="mevae",
        action=_Given,
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
        "--recon_loss",
        choices=("bce", "mse"),
        default="bce",
        action=_Given,
        help="reconstruction loss",
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
            action=_Given,
            help="with --targets: nuisances to remove, one encoder each (default rotation,polarity)",
        )


def _add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument(
        "--batch_size", type=_int_in(1), default=50, help="GLOBAL batch size (default 50)"
    )
    g.add_argument(
        "--epochs",
        type=_int_in(0),
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
        type=_int_in(1),
        default=8,
        help="early-stopping patience in epochs (default 8; at least 5,000 images on small sets)",
    )
    g.add_argument(
        "--verbose", type=int, default=1, help="0 = quiet, 1 = progress bars (default 1)"
    )
    g.add_argument(
        "--latent_samp",
        type=_int_in(2, MAX_LATENT_SAMP),
        default=10,
        help=f"steps of the latent walk (default 10, at most {MAX_LATENT_SAMP})",
    )
    g.add_argument(
        "--num_save",
        type=_int_in(1, MAX_NUM_SAVE),
        default=8,
        help=f"images per row of the saved grids (default 8, at most {MAX_NUM_SAVE})",
    )
    g.add_argument("--image_res", type=int, default=8, help="accepted for compatibility; unused")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible runs")
    g.add_argument(
        "--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps"
    )
    g.add_argument("--num_workers", type=_int_in(0), default=0, help="data-loader worker processes")
    g.add_argument(
        "--threads", type=_int_in(1), default=None, help="torch threads (default: one per core)"
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
    parser = _Parser(
        prog="mevae",
        description="Multi-Encoder VAE features for single-cell images (napari-mevae).",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"napari-mevae {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the Python traceback of an error instead of one line (or set MEVAE_DEBUG=1)",
    )
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
    p.add_argument("--batch_size", type=_int_in(1), default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--lazy", action="store_true", help="read images as needed (large data sets)")
    p.add_argument("--verbose", type=int, default=1)

    p = sub.add_parser("pairs", help="crop segmented cells into the reference folder layout")
    p.add_argument(
        "--image", required=True, help="intensity image (TIFF): (Y,X), (C,Y,X) or (Y,X,C)"
    )
    p.add_argument("--labels", required=True, help="label image (TIFF) of segmented cells, (Y,X)")
    p.add_argument("--out", required=True, help="output folder (new or empty; see --overwrite)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="--out may hold an earlier `mevae pairs` output: it is replaced (InputImages*/, "
        "OutputImages/, cells.csv, crops.npy, crops.csv) once the new one is complete; other "
        "files there are kept",
    )
    p.add_argument(
        "--size",
        type=_int_in(4, MAX_CROP_SIZE),
        default=64,
        help="crop size in pixels (default 64)",
    )
    p.add_argument("--channel-axis", type=int, default=None, help="axis of channels in --image")
    p.add_argument("--nuisances", default="rotation,polarity", help="one encoder input folder each")
    p.add_argument(
        "--scale", choices=("fixed", "fit"), default="fixed", help="pixel scale or fit the cell"
    )
    p.add_argument("--normalize", choices=("percentile", "max", "none"), default="percentile")
    p.add_argument("--min-area", type=_int_in(0), default=0)
    p.add_argument("--max-area", type=_int_in(1), default=None)
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
    p.add_argument("--first", type=_int_in(0), default=0, help="first cell (by natural name order)")
    p.add_argument("--last", type=_int_in(1), default=None, help="one past the last cell")
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
    p.add_argument("--epochs", type=_int_in(0), default=60)
    p.add_argument("--cells", type=_int_in(20, 100_000), default=600)
    p.add_argument("--size", type=_int_in(8, 512), default=32)
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
    from .outputs import DirLock, check_output_dir
    from .training import Trainer

    save_dir = check_output_dir(Path(args.save_dir), "--save_dir")
    rank, world = _dist_rank_world()
    if args.distributed and not {"RANK", "WORLD_SIZE"} <= os.environ.keys():
        raise InputError(
            "--distributed runs under torchrun: torchrun --nproc_per_node=N -m napari_mevae "
            "train ...; without torchrun, leave --distributed out"
        )
    device = _device(args)
    ckpt = None
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
    elif args.phase == "load":
        raise InputError(
            "--phase load needs --checkpoint (a checkpoint file or a training save_dir)"
        )
    if ckpt is not None:
        _refuse_changed_architecture(args, ckpt.config)
        # the checkpoint defines the architecture; flags only describe the data
        args.image_size, args.nchannel = ckpt.config.image_size, ckpt.config.channels
        if ckpt.config.n_encoders == 1 and args.model == "mevae":
            args.model = MODEL_KINDS[model_kind(ckpt.config)]
    nuisances = _nuisances(args.nuisances) if args.targets else []
    opts = None
    if args.phase == "train":  # every setting checked before any image is read
        opts = _settings(lambda: _train_options(args, save_dir if rank == 0 else None, world))
        if ckpt is None:
            _settings(lambda: _train_config(args, nuisances, k=None))
    lock = DirLock(save_dir, "mevae train") if rank == 0 else contextlib.nullcontext()
    with lock:
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
                    f"the checkpoint's model has K={ckpt.config.n_encoders} encoders but "
                    f"{given} {data.n_encoders} input(s)"
                )
            check_compatible(ckpt.config, args.image_size, args.nchannel, data.n_encoders)

        if args.phase == "load":
            model = ckpt.build_model(device)
            log.info(
                "loaded %s; encoding %d images without training", ckpt.path, len(data.filenames)
            )
            workflow.write_run_outputs(
                save_dir, model, data, args.num_save, args.latent_samp, args.verbose
            )
            _say(
                args,
                f"encoded {len(data.filenames)} images with {ckpt.path} -> "
                f"{save_dir / 'encodings.csv'}",
            )
            return 0

        if ckpt is not None:
            config = ckpt.config
            old = (config.beta, config.epsilon_std)
            if args.beta is not None:
                config.beta = args.beta
            if "epsilon_std" in _given(args):
                config.epsilon_std = args.epsilon_std
            _settings(config.validate)
        else:
            config = _settings(lambda: _train_config(args, data.nuisances, data.n_encoders))
        trainer = Trainer(ckpt.build_model() if ckpt else config, data.dataset, opts, resume=ckpt)
        if rank == 0:
            if ckpt is not None:
                _say(args, _resume_line(ckpt, opts, old))
            _say(
                args,
                f"training {_describe(config)} on {len(data.dataset)} pairs, device "
                f"{trainer.device}"
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
                        f"epoch {rep.epoch}/{rep.epochs}  loss {rep.loss:.3f}  (recon "
                        f"{rep.recon:.3f}, KL {rep.kl:.3f})  {rep.images_per_s:.0f} images/s",
                    )
                elif rep.kind == "end":
                    _say(args, rep.message)
                    _say(args, workflow.dims_in_use(trainer.model_unwrapped))
        except TrainingDiverged as err:
            raise InputError(str(err)) from err
        except KeyboardInterrupt:
            reports.close()  # between steps: the trainer saves what it learned now
            if bar is not None:
                bar.close()
                bar = None
            _interrupted(args, _kept_on_interrupt(trainer, save_dir))
            return 130
        finally:
            if bar is not None:
                bar.close()
        if rank == 0:
            try:
                workflow.write_run_outputs(
                    save_dir,
                    trainer.model_unwrapped,
                    data,
                    args.num_save,
                    args.latent_samp,
                    args.verbose,
                )
            except KeyboardInterrupt:
                _interrupted(
                    args,
                    f"the trained model is saved in {trainer.last_checkpoint}; the other "
                    f"outputs in {save_dir} were left as they were",
                )
                return 130
            _say(args, f"outputs written to {save_dir}")
    trainer.close()
    return 0


#: MEVAEConfig fields and TrainOptions settings -> the flags that set them, for messages
FLAGS = {
    "image_size": "--image_size",
    "channels": "--nchannel",
    "latent_dim": "--latent_dim",
    "inter_dim": "--inter_dim",
    "nlayers": "--nlayers",
    "nfilters": "--nfilters",
    "kernel_size": "--kernel_size",
    "epsilon_std": "--epsilon_std",
    "recon_loss": "--recon_loss",
    "beta": "--beta",
    "epochs": "--epochs",
    "batch_size": "--batch_size",
    "learn_rate": "--learn_rate",
    "patience": "--patience",
    "precision": "--precision",
    "kl_warmup": "--kl_warmup",
    "threads": "--threads",
}


def _settings(check):
    """Run a settings check; its ValueError becomes one line naming the flags, not the fields."""
    try:
        return check()
    except InputError:
        raise
    except ValueError as err:
        text = re.sub(
            r"(?<![\w-])(" + "|".join(FLAGS) + r")(?![\w-])",
            lambda m: FLAGS[m.group(1)],
            str(err),
        )
        raise InputError(text) from err


def _train_config(args: argparse.Namespace, nuisances: list[str], k: int | None):
    """The new model's config from the flags (``k`` None: as many encoders as the flags give,
    to check the settings before the data is read)."""
    from . import workflow

    if k is None:
        k = max(1, len(nuisances) if args.targets else len(_input_dirs(args)))
    return workflow.build_config(
        args.model,
        image_size=args.image_size,
        channels=args.nchannel,
        nuisances=nuisances,
        n_encoders=k,
        beta=args.beta,
        latent_dim=args.latent_dim,
        inter_dim=args.inter_dim,
        nlayers=args.nlayers,
        nfilters=args.nfilters,
        kernel_size=args.kernel_size,
        recon_loss=args.recon_loss,
        epsilon_std=args.epsilon_std,
    )


def _train_options(args: argparse.Namespace, save_dir: Path | None, world: int):
    from .config import TrainOptions

    opts = TrainOptions(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learn_rate=args.learn_rate,
        seed=args.seed,
        device=args.device,
        earlystop=args.earlystop,
        patience=args.patience,
        save_dir=save_dir,
        num_workers=args.num_workers,
        distributed=args.distributed or world > 1,
        compile=args.compile,
        precision="bf16" if args.bf16 else args.precision,
        kl_warmup=args.kl_warmup,
        threads=args.threads,
    )
    opts.validate()
    return opts


def _given(args: argparse.Namespace) -> set[str]:
    return set(getattr(args, "given", ()))


#: flags that fix a model's architecture -> its config field
ARCHITECTURE_FLAGS = {
    "image_size": "image_size",
    "nchannel": "channels",
    "latent_dim": "latent_dim",
    "inter_dim": "inter_dim",
    "nlayers": "nlayers",
    "nfilters": "nfilters",
    "kernel_size": "kernel_size",
    "recon_loss": "recon_loss",
}


def _refuse_changed_architecture(args: argparse.Namespace, cfg) -> None:
    """A checkpoint's model keeps its architecture: flags given that differ are refused, in one
    line (they were silently ignored)."""
    given = _given(args)
    bad = [
        f"--{flag} {getattr(args, flag)} (checkpoint: {getattr(cfg, field)})"
        for flag, field in ARCHITECTURE_FLAGS.items()
        if flag in given and getattr(args, flag) != getattr(cfg, field)
    ]
    if "model" in given and (args.model == "mevae") != (cfg.n_encoders > 1):
        bad.append(f"--model {args.model} (checkpoint: K={cfg.n_encoders} encoder(s))")
    if "nuisances" in given and args.targets and cfg.nuisances:
        names = _nuisances(args.nuisances)
        if names != list(cfg.nuisances):
            bad.append(f"--nuisances {','.join(names)} (checkpoint: {','.join(cfg.nuisances)})")
    if bad:
        raise InputError(
            "the checkpoint fixes the model, which these flags would change: "
            + "; ".join(bad)
            + ". Leave them out, or train a new model without --checkpoint"
        )


def _resume_line(ckpt, opts, old: tuple[float, float]) -> str:
    """One line on what a resumed run changes: the learning rate (applied to the saved
    optimizer state), beta and epsilon_std."""
    groups = (ckpt.optimizer_state or {}).get("param_groups") or [{}]
    saved_lr = groups[0].get("lr")
    lr = f"learning rate {opts.learn_rate:g}"
    if saved_lr is None:
        lr += " (no saved optimizer state: a fresh one)"
    elif saved_lr != opts.learn_rate:
        lr += f" (was {saved_lr:g}; the saved optimizer state is kept)"
    else:
        lr += " (the saved optimizer state is kept)"
    parts = [lr]
    for name, before, now in zip(
        ("beta", "epsilon_std"), old, (ckpt.config.beta, ckpt.config.epsilon_std), strict=True
    ):
        if before != now:
            parts.append(f"{name} {now:g} (was {before:g})")
    return f"resuming {ckpt.path} after epoch {ckpt.epoch}: " + ", ".join(parts)


def _kept_on_interrupt(trainer, save_dir: Path) -> str:
    """What Ctrl-C kept, in words."""
    if trainer.steps_done and trainer.last_checkpoint is not None:
        done = trainer._completed_epochs()
        return (
            f"the weights at the interrupt are saved in {trainer.last_checkpoint} (after "
            f"{trainer.steps_done} training step(s); its epoch count stays {done}, so a "
            f"resumed run redoes the interrupted epoch: --checkpoint {shlex.quote(str(save_dir))}"
            "); encodings.csv and the pictures were not written"
        )
    return "interrupted before the first training step: nothing was written"


def _interrupted(args: argparse.Namespace, what: str) -> None:
    print(f"mevae {args.command}: interrupted: {what}", file=sys.stderr, flush=True)


def cmd_encode(args: argparse.Namespace) -> int:
    from .checkpoints import check_compatible, load_checkpoint
    from .folders import FolderPairs
    from .outputs import output_target
    from .workflow import open_targets, write_encodings_csv

    output_target(args.out)  # a device, FIFO or folder is refused before any work
    device = _device(args)
    ckpt = load_checkpoint(args.checkpoint)
    cfg = ckpt.config
    model = ckpt.build_model(device)
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
    from .config import CropSettings
    from .folders import read_raw_image
    from .outputs import LOCK_NAME, DirLock, check_output_dir
    from .workflow import crop_cells, write_pairs

    out = check_output_dir(Path(args.out), "--out")
    names = _nuisances(args.nuisances)
    settings = _settings(
        lambda: CropSettings(
            size=args.size,
            channel_axis=args.channel_axis,
            scale=args.scale,
            normalize=args.normalize,
            min_area=args.min_area,
            max_area=args.max_area,
            border=args.border,
        ).check()
    )

    def refuse_non_empty() -> None:
        held = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) if out.is_dir() else []
        if held and not args.overwrite:
            shown = ", ".join(held[:5]) + (f" ... ({len(held)} entries)" if len(held) > 5 else "")
            raise InputError(
                f"--out {out} is not empty ({shown}): give a new or empty folder, or --overwrite "
                "to replace an earlier `mevae pairs` output there (other files are kept)"
            )

    refuse_non_empty()  # before the work, and again under the lock
    image = read_raw_image(args.image)
    labels = read_raw_image(args.labels)
    if labels.ndim != 2:
        raise InputError(
            f"--labels {args.labels} has shape {labels.shape}; mevae pairs takes one (Y, X) label "
            "image (a time or z stack: one plane at a time)"
        )
    if image.ndim not in (2, 3):
        raise InputError(
            f"--image {args.image} has shape {image.shape}; expected (Y, X), (C, Y, X) or (Y, X, C)"
        )
    if args.channel_axis is not None and not -image.ndim <= args.channel_axis < image.ndim:
        raise InputError(
            f"--channel-axis {args.channel_axis} is out of range for --image of shape {image.shape}"
        )
    bar = _progress(0, "cropping cells", args.verbose, "cell")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        cells = crop_cells(image, labels, settings, progress=progress)
    except ValueError as err:  # the flag, not the Python argument
        raise InputError(re.sub(r"\bchannel_axis\b", "--channel-axis", str(err))) from err
    finally:
        bar.close()
    if len(cells.crops) == 0:
        summary = ", ".join(f"{r}: {c}" for r, c in cells.skip_summary().items())
        raise InputError("no cell could be cropped; see the skip reasons: " + summary)
    with DirLock(out, "mevae pairs"):
        refuse_non_empty()
        table = write_pairs(out, cells, names, seed=args.seed, npy=args.npy)
    kept = table["crop_index"] >= 0
    inputs = " ".join(
        f"--input{k + 1}_dir {shlex.quote(str(out / f'InputImages{k + 1}'))}"
        for k in range(1, len(names))
    )
    _say(
        args,
        f"{int(kept.sum())} cells cropped ({int((~kept).sum())} skipped) -> {out}; "
        f"train with: mevae train --data_dir {shlex.quote(str(out / 'InputImages1'))} "
        + (inputs + " " if inputs else "")
        + f"--out1_dir {shlex.quote(str(out / 'OutputImages'))} --image_size {args.size}",
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .checkpoints import load_checkpoint
    from .evaluation import invariance_report
    from .outputs import atomic_write, output_target
    from .workflow import open_targets

    if args.out:
        output_target(args.out)
    ckpt = load_checkpoint(args.checkpoint)
    model = ckpt.build_model("cpu")
    all_crops, _, stems = open_targets(args.targets, ckpt.config.image_size, ckpt.config.channels)
    sel = slice(args.first, args.last)
    crops = np.asarray(all_crops[sel])
    if len(crops) < 10:
        raise InputError(f"only {len(crops)} cell(s) selected; the report needs at least 10")
    classes = None
    if args.classes:
        classes = _read_classes(args.classes, stems[sel])
    report = invariance_report(model, crops, classes=classes, seed=args.seed)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with atomic_write(args.out) as fh:
            fh.write(text + "\n")
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


def _read_classes(path: str, stems: list[str]) -> np.ndarray:
    """``--classes``: a CSV with columns filename,class; one class per selected cell."""
    import pandas as pd

    try:
        table = pd.read_csv(path)
    except FileNotFoundError as err:
        raise InputError(f"--classes {path}: file not found") from err
    except (ValueError, UnicodeDecodeError) as err:  # pandas' parser errors are ValueErrors
        raise InputError(f"--classes {path} is not a readable CSV: {err}") from err
    missing = [c for c in ("filename", "class") if c not in table.columns]
    if missing:
        raise InputError(
            f"--classes {path} lacks the column(s) {', '.join(missing)}; it has "
            f"{', '.join(map(str, table.columns)) or 'none'} (expected filename,class)"
        )
    lookup = dict(
        zip(table["filename"].map(lambda s: Path(str(s)).stem), table["class"], strict=True)
    )
    absent = [n for n in stems if n not in lookup]
    if absent:
        raise InputError(f"--classes lacks {len(absent)} cell(s), e.g. {absent[:5]}")
    return np.array([lookup[n] for n in stems])


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .outputs import DirLock, check_output_dir

    out = check_output_dir(Path(args.out), "--out")
    with DirLock(out, "mevae demo"):
        run_demo(
            out,
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


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", str(text)).strip()


def explain(err: BaseException) -> str | None:
    """The one line the CLI prints for an error it can explain; None for the others (a bug:
    their traceback is shown)."""
    from .outputs import describe_oserror

    if isinstance(err, InputError | CheckpointError | TrainingDiverged):
        return _one_line(err)
    if isinstance(err, OSError):
        return _one_line(describe_oserror(err))
    if isinstance(err, MemoryError):
        detail = f" ({_one_line(err)})" if str(err) else ""
        return (
            f"out of memory{detail}: try fewer or smaller images, a smaller --batch_size or --lazy"
        )
    if isinstance(err, RuntimeError) and re.search(
        r"out of memory|can't allocate memory|not enough memory", str(err), re.I
    ):
        first = _one_line(str(err).splitlines()[0]) if str(err) else ""
        return f"out of memory ({first}): try a smaller --batch_size or --image_size"
    if isinstance(err, ValueError):  # validation of a setting or a file's content
        return _one_line(err)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("MEVAE_DEBUG", "") not in ("", "0")
    logging.basicConfig(level=logging.WARNING, format="mevae: %(message)s")
    start = time.perf_counter()
    prefix = f"mevae {args.command}"
    with warnings.catch_warnings():
        if not debug:  # warnings in one line too, not file:line + source

            def show(message, category, filename, lineno, file=None, line=None) -> None:
                print(f"{prefix}: warning: {_one_line(message)}", file=sys.stderr, flush=True)

            warnings.showwarning = show
        try:
            code = COMMANDS[args.command](args)
        except KeyboardInterrupt:
            if debug:
                raise
            print(
                f"{prefix}: interrupted: files being written were left as they were",
                file=sys.stderr,
            )
            return 130
        except Exception as err:
            message = None if debug else explain(err)
            if message is None:
                raise
            print(f"{prefix}: error: {message}", file=sys.stderr)
            return 2
    log.info("done in %.1f s", time.perf_counter() - start)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
