"""One pipeline: the CLI, the Python API and the napari widget, given the same cells and the
same choices, train the same model (identical first-epoch losses and weights)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch
from widget_helpers import wait_idle

from napari_mevae import workflow
from napari_mevae.checkpoints import load_checkpoint
from napari_mevae.store import write_crops


def _first_epoch_loss(log) -> float:
    lines = log.read_text().splitlines()
    assert lines[0] == "epoch\tloss" and lines[1].startswith("0\t")
    return float(lines[1].split("\t")[1])


def test_cli_api_and_widget_train_the_same_model(extracted, qtbot, tmp_path, monkeypatch, notes):
    viewer, widget = extracted
    crops = widget.session.crops  # the widget's own crops, float32
    latent, batch, seed = 8, 16, 3

    # napari: the Train button (the training process gets one thread, like the others)
    monkeypatch.setattr(workflow, "background_threads", lambda: 1)
    m = widget.model_panel
    m.latent.setValue(latent)
    m.batch.setValue(batch)
    m.seed.setValue(seed)
    m.epochs.setValue(1)
    m.autosave.setText(str(tmp_path / "widget"))
    assert m.train() is not None, widget.status.text()
    wait_idle(qtbot, widget, timeout=180_000)
    assert not notes["error"], notes["error"]

    # the command line, on the same crops written to a float32 crops file.  It and the API run
    # in processes of their own, as users run them: training in this process, where napari has
    # loaded Mesa's LLVM, would import triton beside it with a CUDA build of torch (segfault)
    npy = write_crops(tmp_path / "crops.npy", crops, dtype="float32")
    argv = ["train", "--targets", str(npy), "--save_dir", str(tmp_path / "cli")]
    argv += ["--image_size", str(crops.shape[-1]), "--nchannel", str(crops.shape[1])]
    argv += ["--latent_dim", str(latent), "--batch_size", str(batch), "--epochs", "1"]
    argv += ["--seed", str(seed), "--device", "cpu", "--threads", "1", "--verbose", "0"]
    cli = subprocess.run([sys.executable, "-m", "napari_mevae", *argv], capture_output=True)
    assert cli.returncode == 0, cli.stderr.decode()

    # the Python API, as the README shows it
    api = f"""
import numpy as np
from napari_mevae import Trainer, TrainOptions, build_config, run_training, training_dataset
crops = np.load({str(npy)!r})
config = build_config("mevae", image_size=crops.shape[-1], channels=crops.shape[1],
                      nuisances=["rotation", "polarity"], latent_dim={latent})
dataset = training_dataset(crops, config.nuisances, "mevae", seed={seed})
options = TrainOptions(epochs=1, batch_size={batch}, seed={seed}, device="cpu", threads=1,
                       save_dir={str(tmp_path / "api")!r})
list(run_training(Trainer(config, dataset, options), {str(tmp_path / "api" / "training.log")!r}))
"""
    run = subprocess.run([sys.executable, "-c", api], capture_output=True)
    assert run.returncode == 0, run.stderr.decode()

    losses = {k: _first_epoch_loss(tmp_path / k / "training.log") for k in ("widget", "cli", "api")}
    assert np.isfinite(losses["api"])
    assert losses["widget"] == losses["cli"] == losses["api"], losses
    states = {k: load_checkpoint(tmp_path / k).model_state for k in ("widget", "cli", "api")}
    for name, value in states["api"].items():
        assert torch.equal(value, states["cli"][name]), name
        assert torch.equal(value, states["widget"][name]), name
