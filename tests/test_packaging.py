"""napari hub readiness: the npe2 manifest validates, the package metadata is filled in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_npe2_validate_passes():
    manifest = REPO / "src" / "napari_mevae" / "napari.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "valid" in proc.stdout


def test_setup_metadata_for_the_hub():
    from setuptools.config.setupcfg import read_configuration

    cfg = read_configuration(REPO / "setup.cfg")
    meta = cfg["metadata"]
    assert meta["description"] and meta["license"] == "BSD-3-Clause"
    assert {"napari", "single-cell", "ME-VAE", "bioimage.io"} <= set(meta["keywords"])
    assert "Framework :: napari" in meta["classifiers"]
    assert "Intended Audience :: Science/Research" in meta["classifiers"]
    extras = cfg["options"]["extras_require"]
    assert any(r.startswith("bioimageio.core") for r in extras["bioimageio"])
