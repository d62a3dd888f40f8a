"""The `mevae` command end to end on 64 real LINCS pairs, at 32 px."""

import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from napari_mevae.checkpoints import load_checkpoint
from napari_mevae.cli import main
from napari_mevae.config import DEFAULT_INVARIANCE
from napari_mevae.model import ACTIVE_VARIANCE
from napari_mevae.runs import WALK_UNTRAINED

SMALL = [
    "--image_size",
    "32",
    "--latent_dim",
    "8",
    "--inter_dim",
    "32",
    "--batch_size",
    "16",
    "--verbose",
    "0",
    "--seed",
    "0",
]
REFERENCE_OUTPUTS = [
    "training.log",
    "filenames.csv",
    "encodings.csv",
    "models/checkpoint.pt",
    "models/checkpoint.json",
    "models/encoder1.pt",
    "models/encoder2.pt",
    "models/decoder.pt",
    "input_images.png",
    "input2_images.png",
    "Truth_images.png",
    "recon_images_final1.tif",
    "latent_walk_final.png",
]


def pair_args(root):
    return [
        "--data_dir",
        str(root / "InputImages1"),
        "--input2_dir",
        str(root / "InputImages2"),
        "--out1_dir",
        str(root / "OutputImages"),
    ]


@pytest.fixture(scope="module")
def trained(lincs64, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "Outputs"
    assert (
        main(["train", *pair_args(lincs64), "--save_dir", str(out), "--epochs", "2", *SMALL]) == 0
    )
    return out


def test_train_writes_every_reference_output(trained, lincs64):
    for name in REFERENCE_OUTPUTS:
        assert (trained / name).is_file(), name
    log = (trained / "training.log").read_text().splitlines()
    assert log[0] == "epoch\tloss" and len(log) == 3
    assert [line.split("\t")[0] for line in log[1:]] == ["0", "1"]
    assert all(np.isfinite(float(line.split("\t")[1])) for line in log[1:])
    files = (trained / "filenames.csv").read_text().splitlines()
    assert (
        len(files) == 64 and files[0].endswith("Image_0.tif") and files[2].endswith("Image_2.tif")
    )
    enc = pd.read_csv(trained / "encodings.csv")
    assert list(enc.columns) == ["filename", *[f"z{i}" for i in range(8)]]
    assert enc["filename"].tolist() == files
    assert np.isfinite(enc.iloc[:, 1:].to_numpy()).all()
    # 8x8 grids of 32 px images with 1 px borders; latent walk: one row per dimension, 10 steps
    assert Image.open(trained / "input_images.png").size == (8 * 33 + 1, 8 * 33 + 1)
    assert tifffile.imread(trained / "recon_images_final1.tif").shape == (8 * 33 + 1, 8 * 33 + 1)
    ck = load_checkpoint(trained)
    in_use = int((ck.model_state["latent_variance"] >= ACTIVE_VARIANCE).sum()) or 8
    assert Image.open(trained / "latent_walk_final.png").size == (10 * 33 + 1, in_use * 33 + 1)
    assert ck.config.n_encoders == 2 and ck.config.image_size == 32 and ck.epoch == 2


def test_zero_epochs_into_a_new_folder_writes_the_untrained_run(lincs64, tmp_path):
    """--epochs 0 (the fixed-cost run): an untrained model's checkpoint holds NaN activity,
    which must still count as this model's own checkpoint when the outputs are written."""
    out = tmp_path / "zero"
    args = ["--save_dir", str(out), "--epochs", "0", *SMALL, "--latent_dim", "20"]
    assert main(["train", *pair_args(lincs64), *args]) == 0
    for name in REFERENCE_OUTPUTS:
        assert (out / name).is_file(), name
    ck = load_checkpoint(out)
    assert ck.epoch == 0 and np.isnan(ck.model_state["latent_variance"].numpy()).all()
    assert pd.read_csv(out / "encodings.csv").shape == (64, 21)
    # no dimension in use yet: the walk shows the first WALK_UNTRAINED of the 20 (it took
    # seconds to draw 128 rows of an untrained decoder)
    assert WALK_UNTRAINED == 16
    assert Image.open(out / "latent_walk_final.png").size == (10 * 33 + 1, 16 * 33 + 1)


def test_train_says_when_the_loss_was_still_falling(lincs64, tmp_path, capsys):
    """A run whose budget ends while the loss still falls (8 short epochs from scratch) ends
    by saying that more --epochs may help; a 1-epoch run is too short to tell, and does not."""
    out = tmp_path / "falling"
    args = ["--save_dir", str(out), "--epochs", "8", *SMALL, "--verbose", "1"]
    assert main(["train", *pair_args(lincs64), *args]) == 0
    err = capsys.readouterr().err
    log = pd.read_csv(out / "training.log", sep="\t")
    losses = log["loss"].to_numpy()
    fall = (losses[-4:-2].mean() - losses[-2:].mean()) / losses[-4:-2].mean()
    said = re.search(r"note: the loss was still falling at the end \(([\d.]+) %", err)
    assert fall > 0.02 and said is not None, (fall, err[-400:])  # 6.8 % on torch 2.13, bf16
    assert abs(float(said.group(1)) - 100 * fall) < 0.06 and "more --epochs" in err
    args = ["--save_dir", str(tmp_path / "one"), "--epochs", "1", *SMALL, "--verbose", "1"]
    assert main(["train", *pair_args(lincs64), *args]) == 0
    assert "still falling" not in capsys.readouterr().err


def test_phase_load_encodes_without_retraining(trained, lincs64, tmp_path):
    out = tmp_path / "again"
    before = (trained / "models" / "checkpoint.pt").read_bytes()
    assert (
        main(
            [
                "train",
                *pair_args(lincs64),
                "--save_dir",
                str(out),
                "--phase",
                "load",
                "--checkpoint",
                str(trained),
                "--verbose",
                "0",
            ]
        )
        == 0
    )
    assert (trained / "models" / "checkpoint.pt").read_bytes() == before
    assert not (out / "training.log").exists()
    a = pd.read_csv(trained / "encodings.csv")
    b = pd.read_csv(out / "encodings.csv")
    np.testing.assert_allclose(a.iloc[:, 1:].to_numpy(), b.iloc[:, 1:].to_numpy(), atol=1e-6)


def test_encode_command_on_pairs_and_single_folder(trained, lincs64, tmp_path):
    out = tmp_path / "enc.csv"
    args = [
        "encode",
        "--checkpoint",
        str(trained / "models" / "checkpoint.pt"),
        "--data_dir",
        str(lincs64 / "InputImages1"),
        "--input2_dir",
        str(lincs64 / "InputImages2"),
        "--out",
        str(out),
        "--verbose",
        "0",
    ]
    assert main(args) == 0
    a = pd.read_csv(trained / "encodings.csv")
    b = pd.read_csv(out)
    np.testing.assert_allclose(a.iloc[:, 1:].to_numpy(), b.iloc[:, 1:].to_numpy(), atol=1e-6)
    single = tmp_path / "single.csv"
    assert (
        main(
            [
                "encode",
                "--checkpoint",
                str(trained),
                "--data_dir",
                str(lincs64 / "OutputImages"),
                "--out",
                str(single),
                "--verbose",
                "0",
            ]
        )
        == 0
    )
    assert pd.read_csv(single).shape == (64, 9)


def test_baselines_and_three_encoders(lincs64, tmp_path):
    # no --beta: the reference's balance at 32 px, (32 / 128)**2, and 4x that for a beta-VAE
    for model, k, beta in (("vae", 1, 0.0625), ("betavae", 1, 0.25)):
        out = tmp_path / model
        assert (
            main(
                [
                    "train",
                    *pair_args(lincs64),
                    "--model",
                    model,
                    "--save_dir",
                    str(out),
                    "--epochs",
                    "1",
                    *SMALL,
                ]
            )
            == 0
        )
        cfg = load_checkpoint(out).config
        assert (cfg.n_encoders, cfg.beta) == (k, beta)
        assert pd.read_csv(out / "encodings.csv").shape == (64, 9)
    out = tmp_path / "k3"
    args = [*pair_args(lincs64), "--input3_dir", str(lincs64 / "InputImages1")]
    assert (
        main(["train", *args, "--save_dir", str(out), "--epochs", "1", "--beta", "2", *SMALL]) == 0
    )
    cfg = load_checkpoint(out).config
    assert cfg.n_encoders == 3 and cfg.beta == 2
    assert (out / "input3_images.png").is_file()


def test_unmatched_names_give_a_clear_error(lincs64, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(lincs64, broken)
    (broken / "InputImages2" / "train" / "Image_5.tif").unlink()
    (broken / "OutputImages" / "train" / "Image_7.tif").rename(
        broken / "OutputImages" / "train" / "Image_700.tif"
    )
    code = main(
        ["train", *pair_args(broken), "--save_dir", str(tmp_path / "o"), "--epochs", "1", *SMALL]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "do not pair up by file name" in err and "Image_5" in err and "Image_700" in err
    assert not (tmp_path / "o" / "models").exists()


def test_all_zero_images_do_not_give_nan(lincs64, tmp_path):
    zeros = tmp_path / "zeros"
    shutil.copytree(lincs64, zeros)
    for folder in ("InputImages1", "InputImages2", "OutputImages"):
        for i in range(8):
            tifffile.imwrite(
                zeros / folder / "train" / f"Image_{i}.tif", np.zeros((128, 128), np.uint8)
            )
    out = tmp_path / "o"
    assert main(["train", *pair_args(zeros), "--save_dir", str(out), "--epochs", "1", *SMALL]) == 0
    assert np.isfinite(pd.read_csv(out / "encodings.csv").iloc[:, 1:].to_numpy()).all()


def test_bad_checkpoint_and_missing_folders_are_clear_errors(lincs64, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert (
        main(
            [
                "encode",
                "--checkpoint",
                str(bad),
                "--data_dir",
                str(lincs64 / "InputImages1"),
                "--verbose",
                "0",
            ]
        )
        == 2
    )
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--data_dir",
                str(tmp_path / "nowhere"),
                "--input2_dir",
                str(tmp_path),
                "--out1_dir",
                str(tmp_path),
                *SMALL,
            ]
        )
        == 2
    )
    assert "image folder not found" in capsys.readouterr().err
    assert main(["train", "--phase", "load", *pair_args(lincs64), "--verbose", "0"]) == 2
    assert "--phase load needs --checkpoint" in capsys.readouterr().err


def test_documented_reference_command_runs_as_a_program(lincs64, tmp_path):
    """The README's command, flags as in the reference (image size cut to 32 px for speed)."""
    cmd = [
        sys.executable,
        "-m",
        "napari_mevae",
        "train",
        "--data_dir",
        "InputImages1/",
        "--input2_dir",
        "InputImages2/",
        "--out1_dir",
        "OutputImages/",
        "--save_dir",
        str(tmp_path / "Outputs"),
        "--image_size",
        "32",
        "--latent_dim",
        "32",
        "--batch_size",
        "10",
        "--epochs",
        "1",
        "--verbose",
        "1",
    ]
    proc = subprocess.run(cmd, cwd=lincs64, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1/1" in proc.stderr and "outputs written" in proc.stderr
    enc = pd.read_csv(tmp_path / "Outputs" / "encodings.csv")
    assert enc.shape == (64, 33)
    # the dimensions training found unused are the all-zero columns of the encodings
    said = re.search(r"latent dimensions in use: (?:only )?(\d+)", proc.stderr)
    used = int(said.group(1))
    zero_columns = int((enc.filter(like="z") == 0).all().sum())
    # none in use yet (one short epoch): every dimension is kept rather than all zeroed
    assert zero_columns == (32 - used if used else 0)
    if used < 2:  # the message says what to do about it
        assert "train longer (more --epochs)" in proc.stderr and "--kl_warmup" in proc.stderr


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
    from napari_mevae.synthetic import make_synthetic_cells

    root = tmp_path_factory.mktemp("seg")
    syn = make_synthetic_cells(n_cells=40, shape=(320, 320), channels=2, seed=3)
    tifffile.imwrite(root / "image.tif", syn.image)
    tifffile.imwrite(root / "labels.tif", syn.labels)
    return root, syn


def test_pairs_then_train_from_pairs_and_from_targets(segmented, tmp_path):
    root, syn = segmented
    out = tmp_path / "pairs"
    assert (
        main(
            [
                "pairs",
                "--image",
                str(root / "image.tif"),
                "--labels",
                str(root / "labels.tif"),
                "--out",
                str(out),
                "--size",
                "32",
                "--channel-axis",
                "0",
                "--scale",
                "fit",
                "--npy",
                "--verbose",
                "0",
            ]
        )
        == 0
    )
    cells = pd.read_csv(out / "cells.csv")
    assert len(cells) == len(syn.classes)
    kept = cells[cells["skip_reason"].isna() | (cells["skip_reason"] == "")]
    assert len(kept) >= 30
    for col in (
        "filename",
        "label",
        "centroid_y",
        "centroid_x",
        "area",
        "orientation",
        "skip_reason",
    ):
        assert col in cells.columns
    for folder in ("InputImages1", "InputImages2", "OutputImages"):
        files = sorted((out / folder / "train").glob("*.tif"))
        assert len(files) == len(kept)
        assert tifffile.imread(files[0]).shape == (2, 32, 32)
    from napari_mevae.store import CropStore

    store = CropStore(out / "crops.npy")  # the same canonical crops in one file
    table = pd.read_csv(out / "crops.csv")
    assert store.shape == (len(kept), 2, 32, 32) and len(table) == len(cells)
    target0 = tifffile.imread(sorted((out / "OutputImages" / "train").glob("*.tif"))[0]) / 255
    assert np.abs(store[0] - target0).max() < 1 / 255 + 1e-3
    common = [
        "--image_size",
        "32",
        "--nchannel",
        "2",
        "--latent_dim",
        "8",
        "--inter_dim",
        "32",
        "--batch_size",
        "16",
        "--epochs",
        "1",
        "--verbose",
        "0",
        "--seed",
        "0",
    ]
    run1 = tmp_path / "run1"
    assert (
        main(
            [
                "train",
                "--data_dir",
                str(out / "InputImages1"),
                "--input2_dir",
                str(out / "InputImages2"),
                "--out1_dir",
                str(out / "OutputImages"),
                "--save_dir",
                str(run1),
                *common,
            ]
        )
        == 0
    )
    assert pd.read_csv(run1 / "encodings.csv").shape == (len(kept), 9)
    run2 = tmp_path / "run2"
    assert (
        main(
            [
                "train",
                "--targets",
                str(out / "OutputImages"),
                "--nuisances",
                "rotation,polarity,scale",
                "--save_dir",
                str(run2),
                *common,
            ]
        )
        == 0
    )
    cfg = load_checkpoint(run2).config
    assert cfg.n_encoders == 3 and cfg.nuisances == ["rotation", "polarity", "scale"]
    for name in [*REFERENCE_OUTPUTS, "input3_images.png", "models/encoder3.pt"]:
        assert (run2 / name).is_file(), name
    # resume from the save_dir: epochs continue
    assert (
        main(
            [
                "train",
                "--targets",
                str(out / "OutputImages"),
                "--nuisances",
                "rotation,polarity,scale",
                "--save_dir",
                str(run2),
                "--checkpoint",
                str(run2),
                *common,
            ]
        )
        == 0
    )
    assert load_checkpoint(run2).epoch == 2
    assert (run2 / "training.log").read_text().splitlines()[1:] and len(
        (run2 / "training.log").read_text().splitlines()
    ) == 3
    report = tmp_path / "report.json"
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(run2),
                "--targets",
                str(out / "OutputImages"),
                "--out",
                str(report),
            ]
        )
        == 0
    )
    import json

    values = json.loads(report.read_text())
    assert 0 <= values["rotation_leakage"] <= 1 and 0 <= values["polarity_leakage"] <= 1


def test_targets_from_a_crops_file_lazily(tmp_path):
    from napari_mevae.store import write_crops
    from napari_mevae.synthetic import synthetic_crops

    crops, _ = synthetic_crops(n=48, size=32, channels=1, seed=0)
    path = write_crops(tmp_path / "crops.npy", crops, dtype="uint8")
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--targets",
                str(path),
                "--save_dir",
                str(out),
                "--image_size",
                "32",
                "--latent_dim",
                "8",
                "--batch_size",
                "16",
                "--epochs",
                "1",
                "--verbose",
                "0",
                "--num_workers",
                "1",
            ]
        )
        == 0
    )
    enc = pd.read_csv(out / "encodings.csv")
    assert enc.shape == (48, 9) and enc["filename"].iloc[3] == "crops[3]"
    assert (
        main(
            [
                "train",
                "--targets",
                str(path),
                "--save_dir",
                str(out),
                "--image_size",
                "64",
                "--verbose",
                "0",
            ]
        )
        == 2
    )


def test_pairs_with_no_usable_cell_is_a_clear_error(tmp_path, capsys):
    tifffile.imwrite(
        tmp_path / "img.tif", np.random.default_rng(0).random((64, 64)).astype(np.float32)
    )
    tifffile.imwrite(tmp_path / "lab.tif", np.zeros((64, 64), np.int32))
    assert (
        main(
            [
                "pairs",
                "--image",
                str(tmp_path / "img.tif"),
                "--labels",
                str(tmp_path / "lab.tif"),
                "--out",
                str(tmp_path / "o"),
                "--verbose",
                "0",
            ]
        )
        == 2
    )
    assert "no cells" in capsys.readouterr().err
    lab = np.zeros((50, 50), np.int32)
    tifffile.imwrite(tmp_path / "lab2.tif", lab)
    assert (
        main(
            [
                "pairs",
                "--image",
                str(tmp_path / "img.tif"),
                "--labels",
                str(tmp_path / "lab2.tif"),
                "--out",
                str(tmp_path / "o"),
                "--verbose",
                "0",
            ]
        )
        == 2
    )
    assert "shape" in capsys.readouterr().err


def test_kl_warmup_flag_reaches_the_trainer(lincs64, tmp_path, monkeypatch):
    from napari_mevae import training

    seen = []
    original = training.Trainer.__init__

    def spy(self, model, dataset, options=None, resume=None):
        seen.append(options)
        original(self, model, dataset, options, resume)

    monkeypatch.setattr(training.Trainer, "__init__", spy)
    out = tmp_path / "warm"
    argv = ["train", *pair_args(lincs64), "--save_dir", str(out), "--epochs", "1", *SMALL]
    assert main([*argv, "--kl_warmup", "3", "--invariance", "0"]) == 0
    assert seen[-1].kl_warmup == 3.0 and seen[-1].invariance == 0.0
    assert main([*argv, "--phase", "train"]) == 0  # default: off, as the reference
    assert seen[-1].kl_warmup == 0.0
    assert seen[-1].invariance == DEFAULT_INVARIANCE  # the invariance term: on by default
    n = len(seen)
    assert main([*argv, "--invariance", "-1"]) == 2  # one clear line, nothing trained
    assert len(seen) == n


def test_precision_flag_reaches_the_trainer_and_is_announced(lincs64, tmp_path, capsys):
    out = tmp_path / "half"
    argv = ["train", *pair_args(lincs64), "--save_dir", str(out), "--epochs", "1", *SMALL]
    argv += ["--verbose", "1"]  # announce the run
    assert main([*argv, "--precision", "fp16"]) == 0
    assert "(float16 autocast, loss scaling)" in capsys.readouterr().err
    assert (out / "models" / "checkpoint.pt").is_file()
    assert main([*argv, "--precision", "float32", "--save_dir", str(tmp_path / "f32")]) == 0
    assert "(float32)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--precision", "half"])
    assert "invalid choice: 'half'" in capsys.readouterr().err
