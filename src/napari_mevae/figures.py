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


def save_umap_plot(
    path: str | os.PathLike,
    embedding: np.ndarray,
    clusters: np.ndarray,
    title: str = "ME-VAE latent space (UMAP)",
    truth: np.ndarray | None = None,
) -> Path:
    """Scatter of the UMAP embedding coloured by cluster (and by true class when known)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    panels = 1 if truth is None else 2
    fig = Figure(figsize=(5 * panels, 4.5), dpi=100)
    for i, (values, name) in enumerate(
        [(clusters, "cluster"), *([(truth, "true class")] if truth is not None else [])]
    ):
        ax = fig.add_subplot(1, panels, i + 1)
        sc = ax.scatter(embedding[:, 0], embedding[:, 1], c=values, cmap="tab10", s=12, alpha=0.85)
        ax.set_xlabel("UMAP0")
        ax.set_ylabel("UMAP1")
        ax.set_title(f"{title}\ncoloured by {name}", fontsize=10)
        handles, labels = sc.legend_elements()
        ax.legend(handles, labels, title=name, fontsize=7, title_fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png")
    return path
