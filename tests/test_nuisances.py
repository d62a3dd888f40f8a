"""Nuisances and on-the-fly pairs.  Writing and reading pair folders: test_folders.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from napari_mevae.nuisances import (
    NUISANCES,
    NuisanceAutoencode,
    NuisancePairs,
    apply_nuisance,
    draw_and_apply,
    get_nuisances,
    register_nuisance,
)
from napari_mevae.synthetic import synthetic_crops


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    return synthetic_crops(n=12, size=32, channels=2, seed=3)[0]


def test_get_nuisances_parses_and_validates():
    assert [n.name for n in get_nuisances("rotation,polarity")] == ["rotation", "polarity"]
    assert [n.name for n in get_nuisances(["scale", " rotation "])] == ["scale", "rotation"]
    with pytest.raises(ValueError, match="unknown nuisance.*'spin'.*rotation, polarity, scale"):
        get_nuisances("rotation,spin")
    with pytest.raises(ValueError, match="no nuisance"):
        get_nuisances("")


def test_register_custom_nuisance(crops):
    try:
        nz = register_nuisance(
            "gain", lambda rng: float(rng.uniform(0.5, 0.9)), lambda img, g: img * g, 1.0
        )
        assert NUISANCES["gain"] is nz
        with pytest.raises(ValueError, match="already registered"):
            register_nuisance("gain", nz.draw, nz.apply)
        ds = NuisancePairs(crops, "rotation,gain", return_params=True)
        inputs, target, params = ds[0]
        torch.testing.assert_close(inputs[1], target * params["gain"])
    finally:
        NUISANCES.pop("gain", None)
    with pytest.raises(ValueError, match="commas"):
        register_nuisance("a,b", lambda rng: 0, lambda img, p: img)


def test_rotation_sign_and_exactness(crops):
    x = torch.from_numpy(crops[0])
    rot = NUISANCES["rotation"].apply
    torch.testing.assert_close(
        rot(x, 90.0), torch.from_numpy(np.rot90(crops[0], 1, axes=(1, 2)).copy())
    )
    # the interpolated path agrees with the exact one
    torch.testing.assert_close(rot(x, 90.0 + 1e-7), rot(x, 90.0), atol=1e-4, rtol=0)
    back = rot(rot(x, 37.0), -37.0)
    inner = (slice(None), slice(8, 24), slice(8, 24))
    assert (back[inner] - x[inner]).abs().mean() < 0.05
    # numpy in, numpy out
    out = apply_nuisance("rotation", crops[0], 45.0)
    assert isinstance(out, np.ndarray) and out.shape == crops[0].shape
    for name, param in (("rotation", 45.0), ("polarity", 3), ("scale", 1.2)):
        direct = NUISANCES[name].apply(crops[0], param)  # built-ins take numpy as well
        assert isinstance(direct, np.ndarray)
        np.testing.assert_allclose(direct, NUISANCES[name].apply(x, param).numpy())


def test_identity_params_reproduce_the_target(crops):
    x = torch.from_numpy(crops[1])
    for name in ("rotation", "polarity", "scale"):
        nz = NUISANCES[name]
        torch.testing.assert_close(nz.apply(x, nz.identity), x)


def test_polarity_codes(crops):
    x = torch.from_numpy(crops[0])
    flip = NUISANCES["polarity"].apply
    torch.testing.assert_close(flip(x, 1), x.flip(-1))
    torch.testing.assert_close(flip(x, 2), x.flip(-2))
    torch.testing.assert_close(flip(x, 3), torch.rot90(x, 2, dims=(-2, -1)))
    with pytest.raises(ValueError, match="polarity"):
        flip(x, 4)


def test_scale_keeps_content_centred():
    img = torch.zeros(1, 33, 33)
    img[0, 12:21, 14:19] = 1.0  # centred blob
    yy, xx = torch.meshgrid(torch.arange(33.0), torch.arange(33.0), indexing="ij")
    for factor in (0.8, 1.25):
        out = NUISANCES["scale"].apply(img, factor)
        assert out.shape == img.shape
        w = out[0]
        assert (w * yy).sum() / w.sum() == pytest.approx(16.0, abs=0.2)
        assert (w * xx).sum() / w.sum() == pytest.approx(16.0, abs=0.2)
        assert w.sum() / img.sum() == pytest.approx(factor**2, rel=0.15)


def test_pairs_shapes_and_params(crops):
    ds = NuisancePairs(crops, ("rotation", "polarity", "scale"), seed=1, return_params=True)
    assert len(ds) == 12
    assert (ds.n_encoders, ds.image_size, ds.channels) == (3, 32, 2)
    inputs, target, params = ds[5]
    assert inputs.shape == (3, 2, 32, 32) and inputs.dtype == torch.float32
    assert target.shape == (2, 32, 32) and target.dtype == torch.float32
    torch.testing.assert_close(target, torch.from_numpy(crops[5]))
    assert set(params) == {"rotation", "polarity", "scale"}
    assert 0 <= params["rotation"] < 360 and params["polarity"] in (0, 1, 2, 3)
    assert 0.8 <= params["scale"] <= 1.25
    for k, name in enumerate(("rotation", "polarity", "scale")):
        torch.testing.assert_close(inputs[k], NUISANCES[name].apply(target, params[name]))
    assert ds[-1][1].shape == (2, 32, 32)
    with pytest.raises(IndexError):
        ds[12]


def test_epochs_and_seeds(crops):
    ds = NuisancePairs(crops, seed=7, return_params=True)
    ds.set_epoch(0)
    e0 = [ds[i][2]["rotation"] for i in range(len(ds))]
    e0_again = NuisancePairs(crops, seed=7, return_params=True)[3]
    ds.set_epoch(1)
    e1 = [ds[i][2]["rotation"] for i in range(len(ds))]
    assert e0 != e1  # fresh draws every epoch
    ds.set_epoch(0)
    torch.testing.assert_close(ds[3][0], e0_again[0])  # same seed + epoch -> identical item
    assert ds[3][2] == e0_again[2]
    other = NuisancePairs(crops, seed=8, return_params=True)
    assert [other[i][2]["rotation"] for i in range(len(ds))] != e0
    # the draws are not uniform-constant across items
    assert len({round(a, 6) for a in e0}) == len(e0)


def test_dataloader_collates(crops):
    ds = NuisancePairs(crops, "rotation,polarity", return_params=True)
    inputs, target, params = next(iter(DataLoader(ds, batch_size=4)))
    assert inputs.shape == (4, 2, 2, 32, 32) and target.shape == (4, 2, 32, 32)
    assert params["rotation"].shape == (4,) and params["polarity"].dtype == torch.int64
    plain = next(iter(DataLoader(NuisancePairs(crops), batch_size=5)))
    assert len(plain) == 2 and plain[0].shape == (5, 2, 2, 32, 32)


def test_lazy_sources_and_bad_targets(crops):
    lazy = [crops[i, 0] for i in range(4)]  # list of (S, S) images
    ds = NuisancePairs(lazy, "polarity")
    assert len(ds) == 4 and ds[0][0].shape == (1, 1, 32, 32) and ds.channels == 1
    tensor_ds = NuisancePairs(torch.from_numpy(crops), "polarity")
    assert tensor_ds[0][0].shape == (1, 2, 32, 32)
    with pytest.raises(ValueError, match="square"):
        NuisancePairs(np.zeros((2, 1, 32, 30), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        NuisancePairs(np.full((2, 1, 8, 8), np.nan, np.float32))
    with pytest.warns(RuntimeWarning, match=r"\[0, 1\]"):
        NuisancePairs(np.full((2, 1, 8, 8), 200.0, np.float32))


def test_autoencode_baseline(crops):
    ds = NuisanceAutoencode(crops, "rotation,polarity", seed=2)
    inputs, target = ds[0]
    assert ds.n_encoders == 1 and inputs.shape == (1, 2, 32, 32)
    torch.testing.assert_close(inputs[0], target)


def test_draw_and_apply(crops):
    out, angles = draw_and_apply(crops, "rotation", np.random.default_rng(0))
    assert out.shape == crops.shape and out.dtype == np.float32
    assert angles.shape == (12,) and ((angles >= 0) & (angles < 360)).all()
    flipped, codes = draw_and_apply(crops, "polarity", np.random.default_rng(0))
    assert set(codes.tolist()) <= {0, 1, 2, 3}
    np.testing.assert_allclose(flipped[codes == 0], crops[codes == 0])


def test_pose_is_rotation_with_optional_mirror(crops):
    x = torch.from_numpy(crops[0])
    pose = NUISANCES["pose"].apply
    rot = NUISANCES["rotation"].apply
    torch.testing.assert_close(pose(x, 30.0), rot(x, 30.0))
    torch.testing.assert_close(pose(x, 360.0 + 30.0), rot(torch.flip(x, dims=(-1,)), 30.0))
    torch.testing.assert_close(pose(x, 0.0), x)
    with pytest.raises(ValueError, match="720"):
        pose(x, 720.0)
    params = [NUISANCES["pose"].draw(np.random.default_rng(i)) for i in range(200)]
    assert all(0 <= p < 720 for p in params)
    assert 0.3 < np.mean([p >= 360 for p in params]) < 0.7  # mirrored about half the time
    ds = NuisancePairs(crops, "pose,polarity", return_params=True)
    inputs, target, params = ds[0]
    assert inputs.shape == (2, *target.shape)


def test_randomise_draws_every_nuisance_afresh_for_each_cell(crops):
    """The invariance term's second view: every nuisance in turn, a fresh draw per cell."""
    from napari_mevae.nuisances import randomise

    x = torch.from_numpy(np.asarray(crops[:6], np.float32))
    flipped = randomise(x, "polarity", np.random.default_rng(0))
    assert flipped.shape == x.shape
    for cell, out in zip(x, flipped, strict=True):  # each is one of the four flips of its cell
        assert any(torch.equal(apply_nuisance("polarity", cell, c), out) for c in range(4))
    a = randomise(x, "rotation,polarity", np.random.default_rng(1))
    b = randomise(x, "rotation,polarity", np.random.default_rng(1))
    c = randomise(x, "rotation,polarity", np.random.default_rng(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)  # seeded, and fresh per draw
    # a rotation keeps the cell's total intensity (nearly: the corners), so it is the same cell
    assert torch.allclose(a.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=0.05)
    with pytest.raises(ValueError, match="unknown nuisance"):
        randomise(x, "wobble", np.random.default_rng(0))
    # one generator per cell: a cell's draw does not depend on the others in its batch
    per_cell = [np.random.default_rng([9, i]) for i in range(6)]
    alone = randomise(x[2:3], "rotation", [np.random.default_rng([9, 2])])
    assert torch.equal(randomise(x, "rotation", per_cell)[2:3], alone)
    with pytest.raises(ValueError, match="5 random generators for 6 cells"):
        randomise(x, "rotation", per_cell[:5])
