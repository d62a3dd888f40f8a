"""Several fields as one analysis (fields.py): crops concatenated with their field, results split
back per field, the whole table with provenance (CSV and Parquet), and the layer pairing rule."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from napari_mevae import fields
from napari_mevae.analysis import features_table
from napari_mevae.config import CropSettings, InputError
from napari_mevae.synthetic import make_synthetic_cells


@pytest.fixture(scope="module")
def two_fields():
    a = make_synthetic_cells(n_cells=8, shape=(160, 160), channels=2, seed=0)
    b = make_synthetic_cells(n_cells=11, shape=(192, 192), channels=2, seed=1)
    settings = CropSettings(size=32, scale="fit", border="drop", channel_axis=0)
    return a, b, settings


def test_two_fields_are_cropped_together_and_split_back(two_fields):
    a, b, settings = two_fields
    seen = []
    cells = fields.crop_fields(
        [(a.image, a.labels, "A"), (b.image, b.labels, "B")], settings, lambda d, t: seen.append(d)
    )
    one = fields.crop_fields([(a.image, a.labels, "A")], settings)
    assert cells.names == ["A", "B"] and cells.n_fields == 2
    assert seen[-1] == 1000 and seen == sorted(seen)
    ids_a, ids_b = np.unique(a.labels)[1:], np.unique(b.labels)[1:]
    assert len(cells.table) == len(ids_a) + len(ids_b)
    assert cells.table["field"].tolist() == [0] * len(ids_a) + [1] * len(ids_b)
    # crops of field A first, then B; crop_index global, the kept rows in crop order
    n_a = len(one.crops)
    assert np.array_equal(cells.crops[:n_a], one.crops)
    assert cells.kept["crop_index"].tolist() == list(range(len(cells.crops)))
    assert cells.field_of(0) == 0 and cells.field_of(len(cells.crops) - 1) == 1
    assert cells.field_cells(0).equals(one.field_cells(0))
    assert "field" not in cells.field_cells(1) and len(cells.field_cells(1)) == len(ids_b)

    # one features table for every cell, split back: each field's label ids, in its order
    latents = np.arange(len(cells.crops) * 2, dtype=np.float32).reshape(-1, 2)
    clusters = np.arange(len(cells.crops)) % 3 + 1
    table = features_table(cells.kept, latents, None, clusters)
    part_b = cells.field_table(table, 1)
    kept_b = cells.kept[cells.kept["field"] == 1]
    assert part_b["label"].tolist() == kept_b["label"].tolist()
    assert np.array_equal(part_b["z0"], latents[n_a:, 0])

    whole = fields.whole_table(
        cells, table, [{"image": "A img", "labels": "A"}, {"image": "B img", "labels": "B"}]
    )
    assert len(whole) == len(cells.table)
    assert whole["source_labels"].tolist() == ["A"] * len(ids_a) + ["B"] * len(ids_b)
    assert whole["label"].tolist() == [*ids_a, *ids_b]
    assert whole.loc[whole["source_labels"] == "B", "centroid_x"].notna().all()


def _with_skipped_cells(two_fields):
    """The two fields cropped with min_area at the median area: some cells skipped."""
    a, b, settings = two_fields
    areas = [np.bincount(f.labels.ravel())[1:] for f in (a, b)]
    areas = np.concatenate([x[x > 0] for x in areas])
    settings = dataclasses.replace(settings, min_area=int(np.median(areas)))
    cells = fields.crop_fields([(a.image, a.labels, "A"), (b.image, b.labels, "B")], settings)
    assert 0 < len(cells.skipped) < len(cells.table)  # some cells skipped (area below min)
    return a, b, cells


def test_whole_table_written_as_csv_and_parquet(two_fields, tmp_path):
    a, b, cells = _with_skipped_cells(two_fields)
    n = len(cells.crops)
    table = features_table(cells.kept, np.ones((n, 2), np.float32), None, np.ones(n, int))
    whole = fields.whole_table(cells, table, [{"labels": "A"}, {"labels": "B"}])
    csv = fields.write_table(whole, tmp_path / "t.csv")
    back = pd.read_csv(csv, keep_default_na=False, na_values=[""])
    assert back["label"].tolist() == whole["label"].tolist()
    assert back["source_labels"].tolist() == whole["source_labels"].tolist()
    pq = fields.write_table(whole, tmp_path / "t.parquet")
    back = pd.read_parquet(pq)
    assert back["label"].tolist() == whole["label"].tolist()
    assert back["cluster"].fillna(0).tolist() == whole["cluster"].astype(float).fillna(0).tolist()
    # integers with the skipped cells missing (not floats), as `mevae features` writes them
    assert str(back["cluster"].dtype) == "Int64" and back["cluster"].isna().sum() == len(
        cells.skipped
    )
    assert whole["cluster"].dtype == "category"  # the caller's table is left as it was
    assert np.allclose(back["z1"].dropna(), 1.0)


def test_fields_must_share_channels(two_fields):
    a, b, settings = two_fields
    one_channel = CropSettings(size=32, scale="fit", channel_axis=None)
    with pytest.raises(InputError, match="same channels"):
        fields.crop_fields(
            [(a.image, a.labels, "A"), (b.image[0], b.labels, "B")], [settings, one_channel]
        )


def test_pairing_rule():
    imgs = [("field 1", (2, 50, 50)), ("field 2", (2, 50, 50)), ("odd", (70, 70))]
    labs = [
        ("field 2 labels", (50, 50)),
        ("field 1_mask", (50, 50)),
        ("segmentation", (70, 70)),
        ("other", (50, 50)),
        ("lost", (9, 9)),
    ]
    got = fields.pair_layers(imgs, labs)
    assert [(lab, img) for lab, img, _ in got] == [
        ("field 2 labels", "field 2"),
        ("field 1_mask", "field 1"),
        ("segmentation", "odd"),
        ("other", None),
        ("lost", None),
    ]
    assert got[2][2] == "only image of its shape" and "2 images" in got[3][2]


def test_cluster_results_paint_each_field_and_list_every_labelled_cell(two_fields):
    a, b, cells = _with_skipped_cells(two_fields)
    n = len(cells.crops)
    latents = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)
    clusters = np.arange(n) % 3 + 1
    table, per_field = fields.cluster_results(
        cells, latents, None, clusters, [a.labels, b.labels], [False, False]
    )
    assert len(table) == n and len(per_field) == 2
    for i, labels in enumerate([a.labels, b.labels]):
        rows, every, painted = per_field[i]
        assert rows["label"].tolist() == cells.field_table(table, i)["label"].tolist()
        ids = np.unique(labels)[1:]
        assert every["index"].tolist() == ids.tolist()  # every labelled cell, skipped ones too
        skipped = set(ids) - set(rows["label"])
        assert all(every.set_index("index").loc[list(skipped), "cluster"] == 0)
        assert painted.shape == labels.shape
        for label, c in zip(rows["label"], rows["cluster"], strict=True):
            assert set(np.unique(painted[labels == label])) == {int(c)}
        assert not painted[labels == 0].any()
        for label in skipped:
            assert not painted[labels == label].any()
