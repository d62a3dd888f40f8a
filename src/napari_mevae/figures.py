"""Pictures people would rather look at than read: image grids, latent walks, UMAP plots.

Written with Pillow and matplotlib's Agg backend, never a GUI toolkit, so they work on
clusters and in tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .outputs import atomic_write

__all__ = ["montage", "to_display", "save_png", "save_grid", "save_latent_walk", "save_umap_plot"]


def to_display(images: np.ndarray) -> np.ndarray:
    """``(N, C, S, S)`` in [0, 1] -> ``(N, S, S)`` grey (C = 1 or > 3: first channel) or
    ``(N, S, S, 3)`` colour (C = 2 or 3: channels as R, G(, B))."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
        return images
    c = images.shape[1]
    if c in (2, 3):
        rgb = np.zeros((images.shape[0], 3, *images.shape[2:]), np.float32)
        rgb[:, :c] = images
        return np.moveaxis(rgb, 1, -1)
    return images[:, 0]


def montage(images: np.ndarray, ncols: int = 8, pad: int = 1, fill: float = 1.0) -> np.ndarray:
    """Tile images ``(N, S, S[, 3])`` or ``(N, C, S, S)`` into one grid, ``ncols`` per row."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 4 and images.shape[-1] != 3:
        images = to_display(images)
    n = images.shape[0]
    if n == 0:
        raise ValueError("no images to tile")
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    h, w = images.shape[1:3]
    extra = images.shape[3:]
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, *extra), fill, np.float32)
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Save a float image in [0, 1] (grey or RGB) as 8-bit PNG."""
    from PIL import Image

    path = Path(path)
    arr = np.round(np.clip(np.nan_to_num(image), 0, 1) * 255).astype(np.uint8)
    with atomic_write(path, "wb") as fh:  # never a half-written PNG, Ctrl-C included
        Image.fromarray(arr).save(fh, format="PNG")
    return path


def save_grid(path: str | os.PathLike, images: np.ndarray, n: int = 64, ncols: int = 8) -> Path:
    """An ``ncols`` x ``ncols`` grid of the first ``n`` images as PNG, or TIFF by suffix."""
    grid = montage(np.asarray(images)[:n], ncols=ncols)
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        with atomic_write(path, "wb") as fh:  # whole or absent, as the PNGs
            tifffile.imwrite(fh, np.round(np.clip(grid, 0, 1) * 255).astype(np.uint8))
        return path
    return save_png(path, grid)


def save_latent_walk(path: str | os.PathLike, walk: np.ndarray) -> Path:
    """One row per latent dimension, one column per step: walk is ``(L, steps, C, S, S)``."""
    walk = np.asarray(walk)
    rows, steps = walk.shape[:2]
    flat = walk.reshape(rows * steps, *walk.shape[2:])
    return save_png(path, montage(flat, ncols=steps))


def _class_colours(clusters: np.ndarray, truth: np.ndarray) -> dict:
    """Colour index of each true class: that of the cluster matched to it (the one-to-one
    matching that agrees on the most cells), so the two panels show the same colour where the
    clustering found a class; classes left over take colours after the clusters'."""
    from scipy.optimize import linear_sum_assignment

    ids, classes = np.unique(clusters), np.unique(truth)
    table = np.array([[np.sum((truth == t) & (clusters == c)) for c in ids] for t in classes])
    rows, cols = linear_sum_assignment(-table)
    colours = {classes[r]: int(c) for r, c in zip(rows, cols, strict=True)}
    spare = iter(range(len(ids), len(ids) + len(classes)))
    return {t: colours[t] if t in colours else next(spare) for t in classes}


def save_umap_plot(
    path: str | os.PathLike,
    embedding: np.ndarray,
    clusters: np.ndarray,
    title: str = "ME-VAE latent space (UMAP)",
    truth: np.ndarray | None = None,
    truth_names: list[str] | None = None,
) -> Path:
    """Scatter of the UMAP embedding coloured by cluster, and beside it by true class when
    known (``truth_names[t]`` names class ``t`` in the legend), each class in the colour of
    the cluster that matches it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    clusters = np.asarray(clusters)
    palette = colormaps["tab10"]
    ids = np.unique(clusters)
    panels = [("cluster", clusters, {c: i for i, c in enumerate(ids)}, str)]
    if truth is not None:
        truth = np.asarray(truth)
        name = (lambda t: truth_names[int(t)]) if truth_names is not None else str
        panels.append(("true class", truth, _class_colours(clusters, truth), name))
    fig = Figure(figsize=(5 * len(panels), 4.5), dpi=100)
    for i, (kind, values, colours, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for v in np.unique(values):
            at = values == v
            colour = palette(colours[v] % palette.N)
            ax.scatter(*embedding[at, :2].T, color=colour, s=12, alpha=0.85, label=label(v))
        ax.set_xlabel("UMAP0")
        ax.set_ylabel("UMAP1")
        ax.set_title(f"{title}\ncoloured by {kind}", fontsize=10)
        ax.legend(title=kind, fontsize=7, title_fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png")
    return path
