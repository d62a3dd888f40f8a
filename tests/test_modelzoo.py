"""BioImage Model Zoo packages: `mevae export` out, `--checkpoint model.zip` back in.

A small model trained on 64 real LINCS pairs is exported, validated with bioimageio.spec and
test-run with bioimageio.core with the network cut off; the package loads back wherever a
checkpoint is accepted and encodes as the checkpoint; tampered packages are refused in one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import shutil
import socket
import sys
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from napari_mevae.analysis import encode, reconstruct
from napari_mevae.checkpoints import load_checkpoint, save_checkpoint
from napari_mevae.cli import main
from napari_mevae.config import CheckpointError, InputError, preset
from napari_mevae.folders import FolderTargets
from napari_mevae.model import MEVAE
from napari_mevae.modelzoo import MARKER, MEVAEFeatures, export_package, load_package

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


def _need_bioimageio() -> None:
    """Skipped without the [bioimageio] extra, except in CI (.ci/run installs it)."""
    try:
        import bioimageio.core  # noqa: F401
        import bioimageio.spec  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("bioimageio.spec / bioimageio.core not installed: pip install '.[bioimageio]'")


SMALL = ["--image_size", "32", "--latent_dim", "8", "--inter_dim", "32", "--batch_size", "16"]
FILES = {
    "rdf.yaml",
    "README.md",
    "cover.png",
    "training_history.json",
    "test_input.npy",
    "test_output_features.npy",
    "test_output_reconstruction.npy",
    "sample_input.tif",
    "sample_output_features.tif",
    "sample_output_reconstruction.tif",
    "mevae_state_dict.pt",
    "mevae_torchscript.pt",
}


def pair_args(root):
    return [
        "--data_dir",
        str(root / "InputImages1"),
        "--input2_dir",
        str(root / "InputImages2"),
        "--out1_dir",
        str(root / "OutputImages"),
    ]


@contextlib.contextmanager
def offline():
    """Every connection attempt (httpx, raw sockets) fails and is recorded."""
    import httpx

    attempts: list[str] = []

    def no_http(self, request):
        attempts.append(str(request.url))
        raise httpx.ConnectError("offline test", request=request)

    def no_socket(self, address):
        attempts.append(repr(address))
        raise OSError("offline test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(httpx.HTTPTransport, "handle_request", no_http)
        mp.setattr(socket.socket, "connect", no_socket)
        yield attempts


@pytest.fixture(scope="module")
def run(lincs64, tmp_path_factory):
    _need_bioimageio()
    out = tmp_path_factory.mktemp("zoo") / "Outputs"
    args = ["train", *pair_args(lincs64), "--save_dir", str(out), "--epochs", "3", *SMALL]
    assert main([*args, "--verbose", "0", "--seed", "0"]) == 0
    return out


@pytest.fixture(scope="module")
def package(run, tmp_path_factory):
    """Exported from the run with the defaults: test tensors from its Truth_images.png."""
    out = tmp_path_factory.mktemp("pkg") / "model.zip"
    with offline() as attempts:
        code = main(
            [
                "export",
                "--checkpoint",
                str(run),
                "--out",
                str(out),
                "--name",
                "ME-VAE LINCS test",
                "--authors",
                "Ada Lovelace, Alan Turing",
                "--verbose",
                "0",
            ]
        )
    assert code == 0 and attempts == []
    return out


def _rdf(path):
    with zipfile.ZipFile(path) as zf:
        return yaml.safe_load(zf.read("rdf.yaml"))


def test_package_validates_and_passes_the_bioimageio_test_offline(package):
    from bioimageio.core import test_model
    from bioimageio.spec import load_description

    with offline() as attempts:
        descr = load_description(package, perform_io_checks=True)
        result = test_model(package)
    assert attempts == []
    assert descr.validation_summary.status == "valid-format", descr.validation_summary
    assert result.status == "passed", result.format()
    names = [d.name for d in result.details]
    for fmt in ("pytorch_state_dict", "torchscript"):
        assert f"Reproduce test outputs from test inputs ({fmt})" in names
    assert not [d for d in result.details if d.status == "failed"]


def test_package_layout_and_metadata(package, lincs64):
    from PIL import Image

    with zipfile.ZipFile(package) as zf:
        assert set(zf.namelist()) == FILES
        test_input = np.load(io.BytesIO(zf.read("test_input.npy")))
        doc = zf.read("README.md").decode()
        cover = Image.open(io.BytesIO(zf.read("cover.png")))
        history = zf.read("training_history.json")
    rdf = _rdf(package)
    assert rdf["type"] == "model" and rdf["name"] == "ME-VAE LINCS test"
    assert [a["name"] for a in rdf["authors"]] == ["Ada Lovelace", "Alan Turing"]
    assert rdf["cite"][0]["doi"] == "10.1038/s42003-022-03218-x"
    assert rdf["license"] == "CC-BY-4.0" and MARKER in rdf["tags"]
    assert set(rdf["weights"]) == {"torchscript", "pytorch_state_dict"}
    section = rdf["config"][MARKER]
    assert section["model"]["image_size"] == 32 and section["model"]["n_encoders"] == 2
    assert section["epoch"] == 3 and section["input"]["canonical_pose"] is True
    assert [i["id"] for i in rdf["inputs"]] == ["cells"]
    assert [o["id"] for o in rdf["outputs"]] == ["features", "reconstruction"]
    # real crops of the training data: the run's first targets, as its grid holds them (8-bit)
    targets = FolderTargets(lincs64 / "OutputImages", 32, 1).array[:8]
    assert test_input.shape == (8, 1, 32, 32) and test_input.dtype == np.float32
    np.testing.assert_array_equal(test_input, np.round(targets * 255) / 255)
    assert cover.size[0] == 2 * cover.size[1]
    for words in ("How to crop cells", "canonical pose", "mevae pairs", "## Validation"):
        assert words in doc
    assert len(pd.read_json(io.BytesIO(history))) == 3


def test_package_encodes_as_its_checkpoint_everywhere(package, run, lincs64, tmp_path):
    crops = FolderTargets(lincs64 / "OutputImages", 32, 1).array
    ckpt = load_checkpoint(run)
    original = ckpt.build_model()
    loaded = load_checkpoint(package)
    assert loaded.path == package and loaded.config == ckpt.config and loaded.epoch == 3
    z = encode(original, crops)
    assert np.max(np.abs(encode(loaded.build_model(), crops) - z)) < 1e-5
    # the TorchScript weights, as other tools run them, on all 64 cells
    with zipfile.ZipFile(package) as zf:
        scripted = torch.jit.load(io.BytesIO(zf.read("mevae_torchscript.pt")))
    with torch.no_grad():
        feats, recon = scripted(torch.from_numpy(crops))
    assert feats.dtype == torch.float32
    assert np.max(np.abs(feats.numpy() - z)) < 1e-5
    assert np.max(np.abs(recon.numpy() - reconstruct(original, crops))) < 1e-5

    # --checkpoint model.zip: mevae encode and mevae train --phase load
    quiet = ["--verbose", "0"]
    targets = ["--targets", str(lincs64 / "OutputImages")]
    for name, source in (("zip.csv", package), ("run.csv", run)):
        assert (
            main(
                [
                    "encode",
                    "--checkpoint",
                    str(source),
                    *targets,
                    "--out",
                    str(tmp_path / name),
                    *quiet,
                ]
            )
            == 0
        )
    a, b = (pd.read_csv(tmp_path / n).iloc[:, 1:].to_numpy() for n in ("zip.csv", "run.csv"))
    assert np.max(np.abs(a - b)) < 1e-5
    out = tmp_path / "load"
    args = ["train", *pair_args(lincs64), "--phase", "load", "--checkpoint", str(package)]
    assert main([*args, "--save_dir", str(out), *quiet]) == 0
    a = pd.read_csv(out / "encodings.csv").iloc[:, 1:].to_numpy()
    b = pd.read_csv(run / "encodings.csv").iloc[:, 1:].to_numpy()
    assert np.max(np.abs(a - b)) < 1e-5


def test_features_of_a_screen_from_a_package_match_the_run(package, run, tmp_path):
    """mevae features --checkpoint model.zip: the same z columns as from the run folder."""
    import tifffile

    from napari_mevae.synthetic import make_synthetic_cells

    c = make_synthetic_cells(n_cells=10, shape=(160, 160), channels=1, seed=4, cell_radius=7)
    tifffile.imwrite(tmp_path / "f1.tif", np.squeeze(c.image))
    tifffile.imwrite(tmp_path / "f1_labels.tif", c.labels.astype(np.uint16))
    store = tmp_path / "cells"
    crop = [
        "crop",
        "--image",
        str(tmp_path / "f1.tif"),
        "--labels",
        str(tmp_path / "f1_labels.tif"),
    ]
    assert main([*crop, "--out", str(store), "--size", "32", "--verbose", "0"]) == 0
    tables = []
    for name, source in (("zip.parquet", package), ("run.parquet", run)):
        out = tmp_path / name
        argv = ["features", "--checkpoint", str(source), "--cells", str(store), "--out", str(out)]
        assert main([*argv, "--verbose", "0"]) == 0
        tables.append(pd.read_parquet(out))
    a, b = tables
    z = [c for c in a.columns if c.startswith("z")]
    assert len(a) == len(b) >= 8 and z == [c for c in b.columns if c.startswith("z")]
    za, zb = a[z].to_numpy(float), b[z].to_numpy(float)
    assert np.nanmax(np.abs(zb)) > 0 and np.array_equal(np.isnan(za), np.isnan(zb))
    assert np.nanmax(np.abs(za - zb)) < 1e-5


class _Tripwire:
    """Unpickling it creates ``path``: proof that a pickle ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _tampered(package, dest, kind, tripwire):
    with zipfile.ZipFile(package) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    rdf = yaml.safe_load(files["rdf.yaml"])
    weights = rdf["weights"]
    if kind == "wrong hash":
        blob = bytearray(files["mevae_state_dict.pt"])
        blob[len(blob) // 2] ^= 0xFF
        files["mevae_state_dict.pt"] = bytes(blob)
    elif kind == "missing file":
        del files["mevae_torchscript.pt"]
    elif kind in ("pickle for TorchScript", "torch.save for TorchScript"):
        if kind == "pickle for TorchScript":
            blob = pickle.dumps(_Tripwire(tripwire))
        else:
            buf = io.BytesIO()
            torch.save(_Tripwire(tripwire), buf)
            blob = buf.getvalue()
        files["mevae_torchscript.pt"] = blob
        weights["torchscript"]["sha256"] = hashlib.sha256(blob).hexdigest()
    elif kind == "pickle for state dict":
        buf = io.BytesIO()
        torch.save({"encoders.0.dense.weight": _Tripwire(tripwire)}, buf)
        files["mevae_state_dict.pt"] = buf.getvalue()
        weights["pytorch_state_dict"]["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    elif kind == "not an ME-VAE export":
        del rdf["config"][MARKER]
    files["rdf.yaml"] = yaml.safe_dump(rdf, sort_keys=False).encode()
    with zipfile.ZipFile(dest, "w") as zf:
        for name, blob in files.items():
            zf.writestr(name, blob)
    return dest


@pytest.mark.parametrize(
    "kind, words",
    [
        ("wrong hash", "mevae_state_dict.pt does not match its SHA-256"),
        ("missing file", "mevae_torchscript.pt (weights.torchscript) is missing"),
        ("pickle for TorchScript", "mevae_torchscript.pt is not TorchScript"),
        ("torch.save for TorchScript", "mevae_torchscript.pt is not TorchScript"),
        ("pickle for state dict", "holds objects other than weights"),
        ("not an ME-VAE export", "not an ME-VAE export of napari-mevae"),
    ],
)
def test_tampered_or_foreign_packages_are_refused_in_one_line(
    package, lincs64, tmp_path, capsys, kind, words
):
    tripwire = tmp_path / "pickle-ran"
    bad = _tampered(package, tmp_path / "bad.zip", kind, tripwire)
    with pytest.raises(CheckpointError, match="bad.zip"):
        load_package(bad)
    code = main(["encode", "--checkpoint", str(bad), "--targets", str(lincs64 / "OutputImages")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("mevae encode: error: bad.zip"), err
    assert words in err
    assert not tripwire.exists()


def test_export_from_crops_and_from_a_package(package, lincs64, tmp_path):
    """--targets gives the test tensors; a package re-exports (its path is in no run)."""
    out = tmp_path / "again.zip"
    args = ["export", "--checkpoint", str(package), "--out", str(out), "--no-test"]
    targets = ["--targets", str(lincs64 / "OutputImages")]
    assert main([*args, *targets, "--verbose", "0"]) == 0
    with zipfile.ZipFile(out) as zf:
        test_input = np.load(io.BytesIO(zf.read("test_input.npy")))
    crops = FolderTargets(lincs64 / "OutputImages", 32, 1).array
    np.testing.assert_array_equal(test_input, crops[:8])
    assert _rdf(out)["authors"] == []
    z = encode(load_checkpoint(package).build_model(), crops)
    assert np.max(np.abs(encode(load_checkpoint(out).build_model(), crops) - z)) < 1e-5
    # in Python (napari's console), the crops themselves: 5 cells, a 2 x 2 cover
    result = export_package(package, tmp_path / "five.zip", targets=crops[:5], test=False)
    with zipfile.ZipFile(result.path) as zf:
        np.testing.assert_array_equal(np.load(io.BytesIO(zf.read("test_input.npy"))), crops[:5])
    with pytest.raises(InputError, match="the model wants"):
        export_package(package, tmp_path / "bad.zip", targets=crops[:5, :, :16, :16])


def test_export_explains_what_it_needs(run, tmp_path, capsys):
    lone = tmp_path / "lone.pt"
    shutil.copy(run / "models" / "checkpoint.pt", lone)
    cases = [
        (["--checkpoint", str(lone)], "give --targets with canonical crops"),
        (["--checkpoint", str(run), "--license", "Free"], "not an SPDX licence id"),
        (["--checkpoint", str(run), "--name", "my.model"], "--name 'my.model'"),
        (["--checkpoint", str(tmp_path / "none")], "checkpoint not found"),
    ]
    for args, words in cases:
        assert main(["export", *args, "--out", str(tmp_path / "m.zip")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "m.pt")]) == 2
    assert "must name a .zip" in capsys.readouterr().err
    assert not list(tmp_path.glob("m*"))


def test_export_without_the_extra_says_what_to_install(run, package, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bioimageio.core", None)  # as if not installed
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "m.zip")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'napari-mevae[bioimageio]'" in err
    # loading a package needs no bioimageio
    monkeypatch.setitem(sys.modules, "bioimageio.spec", None)
    assert load_checkpoint(package).epoch == 3


@pytest.mark.parametrize("variance", ["mixed", "unmeasured", "none used", "directions"])
def test_features_module_is_the_analysis_encode(variance):
    """MEVAEFeatures (and its TorchScript trace) gives MEVAE.encode of the repeated crop."""
    torch.manual_seed(0)
    model = MEVAE(preset("tiny", image_size=16, latent_dim=6, nfilters=4)).eval()
    values = {"mixed": [1.0, 0.0, 0.5, 0.001, 2.0, 0.0], "none used": [0.0] * 6}
    if variance in values:
        model.latent_variance.copy_(torch.tensor(values[variance]))
    if variance == "directions":  # axes 0 and 2 in use, carrying one direction between them
        v = torch.tensor([0.6, 0.0, 0.8, 0.0, 0.0, 0.0])
        model.latent_covariance.copy_(2.0 * torch.outer(v, v) + 1e-5 * torch.eye(6))
        model.latent_mean.copy_(torch.linspace(0.5, 1.0, 6))
        model.latent_variance.copy_(torch.diagonal(model.latent_covariance))
        assert model.n_directions == 1
    module = MEVAEFeatures(**model.config.to_dict())
    module.load_state_dict(model.state_dict())
    module.eval()
    x = torch.rand(5, 1, 16, 16)
    z = model.encode(x[:, None].repeat(1, 2, 1, 1, 1))
    with torch.no_grad():
        feats, recon = module(x)
        traced = torch.jit.trace(module, x[:2])
        t_feats, _ = traced(x)
    if variance == "mixed":
        assert (z[:, [1, 3, 5]] == 0).all() and (z[:, [0, 2, 4]] != 0).all()
    elif variance == "directions":
        assert (z[:, [1, 3, 4, 5]] == 0).all()
        off = z[:, [0, 2]] - model.latent_mean[[0, 2]]
        torch.testing.assert_close(off[:, 0] * 0.8, off[:, 1] * 0.6)  # along v
    else:
        assert (z != 0).all()
    torch.testing.assert_close(feats, z, rtol=0, atol=1e-6)
    torch.testing.assert_close(t_feats, z, rtol=0, atol=1e-6)
    assert torch.allclose(recon, model.decode(z), atol=1e-5)


def test_checkpoint_files_are_not_taken_for_packages(tmp_path):
    """A .pt checkpoint is a zip too: it still loads as one."""
    from napari_mevae.modelzoo import is_package

    path = save_checkpoint(tmp_path / "c.pt", MEVAE(preset("tiny")))
    assert zipfile.is_zipfile(path) and not is_package(path)
    assert load_checkpoint(path).config == preset("tiny")
