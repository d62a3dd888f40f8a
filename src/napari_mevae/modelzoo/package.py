"""The package format and reading it back: the constants every part shares, the exported module
(:class:`MEVAEFeatures`) and the import (:func:`load_package`), which runs no code from the
package: it reads the rdf as plain YAML, checks every file's SHA-256, checks the TorchScript
file is a TorchScript archive and reads the weights with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from ..config import CheckpointError, MEVAEConfig
from ..model import MEVAE

#: the key of this package's section in the rdf's ``config``, and a tag of every export
MARKER = "napari-mevae"
PACKAGE_FORMAT = "napari-mevae-bioimageio-package"
PACKAGE_VERSION = 1
RDF_NAMES = ("rdf.yaml", "bioimageio.yaml", "model.yaml")
TORCHSCRIPT_FILE = "mevae_torchscript.pt"
STATE_DICT_FILE = "mevae_state_dict.pt"
TEST_INPUT_FILE = "test_input.npy"
TEST_FEATURES_FILE = "test_output_features.npy"
TEST_RECON_FILE = "test_output_reconstruction.npy"
SAMPLE_INPUT_FILE = "sample_input.tif"
SAMPLE_FEATURES_FILE = "sample_output_features.tif"
SAMPLE_RECON_FILE = "sample_output_reconstruction.tif"
HISTORY_FILE = "training_history.json"
COVER_FILE = "cover.png"
DOC_FILE = "README.md"
#: the ME-VAE paper (Ternes et al., Communications Biology 5:255, 2022)
PAPER_TEXT = (
    "Ternes L et al. A multi-encoder variational autoencoder controls multiple transformational "
    "features in single-cell image analysis. Communications Biology 5, 255 (2022)"
)
PAPER_DOI = "10.1038/s42003-022-03218-x"
DEFAULT_LICENSE = "CC-BY-4.0"
#: cells in the test tensors, and at most this many in the cover
N_TEST = 8
N_COVER = 16
#: the feature encodings of an import equal the checkpoint's to this (float32)
TOLERANCE = 1e-5


# -- the exported module ---------------------------------------------------------------------
class MEVAEFeatures(MEVAE):
    """An :class:`~napari_mevae.model.MEVAE` whose forward is the analysis view, for the Model Zoo.

    ``forward(x)`` with canonical crops ``x`` ``(b, c, y, x)`` returns ``(features, recon)``:
    ``features`` ``(b, latent_dim)`` as :meth:`MEVAE.encode` gives when every encoder sees the
    same cell (product of the encoder means, unused dimensions 0, the rest kept to the
    directions in use) and ``recon`` ``(b, c, y, x)``
    in [0, 1], the decoded features.  Built from the model config's fields as keyword
    arguments (the package's ``architecture.kwargs``); its state dict is the MEVAE's.
    """

    def __init__(self, **config: Any) -> None:
        super().__init__(MEVAEConfig.from_dict(config))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        means = torch.stack([enc(x)[0] for enc in self.encoders])
        z = torch.prod(means, dim=0)
        z = self.used_part(z)  # traced: the branches freeze to this model's measurements
        return z, torch.sigmoid(self.decoder(z))


def features_module(ckpt: Any) -> MEVAEFeatures:
    """The exported module with the weights of ``ckpt`` (a checkpoints.Checkpoint)."""
    module = MEVAEFeatures(**ckpt.config.to_dict())
    try:
        module.load_state_dict(ckpt.model_state)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint weights do not fit its own config: {err}") from err
    return module.eval()


# -- import ----------------------------------------------------------------------------------
def _rdf_name(names: Sequence[str]) -> str | None:
    top = [n for n in names if "/" not in n]
    for wanted in RDF_NAMES:
        for n in sorted(top):
            if n == wanted or n.endswith("." + wanted):
                return n
    return None


def is_package(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a zip with a bioimageio rdf at its top (a ``.pt`` checkpoint is a zip
    too, but without one)."""
    p = Path(path)
    if not p.is_file() or not zipfile.is_zipfile(p):
        return False
    try:
        with zipfile.ZipFile(p) as zf:
            return _rdf_name(zf.namelist()) is not None
    except (zipfile.BadZipFile, OSError):
        return False


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_refs(node: Any, where: str = "") -> list[tuple[str, str | None, str]]:
    """``(relative path, sha256 or None, field)`` of every file an rdf names: dicts with a
    ``source``, plus ``documentation``, ``covers`` and a licence file given as a path."""
    refs: list[tuple[str, str | None, str]] = []
    if isinstance(node, dict):
        src = node.get("source")
        if isinstance(src, str):
            refs.append((src, node.get("sha256"), where))
        for key, value in node.items():
            if key == "config":
                continue  # tool-specific data, not file references
            if key in ("documentation", "covers") and isinstance(value, str):
                refs.append((value, None, key))
            elif key == "covers" and isinstance(value, list):
                refs.extend((v, None, key) for v in value if isinstance(v, str))
            else:
                refs.extend(_file_refs(value, f"{where}.{key}" if where else str(key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            refs.extend(_file_refs(value, f"{where}[{i}]"))
    return refs


def _is_url(src: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", src) is not None


def _is_torchscript(data: bytes) -> bool:
    """A TorchScript archive: a zip with the compiled ``code/`` and ``constants.pkl``.  A
    ``torch.save`` file (a pickle, in a zip or not) has neither."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            parts = [PurePosixPath(n).parts for n in zf.namelist()]
    except zipfile.BadZipFile:
        return False
    has_code = any(len(p) > 2 and p[1] == "code" for p in parts)
    has_constants = any(len(p) == 2 and p[1] == "constants.pkl" for p in parts)
    return has_code and has_constants


def read_package(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read an ME-VAE package written by :func:`export_package` as a checkpoint.

    Raises :class:`CheckpointError` with one line when the zip is not a package, not an ME-VAE
    export of napari-mevae, lacks a file, a file does not match its SHA-256, the TorchScript
    weights are not TorchScript or the state dict holds anything but tensors."""
    import yaml

    p = Path(path)
    name = p.name
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"cannot read {name}: not a zip file ({err})") from err
    with zf:
        members = set(zf.namelist())
        rdf_name = _rdf_name(sorted(members))
        if rdf_name is None:
            raise CheckpointError(
                f"{name} is not a BioImage Model Zoo package (no rdf.yaml or bioimageio.yaml)"
            )
        try:
            rdf = yaml.safe_load(zf.read(rdf_name))
        except yaml.YAMLError as err:
            detail = " ".join(str(err).split())
            raise CheckpointError(f"{name}: {rdf_name} is not valid YAML: {detail}") from err
        if not isinstance(rdf, dict):
            raise CheckpointError(f"{name}: {rdf_name} is not a mapping")
        section = rdf.get("config", {}) if isinstance(rdf.get("config"), dict) else {}
        section = section.get(MARKER)
        if (
            rdf.get("type") != "model"
            or not isinstance(section, dict)
            or section.get("format") != PACKAGE_FORMAT
        ):
            what = f"a {rdf.get('type')!s} package" if rdf.get("type") != "model" else "a model"
            raise CheckpointError(
                f"{name} is {what} of the BioImage Model Zoo but not an ME-VAE export of "
                f"napari-mevae (its rdf has no config.{MARKER} section): only packages written "
                "by `mevae export` load as ME-VAE models"
            )
        version = section.get("version", 0)
        if not isinstance(version, int) or version > PACKAGE_VERSION:
            raise CheckpointError(
                f"{name} was written by a newer napari-mevae (package version {version})"
            )

        # every file the rdf names: present, and matching its hash
        data: dict[str, bytes] = {}
        for src, sha, where in _file_refs(rdf):
            if _is_url(src):
                raise CheckpointError(
                    f"{name}: {where} points outside the package ({src}); an ME-VAE export "
                    "holds every file"
                )
            member = src[2:] if src.startswith("./") else src
            if member not in members:
                raise CheckpointError(f"{name} is incomplete: {member} ({where}) is missing")
            blob = zf.read(member)
            if sha is not None and _sha256(blob) != str(sha).lower():
                raise CheckpointError(
                    f"{name} was altered: {member} does not match its SHA-256 in {rdf_name} "
                    "(corrupt or tampered file)"
                )
            data[member] = blob

        weights = rdf.get("weights") if isinstance(rdf.get("weights"), dict) else {}
        entries = {}
        for fmt in ("torchscript", "pytorch_state_dict"):
            entry = weights.get(fmt)
            src = entry.get("source") if isinstance(entry, dict) else None
            if not isinstance(src, str) or "sha256" not in entry:
                raise CheckpointError(f"{name}: no {fmt} weights (with a SHA-256) in {rdf_name}")
            entries[fmt] = src[2:] if src.startswith("./") else src
        if not _is_torchscript(data[entries["torchscript"]]):
            raise CheckpointError(
                f"{name}: {entries['torchscript']} is not TorchScript (refused: a package may "
                "hold no pickles)"
            )
        try:
            state = torch.load(
                io.BytesIO(data[entries["pytorch_state_dict"]]),
                map_location=map_location,
                weights_only=True,
            )
        except Exception as err:  # UnpicklingError, RuntimeError (zip), EOFError...
            detail = " ".join(str(err).split())[:200]
            raise CheckpointError(
                f"{name}: {entries['pytorch_state_dict']} holds objects other than weights or "
                f"is corrupt (refused for safety): {detail}"
            ) from err
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise CheckpointError(
                f"{name}: {entries['pytorch_state_dict']} is not a state dict of tensors"
            )
        try:
            config = MEVAEConfig.from_dict(section["model"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{name} has an invalid ME-VAE config: {err}") from err
        arch = weights["pytorch_state_dict"].get("architecture") or {}
        if arch.get("kwargs") != section["model"]:
            raise CheckpointError(
                f"{name}: the state dict's architecture kwargs differ from config.{MARKER}.model"
            )
        history: list[dict[str, float]] = []
        if HISTORY_FILE in data:
            try:
                history = [dict(h) for h in json.loads(data[HISTORY_FILE])]
            except (ValueError, TypeError) as err:
                raise CheckpointError(f"{name}: {HISTORY_FILE} is not valid: {err}") from err
        extra = dict(section.get("extra") or {})
        if isinstance(section.get("cells"), dict):
            extra["cells"] = dict(section["cells"])
        extra["package"] = {"name": rdf.get("name"), "file": name}
        return dict(  # the fields of a checkpoints.Checkpoint (this module does not import it)
            config=config,
            model_state=state,
            optimizer_state=None,
            epoch=int(section.get("epoch", 0)),
            history=history,
            extra=extra,
            path=p,
        )


def _readable(path: str) -> None:
    """mkstemp makes 0600 files; give the package the usual umask-based permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
