"""napari-mevae: Multi-Encoder VAE features for single-cell images (library, CLI, napari plugin).

The public API (the README's "Python API") is importable from here.  Importing the package is
cheap: each name is imported from its module on first use (torch, umap and Qt only by the
modules that need them), so napari starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_API = {
    # configuration (no torch)
    "MEVAEConfig": "config",
    "TrainOptions": "config",
    "CropSettings": "config",
    "preset": "config",
    "kl_weight": "config",
    "InputError": "config",
    "CheckpointError": "config",
    "TrainingDiverged": "config",
    # the pipeline every front end uses
    "build_config": "workflow",
    "crop_cells": "workflow",
    "training_dataset": "workflow",
    "run_training": "workflow",
    "encode_cells": "workflow",
    "cluster_cells": "workflow",
    "dims_in_use": "workflow",
    # model, training, checkpoints
    "MEVAE": "model",
    "Trainer": "training",
    "load_checkpoint": "checkpoints",
    "save_checkpoint": "checkpoints",
    # analysis and evaluation
    "encode": "analysis",
    "reconstruct": "analysis",
    "run_umap": "analysis",
    "cluster": "analysis",
    "features_table": "analysis",
    "export_features_csv": "analysis",
    "invariance_report": "evaluation",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'napari_mevae' has no attribute {name!r}")
    return getattr(importlib.import_module(f"napari_mevae.{module}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
