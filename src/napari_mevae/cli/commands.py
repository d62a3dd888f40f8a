"""``mevae encode``, ``pairs``, ``evaluate``, ``export`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import numpy as np

from ..config import (
    InputError,
)
from .common import _device, _input_dirs, _nuisances, _progress, _say
from .train import _crop_settings


def cmd_encode(args: argparse.Namespace) -> int:
    from ..checkpoints import check_compatible, load_checkpoint
    from ..folders import FolderPairs
    from ..outputs import output_target
    from ..runs import write_encodings_csv
    from ..workflow import open_targets

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
    from ..folders import read_raw_image
    from ..outputs import LOCK_NAME, DirLock, check_output_dir
    from ..runs import write_pairs
    from ..workflow import crop_cells

    out = check_output_dir(Path(args.out), "--out")
    names = _nuisances(args.nuisances)
    settings = _crop_settings(args)

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
    from ..checkpoints import load_checkpoint
    from ..evaluation import invariance_report
    from ..outputs import atomic_write, output_target
    from ..workflow import open_targets

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
    from ..modelzoo import export_package

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
    from ..demo import run_demo
    from ..outputs import DirLock, check_output_dir

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
