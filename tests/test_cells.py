"""Cropping segmented cells into canonical crops: shapes, table, pose, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.draw import ellipse
from skimage.measure import regionprops

from napari_mevae.cells import TABLE_COLUMNS, CellCrops, canonical_pose, extract_cells
from napari_mevae.synthetic import PHENOTYPES, _render


def _field(shape=(64, 64), channels: int | None = None, seed: int = 0):
    """Three separate elliptical cells (labels 1, 2, 5) and a matching intensity image."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    for value, (r, c, a, b, rot) in zip(
        (1, 2, 5), [(16, 16, 5, 10, 0.4), (44, 20, 4, 9, -0.8), (30, 46, 6, 11, 1.3)], strict=True
    ):
        rr, cc = ellipse(r, c, a, b, rotation=rot, shape=shape)
        labels[rr, cc] = value
    n = 1 if channels is None else channels
    image = rng.uniform(0.0, 0.2, (n, *shape)).astype(np.float32)
    image += (labels > 0) * rng.uniform(0.5, 1.0, (n, 1, 1)).astype(np.float32)
    return (image[0] if channels is None else image), labels


def _asymmetric_cell(size: int = 96):
    """One elongated cell with an off-centre nucleus and spots (polarity defined)."""
    dy, dx = np.mgrid[0:size, 0:size].astype(float) - (size - 1) / 2
    cell, inten = _render(dy, dx, 0.3, False, 22, 10, PHENOTYPES[2], 2, np.random.default_rng(0))
    return ndimage.gaussian_filter(inten, (0, 1, 1)).astype(np.float32), cell.astype(np.int32)


def test_2d_shapes_and_table():
    image, labels = _field()
    cells = extract_cells(image, labels, size=32)
    assert isinstance(cells, CellCrops)
    assert cells.crops.shape == (3, 1, 32, 32)
    assert cells.crops.dtype == np.float32
    assert list(cells.table.columns) == TABLE_COLUMNS
    assert len(cells.table) == 3
    assert cells.table["label"].tolist() == [1, 2, 5]
    assert (cells.table["plane"] == 0).all()
    assert cells.kept["crop_index"].tolist() == [0, 1, 2]
    assert (cells.table["skip_reason"] == "").all()
    assert cells.crops.min() >= 0.0 and cells.crops.max() <= 1.0
    assert cells.crops.reshape(3, -1).max(1).min() > 0.5  # every crop holds its cell


def test_table_matches_regionprops():
    image, labels = _field()
    table = extract_cells(image, labels, size=32).table.set_index("label")
    for p in regionprops(labels):
        row = table.loc[p.label]
        assert row["area"] == p.area
        assert row["centroid_y"] == pytest.approx(p.centroid[0])
        assert row["centroid_x"] == pytest.approx(p.centroid[1])
        assert row["orientation"] == pytest.approx(p.orientation)
        assert (row["bbox_y0"], row["bbox_x0"], row["bbox_y1"], row["bbox_x1"]) == p.bbox


def test_channel_first_and_last_with_24_channels_agree():
    image, labels = _field(channels=24)
    first = extract_cells(image, labels, size=32, channel_axis=0)
    last = extract_cells(np.moveaxis(image, 0, -1), labels, size=32, channel_axis=-1)
    inferred = extract_cells(np.moveaxis(image, 0, -1), labels, size=32)
    assert first.crops.shape == (3, 24, 32, 32)
    np.testing.assert_allclose(first.crops, last.crops, atol=1e-6)
    np.testing.assert_allclose(first.crops, inferred.crops, atol=1e-6)


def test_stack_plane_by_plane():
    image, labels = _field(channels=2)
    img_stack = np.stack([image, image[:, ::-1]])  # (T, C, Y, X)
    lab_stack = np.stack([labels, labels[::-1]])
    lab_stack[1][lab_stack[1] == 2] = 0  # plane 1 lacks cell 2
    cells = extract_cells(img_stack, lab_stack, size=32, channel_axis=1, stack=True)
    assert cells.crops.shape == (5, 2, 32, 32)
    assert cells.table["plane"].tolist() == [0, 0, 0, 1, 1]
    assert cells.table["label"].tolist() == [1, 2, 5, 1, 5]
    single = extract_cells(image, labels, size=32, channel_axis=0)
    np.testing.assert_allclose(cells.crops[:3], single.crops, atol=1e-4)
    # a one-channel stack (T, Y, X)
    mono = extract_cells(img_stack[:, 0], lab_stack, size=32, stack=True)
    assert mono.crops.shape == (5, 1, 32, 32)


def test_skip_reasons_border_size_area():
    image, labels = _field()
    rr, cc = ellipse(2, 60, 4, 4, shape=labels.shape)  # touches the border
    labels[rr, cc] = 7
    cells = extract_cells(image, labels, size=32, min_area=60)
    reasons = dict(zip(cells.table["label"], cells.table["skip_reason"], strict=True))
    assert reasons[7].startswith("area below") or reasons[7] == "touches image border"
    cells = extract_cells(image, labels, size=32)
    reasons = dict(zip(cells.table["label"], cells.table["skip_reason"], strict=True))
    assert reasons[7] == "touches image border"
    assert cells.table.set_index("label").loc[7, "crop_index"] == -1
    assert len(cells.crops) == 3 == len(cells.kept)
    assert extract_cells(image, labels, size=32, border="pad").crops.shape[0] == 4

    small = extract_cells(image, labels, size=16)  # cells of ~20 px length do not fit 16
    assert "larger than crop" in set(small.table["skip_reason"])
    assert small.skip_summary()["larger than crop"] >= 1
    fit = extract_cells(image, labels, size=16, scale="fit", border="pad")
    assert len(fit.crops) == 4 and (fit.table["skip_reason"] == "").all()

    area = extract_cells(image, labels, size=32, min_area=140, max_area=200)
    for _, row in area.table.iterrows():
        if row["area"] < 140:
            assert row["skip_reason"].startswith("area below min_area")
        elif row["area"] > 200:
            assert row["skip_reason"].startswith("area above max_area")


def test_fit_fills_the_crop():
    image, labels = _field()
    cells = extract_cells(image, labels, size=32, scale="fit", fill_fraction=0.75)
    for crop in cells.crops:
        cols = np.nonzero(crop[0].max(0) > 0.05)[0]
        assert 0.6 * 32 <= cols.max() - cols.min() + 1 <= 0.9 * 32


def test_mask_zeroes_neighbours_and_background():
    labels = np.zeros((48, 48), np.int32)
    labels[20:28, 10:24] = 1
    labels[20:28, 25:40] = 2  # one pixel gap
    image = np.zeros((2, 48, 48), np.float32) + 0.3  # background
    image[0][labels == 1] = 1.0
    image[1][labels == 2] = 1.0  # cell 2 only in channel 1
    image[1][labels == 1] = 0.0
    masked = extract_cells(image, labels, size=32, channel_axis=0, normalize=None)
    assert masked.crops[0, 1].max() == pytest.approx(0.0)  # nothing of cell 2, no background
    assert masked.crops[0, 0].max() == pytest.approx(1.0)
    raw = extract_cells(image, labels, size=32, channel_axis=0, normalize=None, mask=False)
    assert raw.crops[0, 1].max() > 0.9  # the neighbour is visible without the mask


def test_normalize_modes():
    image, labels = _field(channels=2)
    image = image * 1000 + 50
    pct = extract_cells(image, labels, size=32, channel_axis=0)
    assert pct.crops.min() >= 0 and pct.crops.max() <= 1
    mx = extract_cells(image, labels, size=32, channel_axis=0, normalize="max", align=False)
    peaks = mx.crops.max(axis=(2, 3))
    assert (peaks > 0.8).all() and (peaks <= 1.0).all()
    rg = extract_cells(
        image, labels, size=32, channel_axis=0, normalize="range", norm_range=(0, 2000)
    )
    assert rg.crops.max() < 0.6
    raw = extract_cells(image, labels, size=32, channel_axis=0, normalize=None)
    assert raw.crops.max() > 500
    with pytest.raises(ValueError, match="norm_range"):
        extract_cells(image, labels, size=32, channel_axis=0, normalize="range")
    with pytest.raises(ValueError, match="normalize"):
        extract_cells(image, labels, normalize="zscore")


@pytest.mark.parametrize("angle", [0, 37, 90, 133, 250])
@pytest.mark.parametrize("mirror", [False, True])
def test_canonical_pose_undoes_rotation_and_flip(angle, mirror):
    image, cell = _asymmetric_cell()

    def crop(img, lab, align):
        kw = dict(size=56, channel_axis=0, normalize="max", align=align)
        return extract_cells(img, lab, **kw).crops[0]

    ref, ref_raw = crop(image, cell, True), crop(image, cell, False)
    img = ndimage.rotate(image, angle, axes=(1, 2), reshape=False, order=1)
    lab = ndimage.rotate(cell, angle, reshape=False, order=0)
    if mirror:
        img, lab = img[:, :, ::-1], lab[:, ::-1]
    aligned, raw = crop(img, lab, True), crop(img, lab, False)
    err = np.abs(aligned - ref).mean()
    assert err < 0.01
    assert np.corrcoef(aligned.ravel(), ref.ravel())[0, 1] > 0.98
    if angle or mirror:
        assert np.abs(raw - ref_raw).mean() > 4 * err + 0.02  # un-aligned versions differ a lot

    # canonical_pose on an existing crop follows the same convention
    cp_ref = canonical_pose(image * cell, cell > 0)
    cp = canonical_pose(img * (lab > 0), lab > 0)
    assert cp.shape == image.shape
    assert np.abs(cp - cp_ref).mean() < 0.01
    assert np.abs(canonical_pose(img * (lab > 0)) - cp_ref).mean() < 0.01  # mask from content


def test_canonical_pose_convention():
    image, cell = _asymmetric_cell()
    crop = extract_cells(image, cell, size=64, channel_axis=0).crops[0]
    weight = crop.sum(0)
    rows, cols = np.nonzero(weight > 0)
    # major axis horizontal: wider than tall
    assert np.ptp(cols) > 1.5 * np.ptp(rows)
    # centre of mass right of and below the crop centre
    yy, xx = np.mgrid[0:64, 0:64]
    assert (weight * xx).sum() / weight.sum() > 31.5
    assert (weight * yy).sum() / weight.sum() > 31.5
    assert canonical_pose(crop[0]).shape == (64, 64)  # 2-D in, 2-D out


def test_progress_is_reported():
    image, labels = _field()
    calls = []
    extract_cells(image, labels, size=32, progress=lambda d, t: calls.append((d, t)))
    assert calls and calls[-1] == (3, 3)
    assert all(d <= t for d, t in calls)


# -- bad input --------------------------------------------------------------------------------
def test_empty_labels():
    with pytest.raises(ValueError, match="no cells"):
        extract_cells(np.zeros((32, 32)), np.zeros((32, 32), np.int32))


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(32, 32\).*\(40, 40\)|\(40, 40\).*\(32, 32\)"):
        extract_cells(np.zeros((40, 40)), np.ones((32, 32), np.int32))
    with pytest.raises(ValueError, match="does not match"):
        extract_cells(np.zeros((3, 40, 40)), np.ones((32, 32), np.int32), channel_axis=0)
    with pytest.raises(ValueError, match="stack=True"):
        extract_cells(np.zeros((2, 32, 32)), np.ones((2, 32, 32), np.int32))


def test_gaps_and_huge_label_ids():
    image, labels = _field()
    big = labels.astype(np.int64)
    big[labels == 5] = 2**31 + 7
    big[labels == 2] = 1_000_000_000
    cells = extract_cells(image, big, size=32)
    assert cells.table["label"].tolist() == [1, 1_000_000_000, 2**31 + 7]
    np.testing.assert_allclose(cells.crops, extract_cells(image, labels, size=32).crops, atol=1e-6)


def test_nan_pixels_warn_and_never_reach_crops():
    image, labels = _field()
    image[labels == 1] = np.nan
    image[0, 0] = np.inf
    with pytest.warns(RuntimeWarning, match="NaN"):
        cells = extract_cells(image, labels, size=32)
    assert np.isfinite(cells.crops).all()
    assert len(cells.crops) == 3


def test_label_types():
    image, labels = _field()
    as_float = extract_cells(image, labels.astype(np.float32), size=32)
    assert len(as_float.crops) == 3
    with pytest.raises(ValueError, match="integers"):
        extract_cells(image, labels + 0.5, size=32)
    with pytest.raises(TypeError, match="integer"):
        extract_cells(image, labels.astype(str), size=32)
    with pytest.raises(ValueError, match="negative"):
        extract_cells(image, -labels, size=32)
    with pytest.raises(ValueError, match="size"):
        extract_cells(image, labels, size=2)


def test_all_cells_skipped_gives_empty_crops_with_reasons():
    image, labels = _field()
    cells = extract_cells(image, labels, size=8)
    assert cells.crops.shape == (0, 1, 8, 8)
    assert (cells.table["skip_reason"] == "larger than crop").all()


def test_masked_crop_equals_crop_of_masked_image_and_orders():
    image, labels = _field(channels=2)
    kw = dict(size=32, channel_axis=0, normalize=None)
    masked = extract_cells(image, labels, **kw)
    for k, value in enumerate((1, 2, 5)):
        alone = extract_cells(image * (labels == value), labels, mask=False, **kw).crops[k]
        np.testing.assert_allclose(masked.crops[k], alone, atol=1e-5)
    fit = extract_cells(image, labels, scale="fit", **kw)
    for order in (0, 3):
        other = extract_cells(image, labels, scale="fit", order=order, **kw)
        assert other.crops.shape == fit.crops.shape
        assert np.abs(other.crops - fit.crops).mean() < 0.05
