"""`mevae crop` / `mevae features` end to end: one line and exit 2 for bad input, a table with
one row per labelled cell, and a 2-process torchrun run giving what one process gives."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from napari_mevae.checkpoints import save_checkpoint
from napari_mevae.cli import main
from napari_mevae.config import preset
from napari_mevae.model import MEVAE
from napari_mevae.screen_store import ScreenStore
from test_bad_input import run_cli
from test_screens import SIZE, make_tiff_fields, write_plate


def one_error(argv, capsys, says: str) -> None:
    code, lines = run_cli(argv, capsys)
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"mevae {argv[0]}: error: "), lines[0]
    assert re.search(says, lines[0]), lines[0]


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    """Three TIFF fields, a tiny untrained model of their crops and a store (one process)."""
    root = tmp_path_factory.mktemp("screen")
    make_tiff_fields(root / "fields")
    torch.manual_seed(0)
    save_checkpoint(root / "model", MEVAE(preset("tiny", image_size=SIZE, channels=2)))
    argv = ["crop", "--image", root / "fields", "--labels", root / "fields" / "*_labels.tif",
            "--out", root / "store", "--size", SIZE, "--channel-axis", 0, "--min-area", 5,
            "--verbose", 0]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    return root


def test_unmatched_names_are_one_line(tmp_path, capsys):
    make_tiff_fields(tmp_path / "f", n=2)
    (tmp_path / "f" / "f1_labels.tif").rename(tmp_path / "f" / "g1_labels.tif")
    one_error(
        ["crop", "--image", tmp_path / "f", "--labels", tmp_path / "f" / "*_labels.tif",
         "--out", tmp_path / "s"],
        capsys,
        r"unmatched files \(images without labels: f1.tif; labels without an image: "
        r"g1_labels.tif\)",
    )  # fmt: skip
    assert not (tmp_path / "s").exists()


def test_missing_labels_group_is_one_line(tmp_path, capsys):
    import shutil

    write_plate(tmp_path / "plate.zarr")
    shutil.rmtree(tmp_path / "plate.zarr" / "B" / "2" / "1" / "labels")
    one_error(
        ["crop", "--image", tmp_path / "plate.zarr", "--out", tmp_path / "s"],
        capsys,
        r"plate.zarr/B/2/1 has no label image \(no labels group\)",
    )
    one_error(
        ["crop", "--image", tmp_path / "plate.zarr", "--label-name", "nuclei", "--out",
         tmp_path / "s2"],
        capsys,
        r"plate.zarr/A/1/0 has no label image 'nuclei' \(it has cells\)$",
    )  # fmt: skip


def test_non_empty_store_is_refused_unless_overwrite(screen, capsys):
    store = screen / "store"
    before = (store / "cells.parquet").read_bytes()
    argv = ["crop", "--image", screen / "fields", "--labels", screen / "fields" / "*_labels.tif",
            "--out", store, "--size", SIZE, "--channel-axis", 0, "--verbose", 0]  # fmt: skip
    one_error(argv, capsys, r"--out .*store is not empty \(cells.parquet, crops.zarr, screen.json")
    assert (store / "cells.parquet").read_bytes() == before
    other = screen / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    one_error([*argv[:6], other, *argv[7:], "--overwrite"], capsys, r"did not write \(notes.txt\)")


def test_features_table_has_every_cell(screen, tmp_path, capsys):
    out = tmp_path / "f.parquet"
    argv = ["features", "--checkpoint", screen / "model", "--cells", screen / "store",
            "--out", out, "--umap", "--clusters", 3, "--verbose", 0]  # fmt: skip
    code, lines = run_cli(argv, capsys)
    assert code == 0, lines
    cells = ScreenStore(screen / "store").table
    table = pd.read_parquet(out)
    assert len(table) == len(cells)
    assert table[list(cells.columns)].equals(cells)
    kept = table["skipped"] == ""
    zcols = [c for c in table if re.fullmatch(r"z\d+", c)]
    assert len(zcols) == preset("tiny").latent_dim
    assert table.loc[kept, zcols].notna().all().all()
    assert table.loc[~kept, [*zcols, "UMAP0", "UMAP1"]].isna().all().all()
    assert table.loc[~kept, "cluster"].isna().all()
    assert set(table.loc[kept, "cluster"]) <= {1, 2, 3}
    code, _ = run_cli([*argv[:6], tmp_path / "f.csv", "--verbose", 0], capsys)
    csv = pd.read_csv(tmp_path / "f.csv", keep_default_na=False)
    assert len(csv) == len(cells) and "cluster" not in csv
    assert (csv.loc[~kept.to_numpy(), "z0"] == "").all()  # skipped: empty features
    np.testing.assert_allclose(
        csv.loc[kept.to_numpy(), "z0"].astype(float), table.loc[kept, "z0"], rtol=1e-6
    )
    one_error(
        [*argv[:6], tmp_path / "f.txt"], capsys, r"--out .*f.txt: the table is .parquet or .csv"
    )


def test_two_processes_give_the_same_store_and_table(screen, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU): the same cells, crops and features."""
    env_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "napari_mevae"]  # fmt: skip
    crop = subprocess.run(
        [*env_cmd, "crop", "--image", screen / "fields", "--labels",
         screen / "fields" / "*_labels.tif", "--out", tmp_path / "store2", "--size", str(SIZE),
         "--channel-axis", "0", "--min-area", "5", "--verbose", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert crop.returncode == 0, crop.stderr
    one, two = ScreenStore(screen / "store"), ScreenStore(tmp_path / "store2")
    assert one.table.equals(two.table)
    np.testing.assert_array_equal(one.crops[:], two.crops[:])
    assert one.settings == two.settings
    args = ["--checkpoint", str(screen / "model"), "--clusters", "3", "--verbose", "0",
            "--batch_size", "8"]  # fmt: skip
    feats = subprocess.run(
        [*env_cmd, "features", "--cells", tmp_path / "store2", "--out", tmp_path / "two.parquet",
         *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert feats.returncode == 0, feats.stderr
    assert main(["features", "--cells", str(screen / "store"), "--out",
                 str(tmp_path / "one.parquet"), *args]) == 0  # fmt: skip
    a, b = pd.read_parquet(tmp_path / "one.parquet"), pd.read_parquet(tmp_path / "two.parquet")
    assert a.columns.tolist() == b.columns.tolist() and len(a) == len(one.table)
    zcols = [c for c in a if re.fullmatch(r"z\d+", c)]
    np.testing.assert_allclose(a[zcols].to_numpy(), b[zcols].to_numpy(), atol=1e-5)
    assert a["cluster"].equals(b["cluster"])
    assert a.drop(columns=[*zcols, "cluster"]).equals(b.drop(columns=[*zcols, "cluster"]))


def test_crop_train_features_end_to_end(screen, tmp_path, capsys):
    """`mevae train --targets STORE` learns from the store; its run folder is a checkpoint."""
    run = tmp_path / "run"
    code, lines = run_cli(
        ["train", "--targets", screen / "store", "--image_size", SIZE, "--nchannel", 2,
         "--latent_dim", 8, "--inter_dim", 32, "--batch_size", 8, "--epochs", 1, "--seed", 0,
         "--save_dir", run, "--verbose", 0],
        capsys,
    )  # fmt: skip
    assert code == 0, lines
    kept = int((ScreenStore(screen / "store").table["skipped"] == "").sum())
    assert len(pd.read_csv(run / "encodings.csv")) == kept  # every stored crop, once
    code, lines = run_cli(
        ["features", "--checkpoint", run, "--cells", screen / "store", "--out",
         tmp_path / "t.csv", "--verbose", 0],
        capsys,
    )  # fmt: skip
    assert code == 0, lines
    table = pd.read_csv(tmp_path / "t.csv")
    assert [c for c in table if c.startswith("z")] == [f"z{d}" for d in range(8)]
    assert table["z0"].notna().sum() == kept
