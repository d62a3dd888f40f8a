"""The core imports without Qt or napari, the config layer without torch, and cheap modules
stay cheap."""

import subprocess
import sys

CORE = [
    "config",
    "workflow",
    "model",
    "training",
    "checkpoints",
    "speedups",
    "cells",
    "nuisances",
    "synthetic",
    "analysis",
    "evaluation",
    "folders",
    "store",
    "figures",
    "child",
    "cli",
    "runs",
    "resample",
    "outputs",
    "demo",
    "modelzoo",
    "fields",
    "screens",
    "screen_store",
    "screen_features",
]
GUI = ("napari", "qtpy", "PyQt6", "PyQt5", "PySide6", "magicgui", "vispy")


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
    for gui in GUI:
        assert gui not in mods, f"the core imported {gui}"


def test_config_and_workflow_import_without_torch():
    """The widget builds its forms from config when napari opens: no torch there."""
    mods = _loaded_after("import napari_mevae.config, napari_mevae.workflow")
    assert "torch" not in mods and "numba" not in mods
    assert not set(GUI) & mods


def test_package_cli_and_analysis_do_not_import_umap_or_sklearn_eagerly():
    mods = _loaded_after("import napari_mevae, napari_mevae.cli, napari_mevae.analysis")
    assert "umap" not in mods and "sklearn" not in mods
    assert "torch" not in _loaded_after("import napari_mevae, napari_mevae.cli")


def test_checkpoints_and_packages_load_without_bioimageio():
    """Reading a Model Zoo package needs only the core (bioimageio is for exporting)."""
    mods = _loaded_after("import napari_mevae.checkpoints, napari_mevae.modelzoo")
    assert not [m for m in mods if m.startswith("bioimageio")]
