"""Segmented image -> one canonical crop per cell: the ME-VAE's training targets.

A crop is taken around each labelled cell and, with ``align=True``, put in *canonical pose*:
the major axis (image moments, the ``skimage.measure.regionprops`` orientation) is turned
horizontal, then the crop is mirrored so that the intensity-weighted centre of mass of the cell
lies right of and below the crop centre.  That is the "corrected" cell every encoder has to
reconstruct; the nuisances (see :mod:`napari_mevae.nuisances`) are re-applied on the fly.

Speed: the label image is scanned once (``scipy.ndimage.find_objects``); everything else works
on the cell's bounding box, and the resampling on a small window just big enough for the crop.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import ndimage

from .config import CropSettings, InputError
from .resample import geometry, resample

__all__ = ["CellCrops", "extract_cells", "canonical_pose", "TABLE_COLUMNS"]

TABLE_COLUMNS = [
    "label",
    "plane",
    "centroid_y",
    "centroid_x",
    "area",
    "orientation",
    "bbox_y0",
    "bbox_x0",
    "bbox_y1",
    "bbox_x1",
    "crop_index",
    "skip_reason",
]

# find_objects allocates a list slot per label id up to the maximum: above this, relabel 1..n.
_MAX_DIRECT_LABEL = 1 << 20
# Percentiles are estimated on at most this many pixels per channel (strided sub-sample).
_PERCENTILE_SAMPLE = 1 << 20


@dataclass
class CellCrops:
    """Crops of the kept cells and a table of every labelled cell (kept or skipped, with why)."""

    crops: np.ndarray  # (N, C, S, S) float32, kept cells in crop_index order
    table: pd.DataFrame  # one row per labelled cell, see TABLE_COLUMNS

    @property
    def kept(self) -> pd.DataFrame:
        """Rows of the cropped cells, ordered like ``crops``."""
        rows = self.table[self.table["crop_index"] >= 0]
        return rows.sort_values("crop_index", kind="stable")

    @property
    def skipped(self) -> pd.DataFrame:
        return self.table[self.table["crop_index"] < 0]

    def __len__(self) -> int:
        return len(self.crops)

    def skip_summary(self) -> dict[str, int]:
        """``{reason: count}`` of the skipped cells, for messages; reasons that differ only in
        the cell's own number (``area above max_area (612 > 500)``) count as one
        (``area above max_area (> 500)``)."""
        reasons = (
            self.skipped["skip_reason"]
            .astype(str)
            .str.replace(r"\((\d+) ([<>]) (\d+)\)", r"(\2 \3)", regex=True)
        )
        return {str(k): int(v) for k, v in reasons.value_counts().items()}

    def save(self, path: str | os.PathLike, dtype: str = "float16") -> Path:
        """Write the crops as a ``.npy`` crops file (read lazily by ``store.CropStore`` and
        ``mevae train --targets FILE.npy``) and the table beside it as ``<name>.csv``."""
        from .outputs import OutputSet
        from .store import write_crops

        with OutputSet() as out:  # both files, or neither
            path = write_crops(Path(path), self.crops, dtype=dtype, outputs=out)
            with out.open(path.with_suffix(".csv"), newline="") as fh:
                self.table.to_csv(fh, index=False)
        return path


# -- input checking ---------------------------------------------------------------------------
def _check_labels(labels: Any) -> np.ndarray:
    """Integer label array; float labels must hold whole numbers.  Clear errors otherwise."""
    lab = np.asarray(labels)
    if lab.dtype == bool:
        return lab.astype(np.uint8)
    if lab.dtype.kind in "iu":
        if lab.dtype.kind == "i" and lab.size and lab.min() < 0:
            raise ValueError("labels must be >= 0 (0 = background); found negative label ids")
        return lab
    if lab.dtype.kind == "f":
        if lab.size and not np.isfinite(lab).all():
            raise ValueError("labels contain NaN or inf; a label image must hold whole numbers")
        if lab.size and not np.array_equal(lab, np.floor(lab)):
            raise ValueError(
                "labels must be integers (a float label image is accepted only when every value "
                "is a whole number); did you pass the intensity image as labels?"
            )
        if lab.size and lab.min() < 0:
            raise ValueError("labels must be >= 0 (0 = background); found negative label ids")
        big = lab.size and lab.max() >= 2**31
        return lab.astype(np.int64 if big else np.int32)
    raise TypeError(f"labels must be an integer array, got dtype {lab.dtype}")


def _as_planes(
    image: Any, labels: np.ndarray, channel_axis: int | None, stack: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Views ``(P, C, Y, X)`` of the image and ``(P, Y, X)`` of the labels (no pixel copy)."""
    img = np.asarray(image)
    if img.dtype.kind not in "biuf":
        raise TypeError(f"image must be a real numeric array, got dtype {img.dtype}")
    lab_ndim = 3 if stack else 2
    if labels.ndim != lab_ndim:
        hint = "" if stack else "; for a time/z stack pass stack=True"
        raise ValueError(
            f"labels must be {'(T|Z, Y, X)' if stack else '(Y, X)'}, got shape {labels.shape}{hint}"
        )
    spatial = labels.shape  # (Y, X) or (P, Y, X)
    if img.ndim == lab_ndim + 1:
        if channel_axis is None:
            # Infer the channel axis from where the labels' shape fits.
            candidates = [
                a for a in range(img.ndim) if tuple(np.delete(img.shape, a)) == tuple(spatial)
            ]
            if not candidates:
                raise ValueError(
                    f"label image shape {labels.shape} does not match image shape {img.shape} "
                    "(no axis of the image can be its channel axis)"
                )
            channel_axis = candidates[0]
        if not -img.ndim <= channel_axis < img.ndim:
            raise ValueError(
                f"channel_axis {channel_axis} is out of range for image shape {img.shape}"
            )
        axis = channel_axis % img.ndim
        img = np.moveaxis(img, axis, 1 if stack else 0)
    elif img.ndim == lab_ndim:
        if channel_axis is not None:
            raise ValueError(
                f"channel_axis={channel_axis} given but the image {img.shape} has no channel axis "
                f"(labels {labels.shape})"
            )
        img = img[:, None] if stack else img[None]
    else:
        raise ValueError(
            f"image shape {img.shape} does not fit label image shape {labels.shape}: expected the "
            f"labels' shape plus at most one channel axis"
        )
    if not stack:
        img, labels = img[None], labels[None]
    if img.shape[0] != labels.shape[0] or img.shape[2:] != labels.shape[1:]:
        got = img.shape[2:] if not stack else (img.shape[0], *img.shape[2:])
        raise ValueError(
            f"label image shape {spatial} does not match the image's spatial shape {got} "
            f"(image shape {np.shape(image)}, channel_axis={channel_axis})"
        )
    return img, labels


def _norm_params(
    img: np.ndarray,
    normalize: str | None,
    norm_range: Any,
    percentiles: Sequence[float],
) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel ``(lo, hi)`` for "percentile"/"range"; None otherwise."""
    n_ch = img.shape[1]
    if normalize == "range":
        if norm_range is None:
            raise ValueError(
                'normalize="range" needs norm_range=(lo, hi) (or one pair per channel)'
            )
        rng = np.asarray(norm_range, dtype=np.float64)
        if rng.shape == (2,):
            rng = np.broadcast_to(rng, (n_ch, 2))
        if rng.shape != (n_ch, 2):
            raise ValueError(f"norm_range must be (lo, hi) or {n_ch} pairs, got shape {rng.shape}")
        lo, hi = rng[:, 0].copy(), rng[:, 1].copy()
    elif normalize == "percentile":
        p_lo, p_hi = (float(p) for p in percentiles)
        if not 0 <= p_lo < p_hi <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= lo < hi <= 100, got {percentiles}")
        per_channel = img.shape[0] * img.shape[2] * img.shape[3]
        step = max(1, math.ceil(math.sqrt(per_channel / _PERCENTILE_SAMPLE)))
        lo, hi = np.zeros(n_ch), np.ones(n_ch)
        for c in range(n_ch):
            sample = np.asarray(img[:, c, ::step, ::step], dtype=np.float64).ravel()
            sample = sample[np.isfinite(sample)]
            if sample.size:
                lo[c], hi[c] = np.percentile(sample, [p_lo, p_hi])
    else:
        return None
    bad = ~(hi > lo)
    hi[bad] = lo[bad] + 1.0  # a flat channel maps to 0 rather than dividing by zero
    return lo.astype(np.float32), hi.astype(np.float32)


# -- public -----------------------------------------------------------------------------------
def extract_cells(
    image: Any,
    labels: Any,
    *,
    size: int = 64,
    channel_axis: int | None = None,
    stack: bool = False,
    scale: Literal["fixed", "fit"] = "fixed",
    fill_fraction: float = 0.8,
    mask: bool = True,
    normalize: Literal["percentile", "max", "range"] | None = "percentile",
    norm_range: Any = None,
    percentiles: Sequence[float] = (1, 99.8),
    min_area: int = 0,
    max_area: int | None = None,
    border: Literal["drop", "pad"] = "drop",
    align: bool = True,
    progress: Callable[[int, int], None] | None = None,
    order: int = 1,
) -> CellCrops:
    """Crop every labelled cell of ``image`` into a ``size`` x ``size`` canonical crop.

    ``image``: ``(Y, X)`` or with a channel axis (``channel_axis``; inferred from the labels'
    shape when None); with ``stack=True`` a ``(P, [C,] Y, X)`` stack and ``(P, Y, X)`` labels,
    ``channel_axis`` then indexes the full image array.  ``scale="fit"`` zooms each cell so its
    longest extent fills ``fill_fraction`` of the crop; ``"fixed"`` keeps pixel scale and skips
    cells larger than the crop.  ``mask`` zeroes background and other cells.  ``normalize``:
    ``"percentile"`` (per channel over the whole image), ``"max"`` (per cell and channel),
    ``"range"`` (fixed ``norm_range``) - all clipped to [0, 1] - or None (raw values).
    ``border="drop"`` skips cells touching the image edge, ``"pad"`` pads them with zeros.
    Skipped cells stay in the table with a ``skip_reason``.  NaN/inf pixels count as 0 (warned).
    """
    size = CropSettings(size=size, normalize=normalize, scale=scale, border=border).check().size
    if normalize == "none":
        normalize = None
    if not 0 < fill_fraction <= 1:
        raise ValueError(f"fill_fraction must be in (0, 1], got {fill_fraction}")
    if order not in (0, 1, 2, 3):
        raise ValueError(f"order (interpolation) must be 0..3, got {order}")

    lab_all = _check_labels(labels)
    img_all, lab_all = _as_planes(image, lab_all, channel_axis, stack)
    n_planes, n_ch, height, width = img_all.shape
    if not lab_all.any():
        raise ValueError("no cells: the label image is empty (all zeros)")

    nonfinite = False
    if img_all.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(img_all)))
        if bad:
            nonfinite = True
            warnings.warn(
                f"the image has {bad} NaN/inf pixel(s); they are treated as 0",
                RuntimeWarning,
                stacklevel=2,
            )
    params = _norm_params(img_all, normalize, norm_range, percentiles)
    if params is not None:
        lo = params[0][:, None, None]
        inv = (1.0 / (params[1] - params[0]))[:, None, None]

    def prepare(win: np.ndarray) -> np.ndarray:
        out = np.array(win, dtype=np.float32)  # always a fresh copy
        if nonfinite:
            np.nan_to_num(out, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        if params is not None:
            out -= lo
            out *= inv
            np.clip(out, 0.0, None, out=out)
        return out

    # One pass per plane over the label image; relabel first only for huge ids.
    objects: list[tuple[int, int, tuple[slice, ...], int]] = []
    plane_labels: list[np.ndarray] = []
    for p in range(n_planes):
        lab = lab_all[p]
        top = int(lab.max()) if lab.size else 0
        if top > _MAX_DIRECT_LABEL:
            ids, inverse = np.unique(lab, return_inverse=True)
            lab = inverse.reshape(lab.shape).astype(np.int32)
            if ids[0] != 0:  # no background at all: shift so 0 stays background
                ids = np.concatenate([[0], ids])
                lab += 1
        else:
            ids = None
        plane_labels.append(lab)
        for k, sl in enumerate(ndimage.find_objects(lab)):
            if sl is not None:
                original = int(ids[k + 1]) if ids is not None else k + 1
                objects.append((p, k + 1, sl, original))

    total = len(objects)
    _check_memory(total, n_ch, size)
    crops = np.zeros((total, n_ch, size, size), np.float32)
    rows: list[dict[str, Any]] = []
    n_kept = 0
    every = max(1, total // 100)
    for done, (p, value, sl, original) in enumerate(objects, 1):
        lab = plane_labels[p]
        img = img_all[p]
        cell = lab[sl] == value
        y0, x0, y1, x1 = sl[0].start, sl[1].start, sl[0].stop, sl[1].stop
        cell_img = prepare(img[:, y0:y1, x0:x1]) if (align or normalize == "max") else None
        cell_max = None
        if normalize == "max" and cell_img is not None:
            cell_max = cell_img[:, cell].max(axis=1) if cell.any() else np.zeros(n_ch)
            cell_max = np.where(cell_max > 0, cell_max, 1.0).astype(np.float32)
            cell_img = cell_img / cell_max[:, None, None]
        geo = geometry(cell, y0, x0, cell_img, align)
        reason = ""
        if geo.area < min_area:
            reason = f"area below min_area ({geo.area} < {min_area})"
        elif max_area is not None and geo.area > max_area:
            reason = f"area above max_area ({geo.area} > {max_area})"
        elif border == "drop" and (y0 == 0 or x0 == 0 or y1 == height or x1 == width):
            reason = "touches image border"
        elif scale == "fixed" and geo.extent > size:
            reason = "larger than crop"
        if not reason:
            zoom = 1.0 if scale == "fixed" else fill_fraction * size / geo.extent
            scale_c = None if cell_max is None else (1.0 / cell_max).astype(np.float32)
            crop = resample(
                img,
                lab if mask else None,
                value,
                geo,
                size,
                zoom,
                order,
                prepare,
                scale_c,
                (y0, x0, y1, x1),
            )
            if normalize is not None:
                np.clip(crop, 0.0, 1.0, out=crop)
            crops[n_kept] = crop
            crop_index = n_kept
            n_kept += 1
        else:
            crop_index = -1
        rows.append(
            dict(
                label=original,
                plane=p,
                centroid_y=geo.cy,
                centroid_x=geo.cx,
                area=geo.area,
                orientation=geo.orientation,
                bbox_y0=y0,
                bbox_x0=x0,
                bbox_y1=y1,
                bbox_x1=x1,
                crop_index=crop_index,
                skip_reason=reason,
            )
        )
        if progress is not None and (done % every == 0 or done == total):
            progress(done, total)

    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    # uint64 ids above 2**63 do not fit int64 (they came out negative)
    big_ids = bool(rows) and max(r["label"] for r in rows) > np.iinfo(np.int64).max
    table = table.astype(
        {
            "label": np.uint64 if big_ids else np.int64,
            "plane": np.int64,
            "area": np.int64,
            "crop_index": np.int64,
            **{c: np.int64 for c in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")},
        }
    )
    out = crops[:n_kept]
    if n_kept < 0.9 * total:
        out = out.copy()  # do not keep the unused slots alive
    return CellCrops(out, table)


def _available_memory() -> int | None:
    """Bytes this process may still allocate: free RAM, and the address-space limit
    (``ulimit -v``) when one is set; None when unknown."""
    free = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit != resource.RLIM_INFINITY:
            free = limit if free is None else min(free, limit)
    except (ImportError, OSError, ValueError):
        pass
    return free


def _check_memory(n_cells: int, channels: int, size: int) -> None:
    """Refuse, in one line, crops that cannot fit in memory, before allocating them."""
    need = 4 * n_cells * channels * size * size
    free = _available_memory()
    if free is not None and need > free:
        raise InputError(
            f"cropping {n_cells} cells of {channels} channel(s) at {size} px needs "
            f"{need / 2**30:.3g} GiB of memory, more than is free ({free / 2**30:.3g} GiB): "
            "use a smaller crop size or fewer cells"
        )


def _cell_mask(arr: np.ndarray) -> np.ndarray:
    """A cell mask for an unmasked crop: non-zero pixels (masked crops) or Otsu's threshold,
    largest connected component."""
    inten = np.clip(arr, 0, None).sum(0)
    if not inten.any():
        return np.zeros(inten.shape, bool)
    if (inten <= 0).mean() > 0.05:
        fg = inten > 0
    else:
        from skimage.filters import threshold_otsu

        fg = inten > threshold_otsu(inten)
    comp, n = ndimage.label(fg)
    if n > 1:
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        fg = comp == int(sizes.argmax())
    return fg


def canonical_pose(
    crop: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    scale: Literal["fixed", "fit"] = "fixed",
    fill_fraction: float = 0.8,
    size: int | None = None,
    order: int = 1,
) -> np.ndarray:
    """Put an existing crop ``(C, S, S)`` (or ``(S, S)``) of one cell in canonical pose.

    Same convention as :func:`extract_cells` with ``align=True``: major axis horizontal, then
    mirrored so the intensity-weighted centre of mass is right of and below the centre.  The
    cell's shape comes from ``mask`` when given (else non-zero pixels / Otsu threshold); the
    content is resampled, not masked, so anything far from the cell may leave the crop corners.
    ``scale="fit"`` also zooms the cell to fill ``fill_fraction`` of the crop.
    """
    arr = np.asarray(crop)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"crop must be a real numeric array, got dtype {arr.dtype}")
    squeeze = arr.ndim == 2
    if squeeze:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"crop must be (C, S, S) or (S, S), got shape {np.shape(crop)}")
    arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if scale not in ("fixed", "fit"):
        raise ValueError(f"scale must be 'fixed' or 'fit', got {scale!r}")
    out_size = int(size) if size is not None else max(arr.shape[1:])
    if mask is None:
        cell = _cell_mask(arr)
    else:
        cell = np.asarray(mask).astype(bool)
        if cell.shape != arr.shape[1:]:
            raise ValueError(f"mask shape {cell.shape} does not match crop shape {arr.shape[1:]}")
    if not cell.any():  # nothing to align on
        out = arr.copy()
        return out[0] if squeeze else out
    geo = geometry(cell, 0, 0, arr, align=True)
    zoom = 1.0 if scale == "fixed" else fill_fraction * out_size / geo.extent
    out = resample(arr, None, 0, geo, out_size, zoom, order, lambda w: np.array(w, np.float32))
    return out[0] if squeeze else out
