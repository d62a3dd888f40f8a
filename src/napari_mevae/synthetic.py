"""Synthetic fluorescence cells with known phenotype classes, orientation and polarity.

For demos, tests and benchmarks without real data: elongated cells (so the orientation is
defined) with an off-centre nucleus and a brighter pole (so the polarity is defined), placed
at random positions, angles and mirrorings, never touching each other or the image border.
Phenotype classes differ in nucleus size, spot count, elongation and texture, so a good
(nuisance-invariant) representation should separate them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["SyntheticCells", "make_synthetic_cells", "synthetic_crops", "PHENOTYPES"]

# name, elongation (major/minor), nucleus size (fraction of the cell), spots, texture
PHENOTYPES: list[tuple[str, float, float, int, float]] = [
    ("small nucleus", 2.2, 0.35, 0, 0.05),
    ("large nucleus", 2.2, 0.65, 0, 0.05),
    ("spotted", 2.2, 0.35, 7, 0.05),
    ("elongated", 3.4, 0.35, 0, 0.05),
    ("textured", 2.2, 0.45, 0, 0.45),
]


@dataclass
class SyntheticCells:
    """A synthetic field of view: image, labels and the true class of each cell."""

    image: np.ndarray  # (C, Y, X) float32
    labels: np.ndarray  # (Y, X) int32, 0 = background, cells 1..N
    classes: dict[int, int]  # label id -> phenotype class index
    class_names: list[str]


def _phenotypes(n_classes: int) -> list[tuple[str, float, float, int, float]]:
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    out = list(PHENOTYPES[:n_classes])
    rng = np.random.default_rng(12345)  # extra classes: fixed random mixtures
    for i in range(len(out), n_classes):
        out.append(
            (
                f"class {i}",
                float(rng.uniform(1.8, 3.4)),
                float(rng.uniform(0.3, 0.65)),
                int(rng.integers(0, 8)),
                float(rng.uniform(0.05, 0.45)),
            )
        )
    return out


def _render(
    dy: np.ndarray,
    dx: np.ndarray,
    phi: float,
    mirror: bool,
    a: float,
    b: float,
    pheno: tuple[str, float, float, int, float],
    channels: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """One cell on the grid of offsets ``dy, dx`` from its centre: (mask, (C, h, w) intensity).

    The major axis points along ``phi`` (radians, from the column axis towards the rows); the
    nucleus and the bright pole sit at +major, and at +minor (or -minor when ``mirror``).
    """
    _, _, nuc_frac, n_spots, texture = pheno
    ux, uy = math.cos(phi), math.sin(phi)  # major axis (col, row)
    sv = -1.0 if mirror else 1.0
    vx, vy = -uy * sv, ux * sv
    pu = dx * ux + dy * uy
    pv = dx * vx + dy * vy
    cell = (pu / a) ** 2 + (pv / b) ** 2 <= 1.0
    shape = cell.shape
    # cytoplasm: brighter towards the +major pole, smooth texture
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    noise /= noise.std() + 1e-9
    cyto = (0.45 + 0.2 * pu / a + texture * 0.5 * noise) * cell
    # nucleus: off-centre ellipse towards +major, +minor
    na, nb = nuc_frac * a * 0.75, min(nuc_frac * b * 1.3, 0.8 * b)
    cu, cv = 0.55 * (a - na), 0.35 * (b - nb)
    nuc = ((pu - cu) / na) ** 2 + ((pv - cv) / nb) ** 2 <= 1.0
    nucleus = (0.9 + 0.1 * noise) * nuc * cell
    # spots: small bright dots inside the cytoplasm
    spots = np.zeros(shape)
    for _ in range(n_spots):
        for _try in range(20):
            su, sv_ = rng.uniform(-0.8, 0.8) * a, rng.uniform(-0.7, 0.7) * b
            if (su / a) ** 2 + (sv_ / b) ** 2 < 0.6:
                break
        px = su * ux + sv_ * vx
        py = su * uy + sv_ * vy
        spots += np.exp(-((dx - px) ** 2 + (dy - py) ** 2) / (2 * 1.0**2))
    spots = np.clip(spots, 0, 1) * 0.8 * cell
    if channels == 1:
        chans = [0.6 * cyto + 0.6 * nucleus + spots]
    elif channels == 2:
        chans = [cyto + spots, nucleus]
    elif channels == 3:
        chans = [cyto, nucleus, spots + 0.1 * cell]
    else:
        raise ValueError(f"channels must be 1, 2 or 3, got {channels}")
    return cell, np.clip(np.stack(chans), 0, None)


def _axes(radius: float, elong: float, jitter: float) -> tuple[float, float]:
    """Semi-axes with the area of a disc of ``radius`` (times ``jitter``)."""
    r = radius * jitter
    return r * math.sqrt(elong), r / math.sqrt(elong)


def make_synthetic_cells(
    n_cells: int = 40,
    shape: tuple[int, int] = (256, 256),
    channels: int = 2,
    n_classes: int = 3,
    cell_radius: float = 12,
    seed: int = 0,
) -> SyntheticCells:
    """A field of ``n_cells`` non-touching cells of ``n_classes`` phenotypes.

    Channel 0 cytoplasm (+ spots), 1 nucleus, 2 spots (``channels`` 1..3; one channel mixes them).
    Blur, background and noise make it look like a fluorescence image.  If the cells do not all
    fit, as many as fit are placed (with a warning).
    """
    if channels not in (1, 2, 3):
        raise ValueError(f"channels must be 1, 2 or 3, got {channels}")
    if n_cells < 0:
        raise ValueError(f"n_cells must be >= 0, got {n_cells}")
    if cell_radius <= 1:
        raise ValueError(f"cell_radius must be > 1, got {cell_radius}")
    rng = np.random.default_rng(seed)
    phenos = _phenotypes(n_classes)
    height, width = (int(s) for s in shape)
    image = np.zeros((channels, height, width), np.float64)
    labels = np.zeros((height, width), np.int32)
    classes: dict[int, int] = {}
    occupied = np.zeros((height, width), bool)  # cells grown by the gap: no one else here
    gap = 2
    grow = np.ones((2 * gap + 1, 2 * gap + 1), bool)
    for _ in range(n_cells):
        cls = int(rng.integers(0, n_classes))
        a, b = _axes(cell_radius, phenos[cls][1], rng.uniform(0.85, 1.15))
        phi = rng.uniform(0, 2 * math.pi)
        half = int(math.ceil(a)) + 2
        lo, hi_y, hi_x = half + 1, height - half - 2, width - half - 2
        if hi_y <= lo or hi_x <= lo:
            break
        dy, dx = np.mgrid[-half : half + 1, -half : half + 1].astype(float)
        ux, uy = math.cos(phi), math.sin(phi)
        pu, pv = dx * ux + dy * uy, -dx * uy + dy * ux
        shape_mask = (pu / a) ** 2 + (pv / b) ** 2 <= 1.0
        placed = None
        for _attempt in range(2000):
            cy, cx = int(rng.integers(lo, hi_y + 1)), int(rng.integers(lo, hi_x + 1))
            ys, xs = slice(cy - half, cy + half + 1), slice(cx - half, cx + half + 1)
            if not occupied[ys, xs][shape_mask].any():
                placed = (cy, cx, ys, xs)
                break
        if placed is None:
            continue
        cy, cx, ys, xs = placed
        label = len(classes) + 1
        mirror = bool(rng.integers(0, 2))
        cell, inten = _render(dy, dx, phi, mirror, a, b, phenos[cls], channels, rng)
        labels[ys, xs][cell] = label
        occupied[ys, xs] |= ndimage.binary_dilation(cell, grow)
        image[:, ys, xs] += inten
        classes[label] = cls
    if len(classes) < n_cells:
        warnings.warn(
            f"only {len(classes)} of {n_cells} cells fit in {shape} without touching; use a larger "
            "shape or a smaller cell_radius",
            RuntimeWarning,
            stacklevel=2,
        )
    image = ndimage.gaussian_filter(image, sigma=(0, 1.0, 1.0))
    image += 0.04 + 0.015 * rng.standard_normal(image.shape)
    np.clip(image, 0, None, out=image)
    return SyntheticCells(
        image.astype(np.float32), labels, classes, [p[0] for p in phenos[:n_classes]]
    )


def synthetic_crops(
    n: int = 64, size: int = 32, channels: int = 1, n_classes: int = 3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` canonical crops ``(n, C, size, size)`` in [0, 1] and their classes ``(n,)``.

    Already in the pose :func:`napari_mevae.cells.extract_cells` produces (major axis
    horizontal, nucleus right of and below the centre, background masked to 0), so they can be
    fed straight to :class:`napari_mevae.nuisances.NuisancePairs`.
    """
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    rng = np.random.default_rng(seed)
    phenos = _phenotypes(n_classes)
    classes = rng.integers(0, n_classes, n).astype(np.int64)
    crops = np.zeros((n, channels, size, size), np.float32)
    m = (size - 1) / 2.0
    dy, dx = np.mgrid[0:size, 0:size].astype(float) - m
    for i, cls in enumerate(classes):
        pheno = phenos[int(cls)]
        a = 0.4 * size * rng.uniform(0.9, 1.05)
        b = a / pheno[1] * rng.uniform(0.9, 1.1)
        cell, inten = _render(dy, dx, 0.0, False, a, b, pheno, channels, rng)
        inten = ndimage.gaussian_filter(inten, sigma=(0, 0.7, 0.7))
        inten += 0.02 * rng.standard_normal(inten.shape)
        crops[i] = np.clip(inten * cell, 0, 1)
    return crops, classes
