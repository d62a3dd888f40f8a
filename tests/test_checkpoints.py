"""Checkpoints: the round trip, safe loading (no pickled code), clear errors."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from blobs import Blobs
from napari_mevae.checkpoints import load_checkpoint, resolve_checkpoint, save_checkpoint
from napari_mevae.config import CheckpointError, TrainOptions, preset
from napari_mevae.training import Trainer


def test_checkpoint_round_trip_gives_identical_encodings(tmp_path):
    ds = Blobs()
    trainer = Trainer(preset("tiny"), ds, TrainOptions(epochs=1, batch_size=8, seed=0))
    model = trainer.train()
    path = save_checkpoint(tmp_path / "m.pt", model, trainer.optimizer, epoch=1)
    ck = load_checkpoint(path)
    again = ck.build_model()
    x = torch.from_numpy(ds.inputs[:10])
    assert torch.equal(model.cpu().encode(x), again.encode(x))
    assert ck.epoch == 1 and ck.config == model.config
    # a save_dir or models/ dir resolves to the file
    save_checkpoint(tmp_path / "run" / "models", model)
    assert resolve_checkpoint(tmp_path / "run") == tmp_path / "run" / "models" / "checkpoint.pt"


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mevae_pwned",))


def test_malicious_pickle_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "napari-mevae-checkpoint", "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused for safety|cannot read"):
        load_checkpoint(path)
    assert not os.path.exists("/tmp/mevae_pwned")
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert not os.path.exists("/tmp/mevae_pwned")


def test_corrupt_missing_and_foreign_checkpoints_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="no checkpoint in directory"):
        load_checkpoint(tmp_path)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="not a napari-mevae checkpoint"):
        load_checkpoint(foreign)
