"""Whole screens (screens.py, screen_store.py, screen_features.py): every labelled cell of every
field gets one row with its source, label id, centroid and skip reason; crops go into one zarr
array; features scale by subsampling."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from skimage.measure import regionprops

from napari_mevae.cells import extract_cells
from napari_mevae.config import CropSettings, InputError
from napari_mevae.nuisances import NuisancePairs
from napari_mevae.screen_features import place_rest, scaled_cluster, scaled_umap
from napari_mevae.screen_store import CHUNK, ScreenStore, StoreCrops, StoreWriter
from napari_mevae.screens import crop_screen, fields_in, find_fields, load_fields, pair_files
from napari_mevae.synthetic import make_synthetic_cells
from napari_mevae.workflow import load_train_data, open_targets

SIZE = 32


def make_tiff_fields(folder, n=3):
    """``n`` 2-channel fields ``f{i}.tif`` + ``f{i}_labels.tif``; each also has one cell cut by
    the image border (label 99) and a 2-pixel speck (label 98)."""
    folder.mkdir(parents=True, exist_ok=True)
    fields = []
    for i in range(n):
        c = make_synthetic_cells(n_cells=12, shape=(160, 160), seed=i, cell_radius=7)
        labels = c.labels.astype(np.int32)
        labels[:6, 60:70] = 99  # touches the border
        labels[80, 0:0] = 0
        free = np.argwhere(labels == 0)
        y, x = free[len(free) // 2]
        labels[y, x] = 98  # a speck (below --min-area)
        labels[y, x + 1 if x + 1 < 160 and labels[y, x + 1] == 0 else x] = 98
        tifffile.imwrite(folder / f"f{i}.tif", c.image)
        tifffile.imwrite(folder / f"f{i}_labels.tif", labels)
        fields.append((c.image, labels))
    return fields


def check_rows(rows: pd.DataFrame, image, labels, settings: dict):
    """One row per label id, centroids as regionprops, crops as extract_cells."""
    props = {p.label: p for p in regionprops(labels)}
    assert rows["label"].tolist() == sorted(props)
    for _, r in rows.iterrows():
        cy, cx = props[r["label"]].centroid
        assert r["centroid_y"] == pytest.approx(cy, abs=1e-9)
        assert r["centroid_x"] == pytest.approx(cx, abs=1e-9)
        assert r["area"] == props[r["label"]].area
    ref = extract_cells(image, labels, **settings)
    assert rows["skipped"].tolist() == ref.table["skip_reason"].tolist()
    return ref


def test_tiff_folder_gives_one_row_per_cell_with_source_centroid_and_reasons(tmp_path):
    fields = make_tiff_fields(tmp_path / "fields")
    found = find_fields(str(tmp_path / "fields"), str(tmp_path / "fields" / "*_labels.tif"))
    assert [f.source for f in found] == [str(tmp_path / "fields" / f"f{i}.tif") for i in range(3)]
    settings = CropSettings(size=SIZE, channel_axis=0, min_area=5)
    counts = crop_screen(found, tmp_path / "store", settings, workers=2)
    store = ScreenStore(tmp_path / "store")
    table = store.table
    n_labels = sum(len(np.unique(lab)) - 1 for _, lab in fields)
    assert len(table) == counts["n_cells"] == n_labels
    assert table["cell_id"].tolist() == list(range(n_labels))
    kept = table["skipped"] == ""
    assert counts["n_kept"] == len(store.crops) == int(kept.sum()) > 10
    assert table.loc[kept, "crop_index"].tolist() == list(range(int(kept.sum())))
    assert (table.loc[~kept, "crop_index"] == -1).all()
    for i, (image, labels) in enumerate(fields):
        rows = table[table["field_index"] == i]
        assert (rows["source"] == found[i].source).all()
        ref = check_rows(rows, image, labels, dict(size=SIZE, channel_axis=0, min_area=5))
        by_label = rows.set_index("label")["skipped"]
        assert by_label[99] == "touches image border"
        assert by_label[98].startswith("area below min_area (2 < 5)")
        got = store.crops[rows.loc[rows["crop_index"] >= 0, "crop_index"].to_numpy()[0]]
        np.testing.assert_allclose(got, ref.crops[0], atol=1e-3)  # float16 store
    assert store.settings["crop_settings"]["size"] == SIZE
    assert store.crop_shape == (2, SIZE, SIZE)


def test_manifest_columns_reach_the_table(tmp_path):
    make_tiff_fields(tmp_path / "imgs", n=2)
    (tmp_path / "m.csv").write_text(
        "image,labels,plate,well,condition\n"
        "imgs/f1.tif,imgs/f1_labels.tif,P1,B02,drug\n"
        "imgs/f0.tif,imgs/f0_labels.tif,P1,A01,dmso\n"
    )
    found = find_fields(manifest=str(tmp_path / "m.csv"))
    crop_screen(found, tmp_path / "s", CropSettings(size=SIZE, channel_axis=0), workers=1)
    table = ScreenStore(tmp_path / "s").table
    first = table[table["field_index"] == 0]
    assert set(first["source"]) == {"imgs/f1.tif"}  # manifest order, not name order
    assert set(first["condition"]) == {"drug"} and set(first["well"]) == {"B02"}
    assert set(table.loc[table["field_index"] == 1, "condition"]) == {"dmso"}


def write_plate(path, seed=0):
    """An HCS plate with 2 wells x 2 fields, each with labels/cells, via ome-zarr."""
    import zarr
    from ome_zarr.writer import (
        write_image,
        write_labels,
        write_plate_metadata,
        write_well_metadata,
    )

    root = zarr.open_group(str(path), mode="w")
    wells = ["A/1", "B/2"]
    write_plate_metadata(root, ["A", "B"], ["1", "2"], wells)
    truth = {}
    for w, well in enumerate(wells):
        row, col = well.split("/")
        wg = root.require_group(row).require_group(col)
        write_well_metadata(wg, ["0", "1"])
        for f in range(2):
            c = make_synthetic_cells(n_cells=8, shape=(128, 128), seed=10 * w + f, cell_radius=7)
            g = wg.require_group(str(f))
            write_image(c.image, g, axes="cyx", scale_factors=[])
            write_labels(c.labels.astype(np.uint16), g, name="cells", axes="yx", scale_factors=[])
            truth[f"{path}/{well}/{f}"] = (c.image, c.labels)
    return truth


def test_ome_zarr_plate_gives_every_well_and_field(tmp_path):
    truth = write_plate(tmp_path / "plate.zarr")
    found = find_fields(str(tmp_path / "plate.zarr"))
    assert [f.source for f in found] == list(truth)
    assert [f.extra["well"] for f in found] == ["A1", "A1", "B2", "B2"]
    crop_screen(found, tmp_path / "store", CropSettings(size=SIZE), workers=1)
    table = ScreenStore(tmp_path / "store").table
    for i, (source, (image, labels)) in enumerate(truth.items()):
        rows = table[table["field_index"] == i]
        assert set(rows["source"]) == {source}
        check_rows(rows, image, labels, dict(size=SIZE, channel_axis=0))
    assert set(table["plate"]) == {"plate.zarr"} and set(table["field"]) == {"0", "1"}


def test_ome_zarr_image_ngff_04_with_a_z_axis(tmp_path):
    """One OME-Zarr image (NGFF 0.4, zarr v2, axes czyx with one z plane) is one field."""
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image, write_labels

    c = make_synthetic_cells(n_cells=6, shape=(96, 96), seed=1, cell_radius=7)
    root = zarr.open_group(str(tmp_path / "img.zarr"), mode="w", zarr_format=2)
    write_image(c.image[:, None], root, axes="czyx", scale_factors=[], fmt=FormatV04())
    labels = c.labels[None].astype(np.uint16)
    write_labels(labels, root, name="nuclei", axes="zyx", scale_factors=[], fmt=FormatV04())
    found = find_fields(str(tmp_path / "img.zarr"))
    assert [f.source for f in found] == [str(tmp_path / "img.zarr")]
    crop_screen(found, tmp_path / "store", CropSettings(size=SIZE), workers=1)
    table = ScreenStore(tmp_path / "store").table
    check_rows(table, c.image, c.labels, dict(size=SIZE, channel_axis=0))
    # the same image opened for a viewer: named after the image, its arrays as written
    ((image, labels, name),) = _drained(load_fields(fields_in(tmp_path / "img.zarr")))
    assert name == "img"
    np.testing.assert_array_equal(labels, c.labels)
    np.testing.assert_array_equal(image, c.image)


def _drained(gen):
    while True:
        try:
            next(gen)
        except StopIteration as done:
            return done.value


def test_pairing_rule(tmp_path):
    a, b = tmp_path / "img", tmp_path / "lab"
    for d, names in ((a, ["x1.tif", "x2.tif"]), (b, ["x2.tif", "x1_mask.tif"])):
        d.mkdir()
        for n in names:
            (d / n).write_bytes(b"")
    pairs = pair_files(sorted(a.iterdir()), sorted(b.iterdir()))
    assert [(i.name, lab.name) for i, lab in pairs] == [
        ("x1.tif", "x1_mask.tif"),
        ("x2.tif", "x2.tif"),
    ]
    with pytest.raises(InputError, match=r"images without labels: x3.tif"):
        pair_files([*a.iterdir(), a / "x3.tif"], list(b.iterdir()))
    # one folder for napari's Open fields: images/ + labels/ inside, or labels by suffix
    a.rename(tmp_path / "images")
    b.rename(tmp_path / "labels")
    found = fields_in(tmp_path)
    assert [(Path(f.image).name, Path(f.labels).name) for f in found] == [
        ("x1.tif", "x1_mask.tif"),
        ("x2.tif", "x2.tif"),
    ]
    flat = tmp_path / "flat"
    flat.mkdir()
    for n in ("b.tif", "b_labels.tif", "a.tif", "a_seg.tif"):
        (flat / n).write_bytes(b"")
    assert [(Path(f.image).name, Path(f.labels).name) for f in fields_in(flat)] == [
        ("a.tif", "a_seg.tif"),
        ("b.tif", "b_labels.tif"),
    ]
    with pytest.raises(InputError, match="not a folder or an OME-Zarr"):
        fields_in(flat / "a.tif")


def test_store_writer_and_lazy_crops_across_chunks(tmp_path):
    rng = np.random.default_rng(0)
    crops = rng.random((CHUNK + 70, 1, 8, 8)).astype(np.float32)
    w = StoreWriter(tmp_path / "c.zarr", 1, 8, "uint8")
    for a in range(0, len(crops), 100):  # blocks not aligned with chunks
        w.append(crops[a : a + 100])
    assert w.close() == len(crops)
    lazy = StoreCrops(tmp_path / "c.zarr", cache_mb=2 * CHUNK * 64 / 2**20)  # two chunks
    assert lazy.cache == 2
    assert lazy.shape == crops.shape
    np.testing.assert_allclose(lazy[:], crops, atol=0.5 / 255 + 1e-6)
    for i in rng.integers(0, len(crops), 20):
        np.testing.assert_allclose(lazy[int(i)], crops[i], atol=0.5 / 255 + 1e-6)
    part = pickle.loads(pickle.dumps(StoreCrops(tmp_path / "c.zarr", start=250, stop=260)))
    assert len(part) == 10
    np.testing.assert_allclose(part[3:5], crops[253:255], atol=0.5 / 255 + 1e-6)


def test_training_reads_a_store_lazily(tmp_path):
    make_tiff_fields(tmp_path / "f", n=2)
    found = find_fields(str(tmp_path / "f"), str(tmp_path / "f" / "*_labels.tif"))
    crop_screen(found, tmp_path / "s", CropSettings(size=SIZE, channel_axis=0), workers=1)
    crops, names, _ = open_targets(tmp_path / "s", SIZE, 2)
    assert isinstance(crops, StoreCrops) and len(names) == len(crops)
    data = load_train_data(model="mevae", image_size=SIZE, channels=2, targets=tmp_path / "s",
                           nuisances=["rotation", "polarity"])  # fmt: skip
    assert isinstance(data.dataset, NuisancePairs)
    assert isinstance(data.dataset.targets, StoreCrops)
    inputs, target = data.dataset[3]
    assert inputs.shape == (2, 2, SIZE, SIZE)
    np.testing.assert_allclose(target.numpy(), crops[3])
    with pytest.raises(InputError, match=r"holds crops of shape \(2, 32, 32\)"):
        open_targets(tmp_path / "s", 64, 2)


def blobs(n, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[0, 0, 0], [10, 0, 0], [0, 10, 0]], np.float32)
    truth = rng.integers(0, 3, n)
    z = centres[truth] + rng.normal(size=(n, 3)).astype(np.float32)
    return np.concatenate([z, np.zeros((n, 2), np.float32)], axis=1), truth  # 2 unused dims


@pytest.mark.parametrize("method", ["kmeans", "gmm", "hdbscan"])
def test_clustering_fitted_on_a_subsample_labels_every_cell(method):
    from sklearn.metrics import adjusted_rand_score

    z, truth = blobs(3000)
    ids = scaled_cluster(z, method, 3, seed=0, fit_max=500)
    assert ids.shape == (3000,) and set(np.unique(ids)) <= {0, 1, 2, 3}
    assert adjusted_rand_score(truth, ids) > 0.95


def test_umap_of_the_rest_is_placed_among_its_neighbours():
    fitted = np.array([[0.0, 0], [1, 0], [10, 10]], np.float32)
    emb = np.array([[5.0, 5], [7, 5], [-3, 2]], np.float32)
    out = place_rest(fitted, emb, np.array([[0.0, 0], [0.5, 0]], np.float32), k=2)
    np.testing.assert_allclose(out[0], emb[0], atol=1e-4)  # on a fitted point: its embedding
    np.testing.assert_allclose(out[1], [6, 5], atol=1e-4)  # half-way: the mean
    z, truth = blobs(1500)
    xy = scaled_umap(z, seed=0, fit_max=300)
    centres = np.stack([xy[truth == k].mean(0) for k in range(3)])
    spread = max(np.linalg.norm(xy[truth == k] - centres[k], axis=1).mean() for k in range(3))
    gaps = [np.linalg.norm(centres[a] - centres[b]) for a, b in ((0, 1), (0, 2), (1, 2))]
    assert min(gaps) > 2 * spread  # the blobs stay apart, the placed cells with their own
