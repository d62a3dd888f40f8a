"""How one cell is measured and resampled into its crop: moments, orientation and polarity
(:func:`geometry`), and the affine resampling of a small window around it (:func:`resample`,
with a fast bilinear path).  Used by :mod:`napari_mevae.cells`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["Geometry", "bilinear", "geometry", "resample"]


@dataclass
class Geometry:
    area: int
    cy: float  # centroid, full-image coordinates
    cx: float
    orientation: float
    center: np.ndarray  # crop centre (row, col), full-image coordinates
    u: np.ndarray  # image direction of the crop's columns (major axis when aligned)
    v: np.ndarray  # image direction of the crop's rows
    extent: float  # largest extent (pixels) along u or v
    half_u: float = 0.0  # half extent (pixels) along u / v about ``center``
    half_v: float = 0.0


def geometry(
    cell: np.ndarray, y0: int, x0: int, weights_img: np.ndarray | None, align: bool
) -> Geometry:
    """Moments, orientation and polarity of one cell from its bounding-box mask."""
    rr, cc = np.nonzero(cell)
    area = int(rr.size)
    cy, cx = rr.sum() / area, cc.sum() / area
    dr, dc = rr - cy, cc - cx
    vrr, vcc, vrc = dr @ dr / area, dc @ dc / area, dr @ dc / area
    theta = 0.5 * math.atan2(2.0 * vrc, vrr - vcc)  # == regionprops(...).orientation
    if align:
        u = np.array([math.cos(theta), math.sin(theta)])  # major axis (row, col)
        v = np.array([-math.sin(theta), math.cos(theta)])
    else:
        u, v = np.array([0.0, 1.0]), np.array([1.0, 0.0])
    pu = dr * u[0] + dc * u[1]
    pv = dr * v[0] + dc * v[1]
    pu_lo, pu_hi, pv_lo, pv_hi = pu.min(), pu.max(), pv.min(), pv.max()
    mid_u, mid_v = 0.5 * (pu_hi + pu_lo), 0.5 * (pv_hi + pv_lo)
    ext = max(pu_hi - pu_lo, pv_hi - pv_lo) + 1.0
    if align:
        w = None
        if weights_img is not None:
            w = weights_img[:, rr, cc].sum(0, dtype=np.float64)
            np.maximum(w, 0.0, out=w)
            wsum = w.sum()
            if not (np.isfinite(wsum) and wsum > 1e-12):
                w = None
        if w is None:  # a dark cell: polarity from its shape alone
            w, wsum = np.ones(area), float(area)
        if (w @ pu) / wsum - mid_u < 0:
            u, mid_u = -u, -mid_u
        if (w @ pv) / wsum - mid_v < 0:
            v, mid_v = -v, -mid_v
    center = np.array([cy + y0, cx + x0]) + mid_u * u + mid_v * v
    half_u, half_v = 0.5 * float(pu_hi - pu_lo), 0.5 * float(pv_hi - pv_lo)
    return Geometry(
        area, float(cy + y0), float(cx + x0), theta, center, u, v, float(ext), half_u, half_v
    )


def resample(
    img: np.ndarray,
    labels: np.ndarray | None,
    value: int,
    geo: Geometry,
    size: int,
    zoom: float,
    order: int,
    prepare: Callable[[np.ndarray], np.ndarray],
    channel_scale: np.ndarray | None = None,
    bbox: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """The ``(C, size, size)`` crop: only a window around the cell is copied and resampled."""
    n_ch, height, width = img.shape
    a = np.column_stack([geo.v, geo.u]) / zoom  # d(image row, col) / d(crop i, j)
    m = (size - 1) / 2.0
    offset = geo.center - a @ np.array([m, m])
    corners = np.array([[0, 0], [0, size - 1], [size - 1, 0], [size - 1, size - 1]], float)
    pts = corners @ a.T + offset
    blur = 0.5 * (1.0 / zoom - 1.0) if zoom < 0.75 else 0.0  # anti-alias strong shrinking
    pad = 2 + int(math.ceil(3 * blur))
    wy0 = max(0, int(math.floor(pts[:, 0].min())) - pad)
    wx0 = max(0, int(math.floor(pts[:, 1].min())) - pad)
    wy1 = min(height, int(math.ceil(pts[:, 0].max())) + pad + 1)
    wx1 = min(width, int(math.ceil(pts[:, 1].max())) + pad + 1)
    if labels is not None and bbox is not None:  # masked: nothing outside the cell matters
        wy0, wx0 = max(wy0, bbox[0] - pad), max(wx0, bbox[1] - pad)
        wy1, wx1 = min(wy1, bbox[2] + pad), min(wx1, bbox[3] + pad)
    if wy1 <= wy0 or wx1 <= wx0:
        return np.zeros((n_ch, size, size), np.float32)
    win = prepare(img[:, wy0:wy1, wx0:wx1])
    if channel_scale is not None:
        win *= channel_scale[:, None, None]
    if labels is not None:  # zero the background and the other cells
        win *= labels[wy0:wy1, wx0:wx1] == value
    if blur > 0:
        win = ndimage.gaussian_filter(win, sigma=(0, blur, blur), mode="constant")
    off = offset - np.array([wy0, wx0])
    if order == 1:
        rows = cols = (0, size)
        if labels is not None:  # masked: only the cell's own rectangle of the crop is non-zero
            margin = 2.0 + 3 * blur
            hj = (geo.half_u + margin) * zoom
            hi = (geo.half_v + margin) * zoom
            cols = (max(0, int(math.floor(m - hj))), min(size, int(math.ceil(m + hj)) + 1))
            rows = (max(0, int(math.floor(m - hi))), min(size, int(math.ceil(m + hi)) + 1))
        return bilinear(win, a, off, size, rows, cols)
    mat = np.eye(3)
    mat[1:, 1:] = a
    return ndimage.affine_transform(
        win,
        mat,
        np.array([0.0, off[0], off[1]]),
        output_shape=(n_ch, size, size),
        order=order,
        mode="constant",
        cval=0.0,
        prefilter=order > 1,
    ).astype(np.float32, copy=False)


def bilinear(
    win: np.ndarray,
    a: np.ndarray,
    off: np.ndarray,
    size: int,
    rows: tuple[int, int] = (0, 0),
    cols: tuple[int, int] = (0, 0),
) -> np.ndarray:
    """Bilinear affine resampling of all channels at once with zero padding, equal to
    ``ndimage.affine_transform(order=1, mode="grid-constant")`` but several times faster here:
    the weights are shared by the channels and only output ``rows`` x ``cols`` is computed."""
    n_ch, h, w = win.shape
    out = np.zeros((n_ch, size, size), np.float32)
    (i0, i1), (j0, j1) = rows, cols
    if i1 <= i0 or j1 <= j0:
        i0, i1, j0, j1 = 0, size, 0, size
    ii = np.arange(i0, i1, dtype=np.float64)[:, None]
    jj = np.arange(j0, j1, dtype=np.float64)[None, :]
    r = (a[0, 0] * ii + a[0, 1] * jj + off[0]).ravel()
    c = (a[1, 0] * ii + a[1, 1] * jj + off[1]).ravel()
    r0 = np.floor(r)
    c0 = np.floor(c)
    fr = (r - r0).astype(np.float32)
    fc = (c - c0).astype(np.float32)
    # Pad by 2 zero pixels and clip: any sample outside the window then reads only zeros.
    padded = np.zeros((n_ch, h + 4, w + 4), np.float32)
    padded[:, 2:-2, 2:-2] = win
    pw = w + 4
    r0 = np.clip(r0, -2, h).astype(np.intp) + 2
    c0 = np.clip(c0, -2, w).astype(np.intp) + 2
    base = r0 * pw + c0
    flat = padded.reshape(n_ch, -1)
    gfr, gfc = 1 - fr, 1 - fc
    acc = np.take(flat, base, axis=1)
    acc *= gfr * gfc
    for shift, wgt in ((1, gfr * fc), (pw, fr * gfc), (pw + 1, fr * fc)):
        vals = np.take(flat, base + shift, axis=1)
        vals *= wgt
        acc += vals
    out[:, i0:i1, j0:j1] = acc.reshape(n_ch, i1 - i0, j1 - j0)
    return out
