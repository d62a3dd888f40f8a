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
    cells to fit without touching (crop size 48 keeps every cell at its own scale)."""
    from .synthetic import make_synthetic_cells

    s = make_synthetic_cells(n_cells=n_cells, shape=shape, channels=2, n_classes=3, seed=seed)
    names = list(getattr(s, "class_names", []) or [])
    ids = sorted(int(k) for k in s.classes)
    truth = [s.classes[k] for k in ids]
    features = pd.DataFrame(
        {
            "index": np.asarray(ids, dtype=np.int64),
            "true_class": [
                names[c] if isinstance(c, int | np.integer) and 0 <= c < len(names) else str(c)
                for c in truth
            ],
        }
    )
    image_kw = {"name": "synthetic cells"}
    labels_kw = {"name": "synthetic cells labels", "features": features, "opacity": 0.5}
    return [
        (np.asarray(s.image, dtype=np.float32), image_kw, "image"),
        (np.asarray(s.labels, dtype=np.int32), labels_kw, "labels"),
    ]
