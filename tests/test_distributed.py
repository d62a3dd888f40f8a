"""Two CPU processes with gloo end with the same encodings as one process (same seed)."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")

ARGS = [
    "--image_size",
    "32",
    "--latent_dim",
    "8",
    "--inter_dim",
    "32",
    "--batch_size",
    "16",
    "--epochs",
    "2",
    "--verbose",
    "0",
    "--seed",
    "0",
    "--epsilon_std",
    "0",
    "--device",
    "cpu",
    # exact float32 arithmetic: bf16 rounding of two half-batches differs from one full batch
    "--precision",
    "float32",
]


def test_two_gloo_processes_match_one_process(lincs64, tmp_path):
    data = [
        "--data_dir",
        str(lincs64 / "InputImages1"),
        "--input2_dir",
        str(lincs64 / "InputImages2"),
        "--out1_dir",
        str(lincs64 / "OutputImages"),
    ]
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "napari_mevae",
            "train",
            *data,
            *ARGS,
            "--save_dir",
            str(tmp_path / "one"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "napari_mevae",
            "train",
            "--distributed",
            *data,
            *ARGS,
            "--save_dir",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr
    a = pd.read_csv(tmp_path / "one" / "encodings.csv")
    b = pd.read_csv(tmp_path / "two" / "encodings.csv")
    assert len(b) == 64 and b["filename"].tolist() == a["filename"].tolist()  # every pair, once
    assert np.abs(a.iloc[:, 1:].to_numpy() - b.iloc[:, 1:].to_numpy()).max() < 1e-3
    log_a = (tmp_path / "one" / "training.log").read_text().splitlines()
    log_b = (tmp_path / "two" / "training.log").read_text().splitlines()
    assert len(log_b) == 3  # header + 2 epochs, written once by rank 0
    for la, lb in zip(log_a[1:], log_b[1:], strict=True):
        assert float(la.split("\t")[1]) == pytest.approx(float(lb.split("\t")[1]), rel=1e-4)


def test_distributed_flag_without_torchrun_is_a_clear_error(monkeypatch):
    from napari_mevae.config import TrainOptions, preset
    from napari_mevae.training import Trainer

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="needs torchrun"):
        Trainer(preset("tiny"), [0], TrainOptions(distributed=True))
