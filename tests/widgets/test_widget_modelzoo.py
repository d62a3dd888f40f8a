"""The Model tab loads a BioImage Model Zoo package written by `mevae export`, and encodes."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from widget_helpers import wait_idle


def test_model_tab_loads_a_package_and_encodes(extracted, qtbot, tmp_path, monkeypatch, notes):
    try:
        import bioimageio.spec  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("bioimageio.spec not installed: pip install '.[bioimageio]'")
    from napari_mevae._widgets import _model
    from napari_mevae.analysis import encode
    from napari_mevae.checkpoints import save_checkpoint
    from napari_mevae.config import preset
    from napari_mevae.model import MEVAE

    viewer, widget = extracted
    s = widget.session
    crops = np.asarray(s.crops, dtype=np.float32)
    torch.manual_seed(0)
    model = MEVAE(preset("tiny", image_size=32, channels=2, latent_dim=8)).eval()
    ckpt = save_checkpoint(tmp_path / "m.pt", model, extra={"cells": s.settings.to_dict()})
    np.save(tmp_path / "crops.npy", crops[:16])
    # exported as users do, in a process of its own (tracing must not run beside napari's
    # OpenGL: see .ci/run on torch builds with triton)
    pkg = tmp_path / "model.zip"
    cmd = [sys.executable, "-m", "napari_mevae", "export", "--checkpoint", str(ckpt)]
    cmd += ["--out", str(pkg), "--targets", str(tmp_path / "crops.npy"), "--no-test"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(pkg) as zf:
        assert "CropSettings(size=32" in zf.read("README.md").decode()

    seen = {}

    class Dialog:  # what the user picks in the file dialog
        @staticmethod
        def getOpenFileName(parent, caption, directory, filters):
            seen["filters"] = filters
            return str(pkg), filters

    monkeypatch.setattr(_model, "QFileDialog", Dialog)
    assert widget.model_panel.load_checkpoint()
    assert "*.zip" in seen["filters"].split(";;")[0]
    assert not notes["error"], notes["error"]
    assert "loaded from model.zip" in widget.model_panel.status.text()
    assert s.checkpoint_path == str(pkg)

    a = widget.analyse_panel
    a.umap_chk.setChecked(False)
    assert a.encode() is not None
    wait_idle(qtbot, widget)
    assert not notes["error"], notes["error"]
    assert np.max(np.abs(s.latents - encode(model, crops))) < 1e-5
