"""The core imports without Qt or napari, and cheap modules stay cheap."""

import subprocess
import sys

CORE = [
    "model",
    "training",
    "cells",
    "transforms",
    "synthetic",
    "analysis",
    "folders",
    "store",
    "figures",
    "cli",
    "demo",
]


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


def test_core_modules_import_without_qt_or_napari():
    mods = _loaded_after("\n".join(f"import napari_mevae.{m}" for m in CORE))
    assert {f"napari_mevae.{m}" for m in CORE} <= mods
    for gui in ("napari", "qtpy", "PyQt6", "PyQt5", "PySide6", "magicgui", "vispy"):
        assert gui not in mods, f"the core imported {gui}"


def test_package_cli_and_analysis_do_not_import_umap_or_sklearn_eagerly():
    mods = _loaded_after("import napari_mevae, napari_mevae.cli, napari_mevae.analysis")
    assert "umap" not in mods and "sklearn" not in mods
    assert "torch" not in _loaded_after("import napari_mevae, napari_mevae.cli")
