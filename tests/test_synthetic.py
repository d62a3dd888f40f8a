"""Synthetic cells: shapes, clean labels, classes, speed, and that they crop canonically."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from napari_mevae.cells import extract_cells
from napari_mevae.synthetic import SyntheticCells, make_synthetic_cells, synthetic_crops


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_field_shapes_and_classes(channels):
    syn = make_synthetic_cells(n_cells=20, shape=(160, 200), channels=channels, n_classes=3, seed=1)
    assert isinstance(syn, SyntheticCells)
    assert syn.image.shape == (channels, 160, 200) and syn.image.dtype == np.float32
    assert syn.labels.shape == (160, 200) and syn.labels.dtype == np.int32
    ids = set(np.unique(syn.labels).tolist()) - {0}
    assert ids == set(syn.classes) == set(range(1, 21))
    assert set(syn.classes.values()) <= {0, 1, 2}
    assert len(syn.class_names) == 3
    assert np.isfinite(syn.image).all() and syn.image.min() >= 0
    # cells are brighter than the background
    assert syn.image[0][syn.labels > 0].mean() > 3 * syn.image[0][syn.labels == 0].mean()


def test_cells_do_not_touch_each_other_or_the_border():
    syn = make_synthetic_cells(seed=3)
    labels = syn.labels
    assert labels.max() == 40
    grown_max = ndimage.maximum_filter(labels, size=3)
    fg = np.where(labels > 0, labels, labels.max() + 1)
    grown_min = ndimage.minimum_filter(fg, size=3)
    # in every 3x3 neighbourhood of a cell pixel there is only that cell (or background)
    cell = labels > 0
    assert (grown_max[cell] == labels[cell]).all()
    assert (grown_min[cell] == labels[cell]).all()
    # and no two cells share a background pixel's neighbourhood either (gap >= 2 px)
    bg = ~cell
    assert ((grown_max[bg] == 0) | (grown_min[bg] == grown_max[bg])).all()
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    assert not border.any()


def test_reproducible_fast_and_classes_vary():
    start = time.perf_counter()
    a = make_synthetic_cells()
    assert time.perf_counter() - start < 1.0
    b = make_synthetic_cells()
    c = make_synthetic_cells(seed=1)
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.labels, c.labels)
    assert len(set(a.classes.values())) == 3
    many = make_synthetic_cells(n_cells=10, n_classes=7, shape=(200, 200))
    assert len(many.class_names) == 7


def test_too_many_cells_warns():
    with pytest.warns(RuntimeWarning, match="fit"):
        syn = make_synthetic_cells(n_cells=60, shape=(96, 96))
    assert 0 < syn.labels.max() < 60


def test_bad_arguments():
    with pytest.raises(ValueError, match="channels"):
        make_synthetic_cells(channels=4)
    with pytest.raises(ValueError, match="n_classes"):
        make_synthetic_cells(n_classes=0)


def test_synthetic_crops():
    crops, classes = synthetic_crops(n=30, size=32, channels=2, n_classes=3, seed=0)
    assert crops.shape == (30, 2, 32, 32) and crops.dtype == np.float32
    assert classes.shape == (30,) and set(classes.tolist()) <= {0, 1, 2}
    assert crops.min() >= 0 and crops.max() <= 1
    again, _ = synthetic_crops(n=30, size=32, channels=2, n_classes=3, seed=0)
    np.testing.assert_array_equal(crops, again)
    # canonical pose: wide, centre of mass right of and below the centre
    w = crops.sum(1).mean(0)
    yy, xx = np.mgrid[0:32, 0:32]
    assert (w * xx).sum() / w.sum() > 15.5 and (w * yy).sum() / w.sum() > 15.5
    rows, cols = np.nonzero(w > 0.05)
    assert np.ptp(cols) > 1.5 * np.ptp(rows)


def test_field_crops_like_synthetic_crops():
    syn = make_synthetic_cells(n_cells=30, shape=(256, 256), channels=2, seed=2)
    cells = extract_cells(syn.image, syn.labels, size=32, channel_axis=0, scale="fit")
    assert len(cells.crops) == 30  # nothing touches the border, everything fits
    assert (cells.table["skip_reason"] == "").all()
    nucleus = cells.crops[:, 1]
    yy, xx = np.mgrid[0:32, 0:32]
    com_x = (nucleus * xx).sum((1, 2)) / nucleus.sum((1, 2))
    assert (com_x > 15.5).mean() > 0.9  # the nucleus ends on the canonical side
