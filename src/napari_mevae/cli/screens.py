"""``mevae crop`` and ``mevae features``: whole screens (many fields, plates, OME-Zarr), thin
callers of :mod:`napari_mevae.screens` and :mod:`napari_mevae.screen_features`."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import _dist_rank_world, _progress, _say
from .train import _crop_settings


def cmd_crop(args: argparse.Namespace) -> int:
    from ..screens import check_store_target, crop_screen, find_fields

    store = Path(args.out)
    settings = _crop_settings(args)
    check_store_target(store, args.overwrite)  # before any image is read
    fields = find_fields(args.image, args.labels, args.manifest, args.label_name)
    rank, world = _dist_rank_world()
    bar = _progress(len(fields), "cropping fields", args.verbose if rank == 0 else 0, "field")

    def progress(done: int, total: int, cells: int) -> None:
        bar.total = total
        bar.n = done
        rate = cells / max(bar.format_dict.get("elapsed", 0) or 1e-9, 1e-9)
        bar.set_postfix(cells=cells, cells_s=f"{rate:.0f}", refresh=False)
        bar.refresh()

    try:
        counts = crop_screen(
            fields,
            store,
            settings,
            workers=args.workers,
            overwrite=args.overwrite,
            dtype=args.dtype,
            progress=progress,
        )
    finally:
        bar.close()
    if rank == 0:
        _say(
            args,
            f"{counts['n_cells']} cells in {counts['n_fields']} field(s): {counts['n_kept']} "
            f"cropped, {counts['n_skipped']} skipped -> {store}"
            + (f" ({world} processes)" if world > 1 else "")
            + f"; train with: mevae train --targets {store} --image_size {args.size} "
            f"--nchannel {counts['crop_shape'][0]}",
        )
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from ..screen_features import screen_features

    rank, _ = _dist_rank_world()
    bars: dict = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = _progress(total, stage, args.verbose if rank == 0 else 0, "cell")
        bars[stage].n = done
        bars[stage].refresh()

    try:
        times = screen_features(
            args.checkpoint,
            args.cells,
            args.out,
            umap=args.umap,
            n_clusters=args.clusters,
            method=args.method,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=progress,
        )
    finally:
        for bar in bars.values():
            bar.close()
    if rank == 0:
        spent = ", ".join(f"{k} {v:.1f} s" for k, v in times.items() if not k.endswith("_mb"))
        _say(args, f"features -> {args.out} ({spent})")
    return 0
