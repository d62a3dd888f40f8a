"""Whole screens: many fields (TIFF files, OME-Zarr images, HCS plates) -> one STORE of crops
(:mod:`napari_mevae.screen_store`) and one cell table, every cell traceable to its field.

Fields:

- ``find_fields(image, labels)``: ``image`` and ``labels`` are each a file, a quoted glob or a
  folder (its ``*.tif``/``*.tiff``).  **Pairing rule**: a labels file pairs with the image of
  the same stem once a labels suffix is taken off its stem (``_labels``, ``_label``,
  ``_masks``, ``_mask``, ``_seg``, ``_segmentation``, ``_cp_masks``; any case), so
  ``a1.tif`` pairs with ``a1_labels.tif`` in the same folder or ``a1.tif`` in another one.
  Files found as labels are never images.  Unmatched files are one error naming them.
- ``find_fields(manifest=CSV)``: columns ``image``, ``labels`` (paths relative to the CSV) and
  any others (plate, well, condition...), carried into the cell table.
- ``find_fields("plate.zarr")``: an OME-Zarr image, or an HCS plate (every well and field),
  with its label image ``labels/<label_name>`` (default: the first listed).

Cropping (:func:`crop_screen`) is :func:`napari_mevae.cells.extract_cells` per field, in a
process pool over fields; results are written in field order as they come, so memory holds
only the fields in flight.  Under torchrun each rank crops a contiguous share of the fields
into a part, and rank 0 assembles the parts in field order: the same STORE as one process.
"""

from __future__ import annotations

import csv
import glob
import os
import re
import shutil
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import CropSettings, InputError
from .screen_store import STORE_FILES, StoreWriter, write_meta

__all__ = [
    "Field",
    "LABEL_SUFFIXES",
    "crop_screen",
    "fields_in",
    "find_fields",
    "load_fields",
    "pair_files",
    "read_field",
]

LABEL_SUFFIXES = ("_labels", "_label", "_masks", "_mask", "_seg", "_segmentation", "_cp_masks")
_IMAGE_EXT = (".tif", ".tiff")
_SUFFIX_RE = re.compile("(" + "|".join(re.escape(s) for s in LABEL_SUFFIXES) + ")$", re.I)


@dataclass(frozen=True)
class Field:
    """One field of view: where its pixels are and what the cell table says about it."""

    source: str  # the table's ``source``: the image file, or plate.zarr/row/col/field
    image: str  # TIFF path, or the OME-Zarr image group's path
    labels: str  # TIFF path, or the label image group's path
    kind: str = "tiff"  # "tiff" or "ome"
    extra: dict[str, str] = field(default_factory=dict)


# -- discovery -----------------------------------------------------------------------------------
def _expand(pattern: str, what: str) -> list[Path]:
    p = Path(pattern)
    if p.is_dir():
        files = [f for f in sorted(p.iterdir()) if f.suffix.lower() in _IMAGE_EXT]
    elif p.is_file():
        files = [p]
    else:
        files = [Path(f) for f in sorted(glob.glob(pattern)) if Path(f).is_file()]
    if not files:
        raise InputError(f"{what} {pattern}: no such file, folder or matching files")
    return files


def _key(path: Path) -> str:
    return _SUFFIX_RE.sub("", path.stem)


def _shown(names: Sequence[str], n: int = 5) -> str:
    more = f" ... ({len(names)} in all)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def pair_files(images: Sequence[Path], labels: Sequence[Path]) -> list[tuple[Path, Path]]:
    """Pair images with label images by the module's rule; one-line error on any mismatch."""
    label_set = {p.resolve() for p in labels}
    images = [p for p in images if p.resolve() not in label_set]
    by_key: dict[str, Path] = {}
    for lab in labels:
        if _key(lab) in by_key:
            raise InputError(f"two label images for {_key(lab)}: {by_key[_key(lab)]} and {lab}")
        by_key[_key(lab)] = lab
    seen: dict[str, Path] = {}
    pairs, lonely = [], []
    for img in images:
        if img.stem in seen:
            raise InputError(f"two images named {img.stem}: {seen[img.stem]} and {img}")
        seen[img.stem] = img
        if img.stem in by_key:
            pairs.append((img, by_key[img.stem]))
        else:
            lonely.append(img.name)
    spare = [str(lab.name) for k, lab in by_key.items() if k not in seen]
    if lonely or spare:
        parts = []
        if lonely:
            parts.append(f"images without labels: {_shown(lonely)}")
        if spare:
            parts.append(f"labels without an image: {_shown(spare)}")
        raise InputError(
            "unmatched files (" + "; ".join(parts) + "); an image a.tif pairs with labels "
            "a.tif in another folder or a_labels.tif (suffixes " + ", ".join(LABEL_SUFFIXES) + ")"
        )
    if not pairs:
        raise InputError("no image/labels pairs found")
    return pairs


def _read_manifest(path: Path) -> list[Field]:
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except FileNotFoundError as err:
        raise InputError(f"--manifest {path}: file not found") from err
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"--manifest {path} is not a readable CSV: {err}") from err
    cols = list(rows[0].keys()) if rows else []
    missing = [c for c in ("image", "labels") if c not in cols]
    if missing:
        raise InputError(
            f"--manifest {path} lacks the column(s) {', '.join(missing)} (it has "
            f"{', '.join(cols) or 'no rows'}); expected image,labels[,plate,well,...]"
        )
    fields = []
    for row in rows:
        img, lab = (path.parent / row[c] for c in ("image", "labels"))
        for what, p in (("image", img), ("labels", lab)):
            if not p.is_file():
                raise InputError(f"--manifest {path}: {what} {p} not found")
        extra = {k: v for k, v in row.items() if k not in ("image", "labels") and k}
        fields.append(Field(str(row["image"]), str(img), str(lab), "tiff", extra))
    return fields


def _ome_attrs(group: Any) -> dict[str, Any]:
    attrs = dict(group.attrs)
    return dict(attrs.get("ome", attrs))  # NGFF 0.5 nests under "ome"; 0.4 does not


def _ome_fields(path: Path, label_name: str | None) -> list[Field]:
    import zarr

    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as err:  # zarr raises several types for what is not a group
        raise InputError(f"--image {path} is not an OME-Zarr image or plate: {err}") from err
    attrs = _ome_attrs(root)
    if "plate" in attrs:
        images = []
        plate = attrs["plate"]
        for well in plate.get("wells", []):
            wpath = well["path"]
            wattrs = _ome_attrs(root[wpath])
            for img in wattrs.get("well", {}).get("images", []):
                row, col = wpath.split("/")[-2:]
                extra = {"plate": path.name, "well": f"{row}{col}", "field": str(img["path"])}
                images.append((f"{wpath}/{img['path']}", extra))
        if not images:
            raise InputError(f"--image {path}: an HCS plate without wells or fields")
    elif "multiscales" in attrs:
        images = [("", {})]
    else:
        raise InputError(f"--image {path} is a zarr group without OME-NGFF image or plate metadata")
    fields = []
    for sub, extra in images:
        group = root[sub] if sub else root
        where = f"{path}/{sub}" if sub else str(path)
        try:
            names = _ome_attrs(group["labels"]).get("labels", [])
        except KeyError:
            names = []
        if not names:
            raise InputError(f"{where} has no label image (no labels group): segment it first")
        name = label_name or names[0]
        if name not in names:
            raise InputError(f"{where} has no label image {name!r} (it has {', '.join(names)})")
        fields.append(
            Field(where, str(Path(where)), str(Path(where) / "labels" / name), "ome", extra)
        )
    return fields


def _is_zarr(pattern: str) -> bool:
    p = Path(pattern)
    return p.is_dir() and any((p / f).is_file() for f in ("zarr.json", ".zattrs", ".zgroup"))


def find_fields(
    image: str | None = None,
    labels: str | None = None,
    manifest: str | None = None,
    label_name: str | None = None,
) -> list[Field]:
    """Every field of a screen, in a fixed order (sorted names; a plate's wells and fields in
    its metadata's order): the order of the cell ids."""
    if manifest:
        if image or labels:
            raise InputError("give either --manifest or --image/--labels, not both")
        return _read_manifest(Path(manifest))
    if not image:
        raise InputError("give --image (and --labels), or --manifest")
    if _is_zarr(image):
        if labels:
            raise InputError("an OME-Zarr --image holds its labels: leave --labels out")
        return _ome_fields(Path(image), label_name)
    if not labels:
        raise InputError("--labels is needed with TIFF images (an OME-Zarr --image has its own)")
    pairs = pair_files(_expand(image, "--image"), _expand(labels, "--labels"))
    return [Field(str(i), str(i), str(lab)) for i, lab in pairs]


def fields_in(path: str | os.PathLike, label_name: str | None = None) -> list[Field]:
    """The fields of one folder or OME-Zarr (what napari's "Open folder or plate" takes): an
    OME-Zarr image or plate, or a folder whose label images carry a labels suffix
    (``a1.tif`` + ``a1_labels.tif``), or a folder with ``images/`` and ``labels/`` inside."""
    p = Path(path)
    if _is_zarr(str(p)):
        return _ome_fields(p, label_name)
    if not p.is_dir():
        raise InputError(f"{p} is not a folder or an OME-Zarr")
    if (p / "images").is_dir() and (p / "labels").is_dir():
        images, labels = _expand(str(p / "images"), "images"), _expand(str(p / "labels"), "labels")
    else:
        files = _expand(str(p), "folder")
        labels = [f for f in files if _SUFFIX_RE.search(f.stem)]
        images = [f for f in files if not _SUFFIX_RE.search(f.stem)]
    return [Field(str(i), str(i), str(lab)) for i, lab in pair_files(images, labels)]


def load_fields(
    fields: Sequence[Field],
) -> Generator[tuple[int, int], None, list[tuple[np.ndarray, np.ndarray, str]]]:
    """Read ``fields`` into ``(image, labels, name)`` arrays for a viewer, yielding ``(done,
    total)``: a field's image without a singleton channel axis, named by its file or its
    ``row/column/field`` in a plate."""
    out = []
    for k, f in enumerate(fields):
        image, labels, kw = read_field(f, None)
        if f.kind == "ome" and image.shape[kw["channel_axis"]] == 1:  # one channel: none
            image = image.take(0, axis=kw["channel_axis"])
        in_plate = f.kind == "ome" and "well" in f.extra  # row/column/field, else the file
        name = "/".join(Path(f.source).parts[-3:]) if in_plate else Path(f.image).stem
        out.append((image, labels, name))
        yield k + 1, len(fields)
    return out


# -- reading one field ---------------------------------------------------------------------------
def _ome_level0(path: str) -> tuple[np.ndarray, list[str]]:
    import zarr

    group = zarr.open_group(path, mode="r")
    ms = _ome_attrs(group)["multiscales"][0]
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms.get("axes", [])]
    arr = np.asarray(group[ms["datasets"][0]["path"]][...])
    if len(axes) != arr.ndim:
        axes = ["c", "y", "x"][-arr.ndim :] if arr.ndim <= 3 else ["t", "c", "z", "y", "x"]
    return arr, axes


def _planes_first(arr: np.ndarray, axes: list[str], keep_c: bool) -> np.ndarray:
    """(t, z) flattened into planes first, then c (when kept), then y, x."""
    order = [a for a in axes if a not in ("c", "y", "x")] + (["c"] if keep_c else []) + ["y", "x"]
    if not keep_c and "c" in axes:  # a label image has no channels; drop a singleton one
        arr = arr.take(0, axis=axes.index("c"))
        axes = [a for a in axes if a != "c"]
    arr = np.transpose(arr, [axes.index(a) for a in order])
    lead = arr.shape[: len(order) - (3 if keep_c else 2)]
    return arr.reshape(int(np.prod(lead, dtype=np.int64)), *arr.shape[len(lead) :])


def read_field(f: Field, channel_axis: int | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(image, labels, extract_cells keywords)`` of one field."""
    from .folders import read_raw_image

    if f.kind == "tiff":
        image, labels = read_raw_image(f.image), read_raw_image(f.labels)
        return image, labels, {"channel_axis": channel_axis, "stack": labels.ndim == 3}
    img, axes = _ome_level0(f.image)
    lab, lab_axes = _ome_level0(f.labels)
    img = _planes_first(img, axes, keep_c="c" in axes)
    lab = _planes_first(lab, lab_axes, keep_c=False)
    if "c" not in axes:
        img = img[:, None]
    if len(lab) == 1:  # one plane: a plain 2-D field
        return img[0], lab[0], {"channel_axis": 0, "stack": False}
    return img, lab, {"channel_axis": 1, "stack": True}


_ROW_COLUMNS = ["plane", "label", "centroid_y", "centroid_x", "area", "orientation"]


def crop_field(f: Field, settings: dict[str, Any], dtype: str) -> tuple[np.ndarray, pd.DataFrame]:
    """Crops (float16 or uint8) and cell table of one field (runs in a pool worker)."""
    from .cells import extract_cells

    image, labels, how = read_field(f, settings.get("channel_axis"))
    kw = {k: v for k, v in settings.items() if k not in ("channel_axis", "stack")}
    if kw.get("normalize") == "none":
        kw["normalize"] = None
    try:
        cells = extract_cells(image, labels, **kw, **how)
    except ValueError as err:
        if "label image is empty" in str(err):  # a field without cells: no rows
            n_ch = 1
            return np.zeros((0, n_ch, settings["size"], settings["size"]), dtype), pd.DataFrame()
        raise InputError(f"{f.source}: {err}") from err
    crops = cells.crops
    crops = np.round(crops * 255).astype(np.uint8) if dtype == "uint8" else crops.astype(np.float16)
    t = cells.table
    table = t[_ROW_COLUMNS].copy()
    table["skipped"] = t["skip_reason"].astype(str)
    table["kept"] = t["crop_index"].to_numpy() >= 0
    return crops, table


def _field_table(f: Field, index: int, table: pd.DataFrame) -> pd.DataFrame:
    out = table.copy()
    out.insert(0, "field_index", index)
    out.insert(0, "source", f.source)
    for k, v in f.extra.items():
        out[k] = v
    return out


# -- the whole screen ----------------------------------------------------------------------------
def _pool_context():
    import multiprocessing as mp
    import sys

    # fork is fast; after torch (threads, OpenMP) is loaded a fresh interpreter is safer
    return mp.get_context("spawn" if "torch" in sys.modules else "fork")


def _iter_crops(fields: Sequence[Field], settings: dict, dtype: str, workers: int):
    """``(crops, table)`` per field in field order, ``workers`` fields in flight."""
    if workers <= 1 or len(fields) <= 1:
        for f in fields:
            yield crop_field(f, settings, dtype)
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=_pool_context()) as pool:
        todo = iter(fields)
        flight: deque = deque()
        for f in todo:
            flight.append(pool.submit(crop_field, f, settings, dtype))
            if len(flight) >= 2 * workers:
                break
        while flight:
            crops, table = flight.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                flight.append(pool.submit(crop_field, nxt, settings, dtype))
            yield crops, table


def _write_part(
    part: Path,
    fields: Sequence[Field],
    first: int,
    settings: dict,
    dtype: str,
    workers: int,
    progress: Callable[[int, int, int], None] | None,
) -> tuple[int, int]:
    """Crop ``fields`` (numbered from ``first``) into ``part``/crops.zarr + cells.parquet."""
    part.mkdir(parents=True, exist_ok=True)
    writer: StoreWriter | None = None
    tables = []
    channels = None
    cells = 0
    for i, (crops, table) in enumerate(_iter_crops(fields, settings, dtype, workers)):
        f = fields[i]
        if len(table):
            if writer is None:
                channels = crops.shape[1]
                writer = StoreWriter(part / "crops.zarr", channels, settings["size"], dtype)
            elif crops.shape[1] != channels and len(crops):
                raise InputError(
                    f"{f.source} has {crops.shape[1]} channel(s), the fields before it "
                    f"{channels}: every field of a screen needs the same channels"
                )
            writer.append(crops)
            tables.append(_field_table(f, first + i, table))
        cells += len(table)
        if progress is not None:
            progress(i + 1, len(fields), cells)
    if writer is None:
        writer = StoreWriter(part / "crops.zarr", 1, settings["size"], dtype)
    n = writer.close()
    table = pd.concat(tables, ignore_index=True) if tables else _empty_table()
    table.to_parquet(part / "cells.parquet", index=False)
    return n, channels or 1


def _empty_table() -> pd.DataFrame:
    cols = ["source", "field_index", *_ROW_COLUMNS, "skipped", "kept"]
    return pd.DataFrame({c: [] for c in cols})


def _finish_table(table: pd.DataFrame) -> pd.DataFrame:
    """cell_id first, skipped and crop_index last: ids and crop rows in field order."""
    kept = table.pop("kept").to_numpy(bool)
    skipped = table.pop("skipped")
    crop_index = np.full(len(table), -1, np.int64)
    crop_index[kept] = np.arange(int(kept.sum()))
    table.insert(0, "cell_id", np.arange(len(table), dtype=np.int64))
    table["skipped"] = skipped.astype(str).to_numpy()
    table["crop_index"] = crop_index
    return table


def check_store_target(store: Path, overwrite: bool) -> None:
    """Refuse a STORE that is not empty (unless ``overwrite`` and it is a STORE)."""
    if store.exists() and not store.is_dir():
        raise InputError(f"--out {store} exists and is not a folder")
    held = (
        sorted(p.name for p in store.iterdir() if not p.name.startswith("."))
        if store.is_dir()
        else []
    )
    if not held:
        return
    if not overwrite:
        raise InputError(
            f"--out {store} is not empty ({_shown(held)}): give a new or empty folder, or "
            "--overwrite to replace an earlier `mevae crop` output there"
        )
    foreign = [n for n in held if n not in STORE_FILES]
    if foreign:
        raise InputError(
            f"--out {store} holds files `mevae crop` did not write ({_shown(foreign)}); "
            "--overwrite replaces only a cell store: give another folder"
        )


def crop_screen(
    fields: Sequence[Field],
    store: str | os.PathLike,
    settings: CropSettings,
    *,
    workers: int | None = None,
    overwrite: bool = False,
    dtype: str = "float16",
    progress: Callable[[int, int, int], None] | None = None,
) -> dict[str, Any]:
    """Crop every field into the STORE ``store``; returns the counts written to screen.json.
    ``progress(fields done, fields, cells so far)`` after every field.

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this: each crops its contiguous share
    of the fields, rank 0 assembles the parts in field order (see module doc)."""
    from .outputs import DirLock

    store = Path(store)
    cs = settings.check().to_dict()
    check_store_target(store, overwrite)
    if workers is None:
        workers = os.cpu_count() or 1
    dist = _Dist()
    rank, world = dist.rank, dist.world
    if world > 1:
        workers = max(1, workers // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    stage = store / f".mevae-screen.{dist.run_id}"
    lock = DirLock(store, "mevae crop") if rank == 0 else None
    try:
        if lock is not None:
            lock.acquire()
            check_store_target(store, overwrite)
        share = np.array_split(np.arange(len(fields)), world)[rank]
        first = int(share[0]) if len(share) else 0
        mine = [fields[i] for i in share]
        part = stage if world == 1 else stage / f"part{rank}"
        n_kept, channels = _write_part(part, mine, first, cs, dtype, workers, progress)
        dist.barrier()
        if rank == 0:
            if world > 1:
                n_kept, channels = _assemble(stage, world, cs["size"], dtype)
            table = _finish_table(pd.read_parquet(stage / "cells.parquet"))
            table.to_parquet(stage / "cells.parquet", index=False)
            counts = dict(
                n_fields=len(fields),
                n_cells=len(table),
                n_kept=n_kept,
                n_skipped=int((table["skipped"] != "").sum()),
                crop_shape=[channels, cs["size"], cs["size"]],
                dtype=dtype,
            )
            write_meta(stage, cs, **counts)
            from .runs import _swap_in

            old = [store / n for n in STORE_FILES if (store / n).exists()]
            _swap_in(stage, store, old)
        dist.barrier()
        return counts if rank == 0 else {}
    finally:
        if rank == 0:
            shutil.rmtree(stage, ignore_errors=True)
        if lock is not None:
            lock.release()
        dist.close()


def _assemble(stage: Path, world: int, size: int, dtype: str) -> tuple[int, int]:
    """Rank 0: the parts' crops and tables, concatenated in rank (= field) order."""
    from .screen_store import StoreCrops

    tables, writer, channels = [], None, 1
    for r in range(world):
        part = stage / f"part{r}"
        crops = StoreCrops(part / "crops.zarr")
        raw = crops._array
        if len(crops) and writer is None:
            channels = raw.shape[1]
            writer = StoreWriter(stage / "crops.zarr", channels, size, dtype)
        for a in range(0, len(crops), 8192):
            writer.append(raw[a : a + 8192])
        part_table = pd.read_parquet(part / "cells.parquet")
        if len(part_table):  # a rank with no fields (more ranks than fields) adds nothing
            tables.append(part_table)
        shutil.rmtree(part)
    if writer is None:
        writer = StoreWriter(stage / "crops.zarr", 1, size, dtype)
    table = pd.concat(tables, ignore_index=True) if tables else _empty_table()
    table.to_parquet(stage / "cells.parquet", index=False)
    return writer.close(), channels


class _Dist:
    """torch.distributed under torchrun (gloo: CPU is enough for barriers); nothing otherwise."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.run_id = os.environ.get("TORCHELASTIC_RUN_ID") or f"{os.getpid()}"
        if self.world > 1:
            self.run_id += "-" + os.environ.get("MASTER_PORT", "")
        self._own = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")
                self._own = True

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self._own:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._own = False
