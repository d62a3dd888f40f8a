"""The reference folder layout: pair folders written and read back, batches from folders,
lazily read targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mevae.folders import (
    FolderPairs,
    LazyFolderTargets,
    export_pairs,
    read_pairs,
    write_image,
)
from napari_mevae.nuisances import NuisancePairs
from napari_mevae.synthetic import synthetic_crops


@pytest.mark.parametrize("channels", [1, 3])
def test_export_read_round_trip(tmp_path, channels):
    targets = synthetic_crops(n=5, size=32, channels=channels, seed=0)[0]
    files = export_pairs(targets, tmp_path, ("rotation", "polarity"), seed=4)
    assert [f.name for f in files] == [f"Image_{i}.tif" for i in range(5)]
    for k in (1, 2):
        assert (tmp_path / f"InputImages{k}" / "train" / "Image_4.tif").is_file()
    inputs, back, names = read_pairs(tmp_path)
    assert names == [f"Image_{i}" for i in range(5)]
    assert len(inputs) == 2 and back.shape == targets.shape
    np.testing.assert_allclose(back, targets, atol=0.5 / 255 + 1e-6)
    ds = NuisancePairs(targets, ("rotation", "polarity"), seed=4)
    for i in range(5):
        for k in range(2):
            np.testing.assert_allclose(inputs[k][i], ds[i][0][k].numpy(), atol=0.5 / 255 + 1e-6)


def test_export_names_and_missing_folders(tmp_path):
    targets = synthetic_crops(n=3, size=16, seed=0)[0]
    export_pairs(targets, tmp_path / "a", "polarity", names=["c", "a", "b"])
    _, _, names = read_pairs(tmp_path / "a")
    assert names == ["a", "b", "c"]
    with pytest.raises(ValueError, match="unique"):
        export_pairs(targets, tmp_path / "b", names=["x", "x", "y"])
    with pytest.raises(FileNotFoundError, match="InputImages1"):
        read_pairs(tmp_path / "missing")


def test_folder_pairs_get_batch_equals_stacked_items(tmp_path):
    rng = np.random.default_rng(0)
    dirs = [tmp_path / name for name in ("in1", "in2", "out")]
    for d in dirs:
        for i in range(5):
            write_image(d / f"cell_{i}.tif", rng.uniform(0.1, 1, (16, 16)))
    for in_memory in (True, False):
        ds = FolderPairs(dirs[:2], dirs[2], image_size=16, in_memory=in_memory)
        idx = torch.tensor([3, 0, 4])
        inputs, target = ds.get_batch(idx)
        assert inputs.shape == (3, 2, 1, 16, 16) and target.shape == (3, 1, 16, 16)
        assert inputs.dtype == target.dtype == torch.float32
        assert torch.equal(inputs, torch.stack([ds[i][0] for i in (3, 0, 4)]))
        assert torch.equal(target, torch.stack([ds[i][1] for i in (3, 0, 4)]))


def test_lazy_folder_targets(lincs64):
    lazy = LazyFolderTargets(lincs64 / "OutputImages", 32, 1)
    assert len(lazy) == 64 and lazy[5].shape == (1, 32, 32)
    assert lazy.names[:3] == ["Image_0", "Image_1", "Image_2"]
