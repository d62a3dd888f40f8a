"""The image/labels layout check behind the Cells tab (pure function, no viewer)."""

from __future__ import annotations

import pytest

from napari_mevae._widgets._layers import infer_layout


@pytest.mark.parametrize(
    ("image", "labels", "rgb", "choice", "expected"),
    [
        ((64, 64), (64, 64), False, "auto", (None, False)),
        ((2, 64, 64), (64, 64), False, "auto", (0, False)),
        ((64, 64, 3), (64, 64), True, "auto", (2, False)),
        ((64, 64, 4), (64, 64), False, "auto", (2, False)),
        ((5, 64, 64), (5, 64, 64), False, "auto", (None, True)),
        ((5, 2, 64, 64), (5, 64, 64), False, "auto", (1, True)),
        ((2, 64, 64), (64, 64), False, "0", (0, False)),
        ((64, 64, 3), (64, 64), True, "-1", (2, False)),
        ((64, 64), (64, 64), False, "none", (None, False)),
    ],
)
def test_layouts(image, labels, rgb, choice, expected):
    assert infer_layout(image, labels, rgb, choice) == expected


@pytest.mark.parametrize(
    ("image", "labels", "choice", "words"),
    [
        ((2, 64, 64), (100, 120), "auto", "does not match the image"),
        ((64, 64), (32, 32), "none", "does not match"),
        ((2, 64, 64), (64, 64), "1", "without channel axis 1"),
        ((2, 64, 64), (64, 64), "3", "does not exist"),
        ((2, 2, 2, 64, 64), (2, 2, 64, 64), "auto", "2-D (Y, X) or a stack"),
    ],
)
def test_bad_layouts_explain(image, labels, choice, words):
    with pytest.raises(ValueError, match=r".*") as info:
        infer_layout(image, labels, False, choice)
    assert words in str(info.value)
