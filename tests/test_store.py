import numpy as np
import pytest
import torch

from napari_mevae.analysis import encode
from napari_mevae.config import preset
from napari_mevae.model import MEVAE
from napari_mevae.store import CropStore, write_crops


@pytest.mark.parametrize("dtype,tol", [("float32", 0), ("float16", 1e-3), ("uint8", 1 / 255)])
def test_crops_file_round_trip_streamed_in_chunks(tmp_path, dtype, tol):
    rng = np.random.default_rng(0)
    crops = rng.random((25, 3, 16, 16), dtype=np.float32)
    path = write_crops(tmp_path / "c.npy", (crops[i : i + 7] for i in range(0, 25, 7)), dtype=dtype)
    assert np.load(path).shape == (25, 3, 16, 16)  # a standard .npy any tool can open
    store = CropStore(path)
    assert len(store) == 25 and store.shape == (25, 3, 16, 16)
    np.testing.assert_allclose(store[7], crops[7], atol=tol + 1e-7)
    np.testing.assert_allclose(store[-1], crops[-1], atol=tol + 1e-7)
    np.testing.assert_allclose(store[3:11], crops[3:11], atol=tol + 1e-7)
    with pytest.raises(IndexError):
        store[25]


def test_store_pickles_for_worker_processes_and_feeds_a_dataloader(tmp_path):
    crops = np.random.default_rng(1).random((12, 1, 8, 8), dtype=np.float32)
    store = CropStore(write_crops(tmp_path / "c.npy", crops, dtype="float32"))
    _ = store[0]  # opens a handle, which must not travel to workers
    loader = torch.utils.data.DataLoader(store, batch_size=4, num_workers=2)
    got = torch.cat(list(loader)).numpy()
    np.testing.assert_array_equal(got, crops)


def test_encoding_reads_a_store_lazily(tmp_path):
    crops = np.random.default_rng(2).random((10, 1, 32, 32), dtype=np.float32)
    store = CropStore(write_crops(tmp_path / "c.npy", crops, dtype="float32"))
    model = MEVAE(preset("tiny"))
    np.testing.assert_allclose(encode(model, store, batch_size=3), encode(model, crops), atol=1e-6)


def test_bad_crops_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        CropStore(tmp_path / "none.npy")
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a .npy crops file"):
        CropStore(tmp_path / "junk.npy")
    np.save(tmp_path / "flat.npy", np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match=r"expected a C-order \(N, C, S, S\)"):
        CropStore(tmp_path / "flat.npy")
    with pytest.raises(ValueError, match="no crops"):
        write_crops(tmp_path / "e.npy", iter([]))
