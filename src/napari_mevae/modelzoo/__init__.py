"""BioImage Model Zoo packages: a trained ME-VAE out (``mevae export``) and back in
(``--checkpoint model.zip``).

A package is the zip of the ``bioimageio.spec`` model format (written as format 0.5.4):
``rdf.yaml`` with authors, citation, licence, tensor descriptions and SHA-256 hashes, and beside
it

- ``mevae_torchscript.pt``: the model as TorchScript, for any tool of the ecosystem;
- ``mevae_state_dict.pt``: the same weights as a plain state dict (tensors only) of
  :class:`MEVAEFeatures`, the architecture ``napari_mevae.modelzoo:MEVAEFeatures`` rebuilds;
- ``test_input.npy`` (real crops of the training data) and the two test outputs,
  ``test_output_features.npy`` and ``test_output_reconstruction.npy``, and one cell of each as
  ``sample_*.tif`` for display;
- ``README.md`` (how to crop cells for the model, the training configuration), ``cover.png``
  (cells and their reconstructions) and ``training_history.json``.

The model maps a batch of canonical cell crops ``(b, c, y, x)`` to the per-cell features that
``mevae encode`` writes (every encoder sees the same cell, product of the encoder means, unused
dimensions 0) and, as a second output, the reconstruction of each cell.

Importing reads the rdf as plain YAML, requires this module's marker (``config.napari-mevae``),
checks every file the rdf names against its SHA-256, checks that the TorchScript file is a
TorchScript archive and reads the state dict with ``torch.load(weights_only=True)``: nothing
in a package can run code.  Import needs neither bioimageio package; export (build, validate,
test) needs the ``[bioimageio]`` extra, imported only here and only when exporting.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .export import ExportResult, export_package, run_crops, run_package_test, validate_package
from .package import MARKER, PACKAGE_FORMAT, MEVAEFeatures, is_package, read_package

if TYPE_CHECKING:
    from ..checkpoints import Checkpoint


def load_package(path: str | os.PathLike, map_location: Any = "cpu") -> Checkpoint:
    """A package written by ``mevae export`` as a checkpoint (see :func:`read_package`)."""
    from ..checkpoints import Checkpoint

    return Checkpoint(**read_package(path, map_location))


__all__ = [
    "MARKER",
    "PACKAGE_FORMAT",
    "ExportResult",
    "MEVAEFeatures",
    "export_package",
    "is_package",
    "load_package",
    "read_package",
    "run_package_test",
    "run_crops",
    "validate_package",
]
