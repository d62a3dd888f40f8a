"""figures: the PNGs `mevae train` and `mevae demo` write are whole or absent."""

import errno

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from napari_mevae.figures import montage, save_grid, save_png, save_umap_plot


def test_a_failed_png_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "reconstructions.png"
    save_png(path, np.linspace(0, 1, 32 * 48).reshape(32, 48))
    before = path.read_bytes()
    assert Image.open(path).size == (48, 32)

    def half_then_full(self, fh, *args, **kwargs):
        fh.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", half_then_full)
    with pytest.raises(OSError):
        save_png(path, np.zeros((8, 8)))
    assert path.read_bytes() == before  # the earlier picture, not half of the new one
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left beside it


def test_a_failed_umap_plot_write_leaves_no_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    emb, clusters = rng.normal(size=(30, 2)), np.repeat([1, 2, 3], 10)
    path = tmp_path / "umap_clusters.png"
    save_umap_plot(path, emb, clusters)
    assert Image.open(path).size[0] > 100
    path.unlink()

    def half_then_full(self, fh, *args, **kwargs):
        fh.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_then_full)
    with pytest.raises(OSError):
        save_umap_plot(path, emb, clusters)
    assert list(tmp_path.iterdir()) == []  # neither the plot nor a temporary file


def test_umap_plot_names_the_classes_in_the_colours_of_their_clusters(tmp_path, monkeypatch):
    """The true-class panel shows each class in the colour of the cluster that matches it
    (here cluster 3 holds class 0, cluster 1 class 1, cluster 2 class 2 but for one cell), and
    the classes by name."""
    from matplotlib import colormaps

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(30, 2))
    truth = np.repeat([0, 1, 2], 10)
    clusters = np.repeat([3, 1, 2], 10)
    clusters[-1] = 1
    figs = []
    monkeypatch.setattr(Figure, "savefig", lambda self, fh, **kw: figs.append(self))
    save_umap_plot(tmp_path / "u.png", emb, clusters, truth=truth, truth_names=["a", "b", "c"])
    by_cluster, by_class = figs[0].axes
    tab10 = colormaps["tab10"]

    def colours(ax):
        return {
            text.get_text(): tuple(handle.get_facecolor()[0][:3])
            for text, handle in zip(
                ax.get_legend().get_texts(), ax.get_legend().legend_handles, strict=True
            )
        }

    assert colours(by_cluster) == {str(c): tab10(c - 1)[:3] for c in (1, 2, 3)}
    assert colours(by_class) == {"a": tab10(2)[:3], "b": tab10(0)[:3], "c": tab10(1)[:3]}
    # the points too, not only the legend: class "c"'s ten cells are drawn in cluster 2's colour
    c_points = by_class.collections[2]
    assert len(c_points.get_offsets()) == 10
    assert tuple(c_points.get_facecolor()[0][:3]) == tab10(1)[:3]


def test_a_failed_tiff_grid_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    import tifffile

    path = tmp_path / "recon_images_final1.tif"
    cells = np.full((4, 1, 8, 8), 0.5, np.float32)
    save_grid(path, cells, n=4, ncols=2)
    before = path.read_bytes()
    grid = tifffile.imread(path)
    expected = np.round(np.clip(montage(cells, ncols=2), 0, 1) * 255).astype(np.uint8)
    assert grid.shape == (19, 19) and np.array_equal(grid, expected.reshape(grid.shape))

    def half_then_fail(fh, *args, **kwargs):
        fh.write(b"II*\x00half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", half_then_fail)
    with pytest.raises(OSError):
        save_grid(path, np.zeros((4, 1, 8, 8), np.float32), n=4, ncols=2)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]
