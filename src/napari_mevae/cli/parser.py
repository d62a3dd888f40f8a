"""The ``mevae`` argument parser: the reference's flags and defaults, and ours."""

from __future__ import annotations

import argparse
from typing import NoReturn

from ..config import (
    DEFAULT_INVARIANCE,
    MAX_CROP_SIZE,
    MAX_LATENT_SAMP,
    MAX_NUM_SAVE,
    MODEL_KINDS,
    PRECISIONS,
)

#: how the run's precision (config.PRECISIONS after "auto") is announced
PRECISION_NAMES = {
    "float32": " (float32)",
    "bf16": " (bf16 autocast)",
    "fp16": " (float16 autocast, loss scaling)",
}


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
        "40,000 and at most 400,000 images seen, going on while the loss still falls, up to 100 "
        "passes; given, exactly that many run)",
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
        "--invariance",
        type=float,
        default=DEFAULT_INVARIANCE,
        help=f"weight of the invariance term per pixel (default {DEFAULT_INVARIANCE}): every "
        "encoder should read a cell the same with its nuisances drawn afresh; 0 = the paper's "
        "loss. ME-VAE models only",
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


DEBUG = "show the Python traceback of an error instead of one line (or set MEVAE_DEBUG=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mevae",
        description="Multi-Encoder VAE features for single-cell images (napari-mevae).",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"napari-mevae {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help=DEBUG,
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

    _add_screen_commands(sub)

    p = sub.add_parser("demo", help="the whole job on built-in synthetic cells, in about a minute")
    p.add_argument("--out", default="mevae-demo", help="output folder (default mevae-demo)")
    p.add_argument(
        "--epochs",
        type=_int_in(0),
        default=None,
        help="training epochs (default: the training budget every front end uses)",
    )
    p.add_argument("--cells", type=_int_in(20, 100_000), default=600)
    p.add_argument("--size", type=_int_in(8, 512), default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", type=int, default=1)
    for command in sub.choices.values():  # `mevae train ... --debug` works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG)
    return parser


SCREEN_HELP = (
    "PATTERN is a file, a quoted glob or a folder (its *.tif, *.tiff). Images and labels pair by "
    "name: labels a_labels.tif (or _label, _masks, _mask, _seg, _segmentation, _cp_masks) or "
    "a.tif in another folder pair with image a.tif; files matched by --labels are never "
    "images; unmatched files are an error. --image plate.zarr reads an OME-Zarr image or HCS "
    "plate (every well and field) with its label image labels/<--label-name>."
)


def _add_screen_commands(sub) -> None:
    p = sub.add_parser(
        "crop",
        help="crop every cell of many fields (TIFFs, OME-Zarr, HCS plate) into one cell store",
        description=SCREEN_HELP,
    )
    p.add_argument(
        "--image", metavar="PATTERN", help="intensity images, or an OME-Zarr image/plate"
    )
    p.add_argument("--labels", metavar="PATTERN", help="label images (TIFF)")
    p.add_argument(
        "--manifest",
        metavar="CSV",
        help="instead of --image/--labels: a CSV with columns image,labels (relative to the CSV) "
        "and any others (plate, well, condition...), carried into the cell table",
    )
    p.add_argument(
        "--label-name", help="OME-Zarr: the label image under labels/ (default: the first)"
    )
    p.add_argument("--out", required=True, metavar="STORE", help="the cell store (a new folder)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier `mevae crop` STORE there"
    )
    p.add_argument("--size", type=_int_in(4, MAX_CROP_SIZE), default=64, help="crop size (64)")
    p.add_argument("--channel-axis", type=int, default=None, help="axis of channels in TIFFs")
    p.add_argument(
        "--scale", choices=("fixed", "fit"), default="fixed", help="pixel scale or fit the cell"
    )
    p.add_argument(
        "--normalize",
        choices=("percentile", "max", "none"),
        default="percentile",
        help="percentile: per field and channel (default); max: per cell",
    )
    p.add_argument("--min-area", type=_int_in(0), default=0)
    p.add_argument("--max-area", type=_int_in(1), default=None)
    p.add_argument(
        "--border", choices=("drop", "pad"), default="drop", help="cells touching the border"
    )
    p.add_argument(
        "--dtype",
        choices=("float16", "uint8"),
        default="float16",
        help="how crops are stored (uint8: 0..255, half the size)",
    )
    p.add_argument(
        "--workers",
        type=_int_in(1),
        default=None,
        help="processes cropping fields (default: one per core; under torchrun, the cores of "
        "the node divided among its processes)",
    )
    p.add_argument("--verbose", type=int, default=1, help="0 = quiet, 1 = progress bars")

    p = sub.add_parser(
        "features",
        help="encode every cell of a cell store, UMAP, clusters -> a .parquet or .csv table",
    )
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint file, training save_dir or package (.zip)"
    )
    p.add_argument("--cells", required=True, metavar="STORE", help="a store from `mevae crop`")
    p.add_argument("--out", required=True, metavar="TABLE", help="the table: .parquet or .csv")
    p.add_argument("--umap", action="store_true", help="add UMAP0, UMAP1")
    p.add_argument("--clusters", type=_int_in(1), default=None, metavar="K", help="add cluster")
    p.add_argument("--method", choices=("kmeans", "gmm", "hdbscan"), default="kmeans")
    p.add_argument("--batch_size", type=_int_in(1), default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", type=int, default=1, help="0 = quiet, 1 = progress bars")
