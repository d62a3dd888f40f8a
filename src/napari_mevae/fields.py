"""Several fields (image + labels pairs) analysed as one: crop each, concatenate the crops so one
model encodes and one clustering groups every cell, then split the results back per field.

A *field* is one segmented image: its image array, its label array and a source name (in
napari, the labels layer's name).  :func:`crop_fields` crops every field with the same settings
and returns :class:`FieldCrops`, a :class:`~napari_mevae.cells.CellCrops` of all the cells whose
table has a ``field`` column (0, 1, ... in the order given) and a global ``crop_index``.  The
features table of the kept cells (:func:`napari_mevae.analysis.features_table`, one row per
crop) is split with :meth:`FieldCrops.field_table`; :func:`whole_table` is the table of every
labelled cell of every field with its provenance, written by :func:`write_table` (CSV or
Parquet).

:func:`pair_layers` is the rule that pairs labels with images by name (or, failing that, by
shape), for front ends that are given loose layers.  No Qt, no napari, no torch here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .cells import CellCrops
from .config import CropSettings, InputError

__all__ = [
    "FieldCrops",
    "combine_cells",
    "crop_fields",
    "pair_layers",
    "whole_table",
    "write_table",
]

#: endings that make a labels name from an image name ("field 1" -> "field 1 labels")
LABEL_SUFFIXES = ("labels", "label", "masks", "mask", "segmentation", "seg", "cells")


@dataclass
class FieldCrops(CellCrops):
    """The cells of several fields: ``crops`` of every field in field order, ``table`` with a
    ``field`` column (index into ``names``) and ``crop_index`` counted over all fields."""

    names: list[str] = field(default_factory=list)  # one source name per field

    @property
    def n_fields(self) -> int:
        return len(self.names)

    @property
    def kept_fields(self) -> np.ndarray:
        """The field of each crop (features row), in crop order."""
        fields = np.full(len(self.crops), -1, np.int64)
        ci = self.table["crop_index"].to_numpy()
        fields[ci[ci >= 0]] = self.table["field"].to_numpy()[ci >= 0]
        return fields

    def field_of(self, row: int) -> int:
        """The field of crop (features row) ``row``."""
        return int(self.table["field"].to_numpy()[self.table["crop_index"].to_numpy() == row][0])

    def rows_of(self, index: int) -> np.ndarray:
        """The crop (features) rows of field ``index``, in order."""
        return np.flatnonzero(self.kept_fields == index)

    def field_cells(self, index: int) -> pd.DataFrame:
        """The cell table of one field as :func:`~napari_mevae.cells.extract_cells` made it
        (``crop_index`` local to the field)."""
        t = self.table[self.table["field"] == index].drop(columns=["field"])
        first = self.rows_of(index)
        offset = int(first[0]) if len(first) else 0
        ci = t["crop_index"].to_numpy()
        t = t.assign(crop_index=np.where(ci >= 0, ci - offset, ci))
        return t.reset_index(drop=True)

    def field_table(self, table: pd.DataFrame, index: int) -> pd.DataFrame:
        """The rows of ``table`` (one per crop, in crop order) that belong to field ``index``."""
        if len(table) != len(self.crops):
            raise ValueError(f"{len(table)} rows for {len(self.crops)} cells")
        return table.iloc[self.rows_of(index)].reset_index(drop=True)


def combine_cells(cells: Sequence[CellCrops], names: Sequence[str]) -> FieldCrops:
    """One :class:`FieldCrops` of the cells of several fields (same crop size and channels)."""
    if len(cells) != len(names) or not cells:
        raise ValueError("give one name per field, and at least one field")
    if len(set(names)) != len(names):
        raise InputError(f"two fields have the same name: {list(names)}")
    shapes = {tuple(c.crops.shape[1:]) for c in cells if len(c.crops)}
    if len(shapes) > 1:
        raise InputError(
            "the fields' crops differ in shape (channels, size): "
            + ", ".join(
                f"{n}: {tuple(c.crops.shape[1:])}" for c, n in zip(cells, names, strict=True)
            )
            + "; every field must have the same channels"
        )
    tables, offset = [], 0
    for i, c in enumerate(cells):
        t = c.table.copy()
        ci = t["crop_index"].to_numpy()
        t["crop_index"] = np.where(ci >= 0, ci + offset, ci)
        t.insert(0, "field", np.full(len(t), i, np.int64))
        tables.append(t)
        offset += len(c.crops)
    shape = next(iter(shapes)) if shapes else cells[0].crops.shape[1:]
    crops = [c.crops for c in cells if len(c.crops)]
    crops_all = np.concatenate(crops) if crops else np.zeros((0, *shape), np.float32)
    table = pd.concat(tables, ignore_index=True)
    return FieldCrops(crops_all, table, names=list(names))


def crop_fields(
    fields: Sequence[tuple[Any, Any, str]],
    settings: CropSettings | Sequence[CropSettings],
    progress: Callable[[int, int], None] | None = None,
) -> FieldCrops:
    """Crop every cell of every field ``(image, labels, name)`` (one settings for all, or one
    per field: the channel axis can differ) and combine them (:func:`combine_cells`).

    ``progress(done, total)`` counts in thousandths of the whole job."""
    from .workflow import crop_cells

    per = [settings] * len(fields) if isinstance(settings, CropSettings) else list(settings)
    if len(per) != len(fields):
        raise ValueError("give one crop settings per field")
    n = len(fields)
    cells = []
    for i, ((image, labels, _name), s) in enumerate(zip(fields, per, strict=True)):

        def part(done: int, total: int, i: int = i) -> None:
            if progress is not None:
                progress(int(1000 * (i + done / max(total, 1)) / n), 1000)

        cells.append(crop_cells(image, labels, s, part))
    return combine_cells(cells, [name for _, _, name in fields])


def _stem(name: str) -> str:
    """A name without a labels ending: "field 1 labels" -> "field 1"."""
    ends = "|".join(LABEL_SUFFIXES)
    return re.sub(rf"[\s_\-.]*({ends})$", "", name.strip(), flags=re.IGNORECASE).strip()


def pair_layers(
    images: Sequence[tuple[str, Sequence[int]]],
    labels: Sequence[tuple[str, Sequence[int]]],
    fits: Callable[[int, int], bool] | None = None,
) -> list[tuple[str, str | None, str]]:
    """Which image each labels layer segments: ``[(labels name, image name or None, why)]``.

    The rule, in order: the image named like the labels without its ending ("field 1 labels",
    "field 1_mask" -> "field 1"); else the image whose name starts with the labels' stem or the
    other way round (longest wins); else the only image of a shape that fits (``fits(i, j)``:
    image ``i`` fits labels ``j``; default: the same shape, or with one more axis).  Names
    that fail are left out only if an image is not found (``None``, why says so)."""

    def default_fits(i: int, j: int) -> bool:
        ish, lsh = tuple(images[i][1]), tuple(labels[j][1])
        return ish == lsh or (len(ish) == len(lsh) + 1 and lsh in _drop_one(ish))

    fits = fits or default_fits
    out: list[tuple[str, str | None, str]] = []
    names = [n for n, _ in images]
    for j, (lname, _) in enumerate(labels):
        stem = _stem(lname).lower()
        exact = [i for i, n in enumerate(names) if n.strip().lower() == stem and fits(i, j)]
        if exact:
            out.append((lname, names[exact[0]], "same name"))
            continue
        near = [
            i
            for i, n in enumerate(names)
            if stem
            and (n.lower().startswith(stem) or stem.startswith(n.strip().lower()))
            and fits(i, j)
        ]
        if near:
            best = max(near, key=lambda i: len(os.path.commonprefix([names[i].lower(), stem])))
            out.append((lname, names[best], "similar name"))
            continue
        shaped = [i for i in range(len(names)) if fits(i, j)]
        if len(shaped) == 1:
            out.append((lname, names[shaped[0]], "only image of its shape"))
        elif shaped:
            out.append((lname, None, f"{len(shaped)} images fit its shape, none by name"))
        else:
            out.append((lname, None, "no image of its shape"))
    return out


def _drop_one(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [shape[:a] + shape[a + 1 :] for a in range(len(shape))]


def whole_table(
    cells: FieldCrops,
    table: pd.DataFrame,
    sources: Sequence[dict[str, str]] | None = None,
    reasons: bool = True,
) -> pd.DataFrame:
    """One row per labelled cell of every field, field after field: each field's
    :func:`~napari_mevae.analysis.every_cell_table` (features of the kept cells, the skip
    reason of the others), then the provenance columns ``source_<key>`` of ``sources`` (one
    dict per field, e.g. ``{"image": ..., "labels": ...}``)."""
    from .analysis import cluster_categories, every_cell_table

    parts = []
    for f in range(cells.n_fields):
        part = every_cell_table(cells.field_table(table, f), cells.field_cells(f), reasons)
        for key, value in (sources[f] if sources else {}).items():
            part[f"source_{key}"] = value
        parts.append(part)
    out = pd.concat(parts, ignore_index=True)
    if "cluster" in out:  # categories of the union of the fields' clusters
        out["cluster"] = cluster_categories(np.asarray(out["cluster"], dtype=float))
    return out


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``df`` completely or not at all: Parquet when ``path`` ends in ``.parquet``, CSV
    otherwise.  Parquet does not keep a categorical of integers (pyarrow writes plain numbers,
    read back as floats when a cell has no cluster), so ``cluster`` is written as nullable
    integers (Int64), as ``mevae features`` writes it; ``.astype("category")`` after reading
    makes it the layer's categorical again."""
    from .outputs import atomic_write

    path = Path(path)
    if path.suffix.lower() == ".parquet":
        if "cluster" in df and isinstance(df["cluster"].dtype, pd.CategoricalDtype):
            df = df.assign(cluster=pd.array(np.asarray(df["cluster"], dtype=float), "Int64"))
        with atomic_write(path, "wb") as fh:
            df.to_parquet(fh, index=False)
    else:
        with atomic_write(path, newline="") as fh:
            df.to_csv(fh, index=False)
    return path


def cluster_results(
    cells: FieldCrops,
    latents: np.ndarray,
    embedding: np.ndarray | None,
    clusters: np.ndarray,
    label_images: Sequence[np.ndarray],
    stacks: Sequence[bool],
) -> tuple[pd.DataFrame, list[tuple[pd.DataFrame, pd.DataFrame, np.ndarray]]]:
    """What a clustering gives each field, computed off the viewer's thread: the features
    table of the kept cells, and per field ``(its rows, a row for every labelled cell (skipped
    ones: cluster 0), its label image painted by cluster)``."""
    from .analysis import every_cell_table, features_table, paint_clusters

    table = features_table(cells.kept, latents, embedding, clusters)
    per_field = []
    for i, (labels, stack) in enumerate(zip(label_images, stacks, strict=True)):
        rows = cells.field_table(table, i)
        every = every_cell_table(rows, cells.field_cells(i), reasons=False, skipped_cluster=0)
        planes = np.asarray(rows["plane"]) if stack else None
        ids = np.asarray(rows["cluster"], dtype=np.int64)
        per_field.append((rows, every, paint_clusters(labels, rows["label"], ids, planes)))
    return table, per_field
