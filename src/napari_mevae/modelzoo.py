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

import contextlib
import hashlib
import io
import json
import os
import re
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .config import ACTIVE_VARIANCE, CheckpointError, InputError, MEVAEConfig, model_kind
from .model import MEVAE

if TYPE_CHECKING:
    from .checkpoints import Checkpoint

__all__ = [
    "MARKER",
    "PACKAGE_FORMAT",
    "ExportResult",
    "MEVAEFeatures",
    "export_package",
    "is_package",
    "load_package",
    "run_package_test",
    "run_crops",
    "validate_package",
]

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
    same cell (product of the encoder means, unused dimensions 0) and ``recon`` ``(b, c, y, x)``
    in [0, 1], the decoded features.  Built from the model config's fields as keyword
    arguments (the package's ``architecture.kwargs``); its state dict is the MEVAE's.
    """

    def __init__(self, **config: Any) -> None:
        super().__init__(MEVAEConfig.from_dict(config))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        means = torch.stack([enc(x)[0] for enc in self.encoders])
        z = torch.prod(means, dim=0)
        # MEVAE.active_mask without a Python branch (it is traced): all kept while none is used
        used = self.latent_variance >= ACTIVE_VARIANCE
        keep = used | ~used.any()
        z = torch.where(keep, z, torch.zeros((), dtype=z.dtype))
        return z, torch.sigmoid(self.decoder(z))


def features_module(ckpt: Checkpoint) -> MEVAEFeatures:
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


def load_package(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read an ME-VAE package written by :func:`export_package` as a checkpoint.

    Raises :class:`CheckpointError` with one line when the zip is not a package, not an ME-VAE
    export of napari-mevae, lacks a file, a file does not match its SHA-256, the TorchScript
    weights are not TorchScript or the state dict holds anything but tensors."""
    import yaml

    from .checkpoints import Checkpoint

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
        return Checkpoint(
            config=config,
            model_state=state,
            optimizer_state=None,
            epoch=int(section.get("epoch", 0)),
            history=history,
            extra=extra,
            path=p,
        )


# -- export ----------------------------------------------------------------------------------
@dataclass
class ExportResult:
    """What :func:`export_package` wrote and found."""

    path: Path
    validation: str  # bioimageio.spec's status: "valid-format"
    test: str | None  # bioimageio.core's status ("passed"), None when not run
    max_abs_diff: float  # features of the package's weights vs the checkpoint's encode()
    crops_from: str
    warnings: list[str] = field(default_factory=list)


def run_crops(
    ckpt: Checkpoint, targets: str | os.PathLike | np.ndarray | None = None, n: int = N_COVER
) -> tuple[np.ndarray, str]:
    """Up to ``n`` real canonical crops ``(n, C, S, S)`` of the training data, and where from.

    ``targets``: the crops themselves (an array, e.g. ``CellCrops.crops`` in napari), a folder
    of canonical crops or a ``.npy`` crops file (as ``mevae encode --targets``).  Without it,
    the training run the checkpoint belongs to (``RUN/models/checkpoint.pt``): its
    ``Truth_images.png``, the grid of the first training targets as the run saved them (8-bit,
    so for 1 to 3 channels)."""
    cfg = ckpt.config
    size, channels = cfg.image_size, cfg.channels
    if isinstance(targets, np.ndarray):
        if targets.ndim != 4 or targets.shape[1:] != (channels, size, size) or not len(targets):
            raise InputError(
                f"crops of shape {targets.shape}; the model wants (N, {channels}, {size}, {size})"
            )
        take = min(n, len(targets))
        return np.asarray(targets[:take], dtype=np.float32), f"{take} crops given to the export"
    if targets is not None:
        from .workflow import open_targets

        crops, _, _ = open_targets(targets, size, channels, lazy=True)
        if len(crops) == 0:
            raise InputError(f"no crops in {targets}")
        take = min(n, len(crops))
        batch = np.stack([np.asarray(crops[i], dtype=np.float32) for i in range(take)])
        return batch, f"the first {take} crops of {Path(targets).name}"
    path = ckpt.path
    run = None
    if path is not None and path.parent.name == "models":
        run = path.parent.parent
    grid = run / "Truth_images.png" if run is not None else None
    hint = (
        "give --targets with canonical crops of the training data (a folder of crop images, "
        "e.g. the OutputImages/ folder, or a crops .npy) for the package's test tensors and cover"
    )
    if grid is None or not grid.is_file():
        raise InputError(f"{path} is not in a training run with Truth_images.png: {hint}")
    if channels > 3:
        raise InputError(
            f"Truth_images.png shows only 3 of the model's {channels} channels: {hint}"
        )
    tiles = _grid_tiles(grid, size, channels)
    if tiles is None:
        raise InputError(f"{grid} is not a grid of {size} px crops: {hint}")
    names = run / "filenames.csv"
    if names.is_file():  # the grid's unused tiles are blank: as many cells as the run had
        tiles = tiles[: len(names.read_text().splitlines())]
    take = min(n, len(tiles))
    return tiles[:take], f"the first {take} training targets of the run (Truth_images.png, 8-bit)"


def _grid_tiles(path: Path, size: int, channels: int) -> np.ndarray | None:
    """Tiles ``(N, C, S, S)`` of a :func:`figures.montage` grid (1 px padding), values / 255."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    h, w = arr.shape[:2]
    step = size + 1
    if (h - 1) % step or (w - 1) % step or h < step or w < step:
        return None
    rows, cols = (h - 1) // step, (w - 1) // step
    tiles = []
    for r in range(rows):
        for c in range(cols):
            y, x = 1 + r * step, 1 + c * step
            tile = arr[y : y + size, x : x + size]
            tile = tile[None] if tile.ndim == 2 else np.moveaxis(tile, -1, 0)[:channels]
            tiles.append(tile.astype(np.float32) / 255.0)
    return np.stack(tiles)


def _cover(crops: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """Each cell beside its reconstruction, in a square grid of pairs: a 2:1 picture."""
    from .figures import montage, to_display

    side = int(np.sqrt(min(len(crops), N_COVER)))
    n = side * side
    a, b = to_display(crops[:n]), to_display(recon[:n])
    gap = np.ones_like(a[:, :, :1])
    pairs = np.concatenate([a, gap, b], axis=2)
    grid = montage(pairs, ncols=side, pad=2)
    h, w = grid.shape[:2]  # white margins to exactly 2:1, the Model Zoo's cover shape
    height = max(h, (w + 1) // 2)
    dh, dw = height - h, 2 * height - w
    margins = [(dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2)] + [(0, 0)] * (grid.ndim - 2)
    grid = np.pad(grid, margins, constant_values=1.0)
    scale = max(1, 640 // grid.shape[1])
    return np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)


def _as_yaml_value(value: Any) -> Any:
    """JSON-safe plain data (what a YAML config may hold); anything else becomes its str."""
    return json.loads(json.dumps(value, default=str))


def _dims_in_use(model: MEVAE) -> str:
    cfg = model.config
    if not model.activity_measured:
        return f"{cfg.latent_dim} dimensions, use not measured: all kept"
    if model.n_active == 0:
        return f"{cfg.latent_dim} dimensions, none in use yet: all kept"
    return f"{cfg.latent_dim} dimensions, {model.n_active} in use, the others 0"


def _documentation(
    ckpt: Checkpoint, model: MEVAE, name: str, crops_from: str, n_test: int, tested: bool
) -> str:
    """The package's README.md: what the model computes, how to crop cells for it, how it was
    trained, how to validate it."""
    import bioimageio.core
    import bioimageio.spec

    cfg = ckpt.config
    s, c, k = cfg.image_size, cfg.channels, cfg.n_encoders
    nuis = ", ".join(cfg.nuisances) if cfg.nuisances else "those of its training pairs"
    cells = ckpt.extra.get("cells")
    rows = "\n".join(f"| `{key}` | `{value}` |" for key, value in cfg.to_dict().items())
    lines = [
        f"# {name}",
        "",
        f"A {model_kind(cfg)} (multi-encoder variational autoencoder, Ternes et al., "
        "Communications Biology 5:255, 2022) trained with napari-mevae. It maps canonical "
        "single-cell crops to per-cell features from which the nuisances it was trained to "
        f"remove ({nuis}) are gone, and to the corrected cell.",
        "",
        "## Inputs and outputs",
        "",
        f"- input `cells`: `(b, c, y, x)` = `(batch, {c}, {s}, {s})`, float32 in [0, 1]: one "
        "canonical crop per cell (see below).",
        f"- output `features`: `(batch, {cfg.latent_dim})`, the per-cell feature vector that "
        f"`mevae encode` writes: each of the model's {k} encoder(s) sees the same crop, the "
        "features are the product of the encoder means, and latent dimensions the model does "
        f"not use are 0 ({_dims_in_use(model)}).",
        f"- output `reconstruction`: `(batch, {c}, {s}, {s})` in [0, 1], the cell the decoder "
        "makes from the features: the corrected cell.",
        "",
        "## How to crop cells for this model",
        "",
        f"Every input is a {s} x {s} px crop of one segmented cell ({c} channel(s)) in "
        "*canonical pose*: the cell's major axis (image moments) turned horizontal, then "
        "mirrored so that the intensity-weighted centre of mass lies right of and below the "
        "crop centre; background and other cells 0 (masked); intensities in [0, 1] (float32). "
        "Crops made another way (another size, pose or intensity scaling) give features the "
        "model was not trained for.",
        "",
    ]
    if isinstance(cells, dict):
        settings = ", ".join(f"{key}={value!r}" for key, value in cells.items())
        lines += [
            "The training crops were made by napari-mevae with these settings (also in "
            "`config.napari-mevae.cells` of rdf.yaml):",
            "",
            "```python",
            "from napari_mevae import CropSettings, crop_cells",
            "",
            f"settings = CropSettings({settings})",
            "cells = crop_cells(image, labels, settings)  # cells.crops: (N, C, S, S) in [0, 1]",
            "```",
            "",
            "`normalize='percentile'` scales each channel by its 1st and 99.8th percentiles over "
            "the whole image, then clips to [0, 1]; `'max'` divides by each cell's maximum; "
            "`scale='fixed'` keeps the pixel size (larger cells are skipped), `'fit'` zooms each "
            "cell to fill 80 % of the crop.",
            "",
        ]
    else:
        lines += [
            "The crop settings of the training data are not recorded (the model was trained "
            "from folders of crops). napari-mevae makes canonical crops from an image and its "
            "label image with",
            "",
            "```bash",
            f"mevae pairs --image IMAGE.tif --labels LABELS.tif --out crops --size {s}",
            "```",
            "",
            "(`crops/OutputImages` holds the canonical crops). napari-mevae reads crop files "
            f"of another size resized to {s} px, uint8 files divided by 255 and other files by "
            "their maximum.",
            "",
        ]
    lines += [
        "## Use it",
        "",
        "With napari-mevae (nothing in the package runs as code: the weights are read as tensors):",
        "",
        "```bash",
        "mevae encode --checkpoint THIS_PACKAGE.zip --targets crops/ --out features.csv",
        "```",
        "",
        "or in napari: ME-VAE dock, Model tab, Load, pick the .zip. Other BioImage Model Zoo "
        "tools run `mevae_torchscript.pt` (TorchScript).",
        "",
        "## Training",
        "",
        f"- epochs: {ckpt.epoch}",
        f"- loss: reconstruction ({cfg.recon_loss}, mean over pixels x {s}^2) + beta x KL "
        f"(beta {cfg.beta:g}), KL averaged over the encoders",
    ]
    if ckpt.history:
        last = ckpt.history[-1]
        vals = ", ".join(f"{key} {float(v):.4g}" for key, v in last.items() if _number(v))
        lines.append(f"- last epoch: {vals} (all epochs: training_history.json)")
    lines += [
        "",
        "| model config | value |",
        "|---|---|",
        rows,
        "",
        "## Validation",
        "",
        f"The test input holds {crops_from} ({n_test} cells in `test_input.npy`); the cover "
        "shows cells beside their reconstructions. They are crops of the training data: share "
        "this package only as that data's licence allows.",
        "",
        f"At export the package was validated with bioimageio.spec {bioimageio.spec.__version__}"
        + (
            f" and tested with bioimageio.core {bioimageio.core.__version__} (both weight "
            "formats reproduce the test outputs)"
            if tested
            else ""
        )
        + "; its features equal those of the checkpoint it came from (`mevae encode`) to "
        f"{TOLERANCE:g}. Check it again with `bioimageio test THIS_PACKAGE.zip`.",
        "",
        "To validate the model on unseen cells, measure how much of the nuisances is left in "
        "its features and how much of the cell content they keep:",
        "",
        "```bash",
        "mevae evaluate --checkpoint THIS_PACKAGE.zip --targets heldout_crops/ --out report.json",
        "```",
        "",
        "(`rotation_leakage`, `polarity_leakage`: 0 = no nuisance left; `content_kept`: R^2 of "
        "pose-invariant cell descriptors from the features; see napari-mevae's README).",
        "",
        "## Citation",
        "",
        PAPER_TEXT + f", doi:{PAPER_DOI}.",
        "",
    ]
    return "\n".join(lines)


def _check_metadata(name: str | None, license: str) -> None:
    """The rules of the Model Zoo for a name and a licence, before any work is done."""
    from bioimageio.spec.model.v0_5 import LicenseId

    if name is not None and not re.fullmatch(r"[A-Za-z0-9_+\- ()]{5,128}", name):
        raise InputError(
            f"--name {name!r}: 5 to 128 letters, digits, spaces, _ + - ( ) (Model Zoo rule)"
        )
    try:
        LicenseId(license)
    except ValueError as err:
        raise InputError(
            f"--license {license!r} is not an SPDX licence id (e.g. CC-BY-4.0, CC0-1.0, MIT, "
            "BSD-3-Clause; https://spdx.org/licenses/)"
        ) from err


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _authors(authors: Sequence[str] | str | None) -> list[str]:
    if authors is None:
        return []
    if isinstance(authors, str):
        sep = ";" if ";" in authors else ","
        authors = authors.split(sep)
    return [a.strip() for a in authors if a and a.strip()]


def _bioimageio():
    try:
        import bioimageio.core  # noqa: F401
        import bioimageio.spec  # noqa: F401
    except ImportError as err:
        raise InputError(
            "exporting a BioImage Model Zoo package needs bioimageio.spec and bioimageio.core: "
            "pip install 'napari-mevae[bioimageio]'"
        ) from err


def _first_line(text: str) -> str:
    return " ".join(str(text).split())


def _summary_problems(summary: Any, limit: int = 3) -> str:
    """The first errors of a bioimageio ValidationSummary, on one line."""
    msgs = []
    for detail in summary.details:
        for err in detail.errors:
            loc = ".".join(str(x) for x in err.loc)
            msgs.append(f"{loc}: {_first_line(err.msg)}" if loc else _first_line(err.msg))
    text = "; ".join(m if len(m) <= 300 else m[:300] + "..." for m in msgs[:limit])
    return text + (f" (+{len(msgs) - limit} more)" if len(msgs) > limit else "")


def _summary_warnings(summary: Any) -> list[str]:
    out = []
    for detail in summary.details:
        for w in detail.warnings:
            loc = ".".join(str(x) for x in w.loc)
            out.append(f"{loc}: {_first_line(w.msg)}" if loc else _first_line(w.msg))
    return out


def validate_package(path: str | os.PathLike) -> Any:
    """``bioimageio.spec``'s validation of a package: its ValidationSummary."""
    from bioimageio.spec import load_description

    descr = load_description(Path(path), perform_io_checks=True)
    return descr.validation_summary


def run_package_test(path: str | os.PathLike) -> Any:
    """``bioimageio.core``'s test (what ``bioimageio test`` runs): every weight format
    reproduces the test outputs from the test input; its ValidationSummary."""
    from bioimageio.core import test_model

    return test_model(Path(path), devices=["cpu"])


def export_package(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    targets: str | os.PathLike | np.ndarray | None = None,
    name: str | None = None,
    authors: Sequence[str] | str | None = None,
    description: str | None = None,
    license: str = DEFAULT_LICENSE,
    tags: Sequence[str] = (),
    test: bool = True,
) -> ExportResult:
    """Write the checkpoint ``checkpoint`` (a ``.pt``, a training run or a package) as a
    BioImage Model Zoo package ``out``, validate it with ``bioimageio.spec`` and, unless
    ``test`` is False, test it with ``bioimageio.core``.  Written atomically: ``out`` appears
    only when the package is valid (and passed).  ``targets``: real crops of the training data
    for the test tensors and the cover (see :func:`run_crops`)."""
    _bioimageio()
    from . import __version__
    from .analysis import encode
    from .checkpoints import load_checkpoint

    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise InputError(f"--out must name a .zip file, got {out}")
    _check_metadata(name, license)
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.config
    crops, crops_from = run_crops(ckpt, targets)
    model = ckpt.build_model("cpu")
    module = features_module(ckpt)
    n_test = min(N_TEST, len(crops))
    x = torch.from_numpy(np.ascontiguousarray(crops, dtype=np.float32))
    with torch.no_grad():
        feats, recon = (t.numpy() for t in module(x))
    reference = encode(model, crops)
    diff = float(np.max(np.abs(feats - reference))) if len(crops) else 0.0
    if not diff < TOLERANCE:  # the package must give what `mevae encode` gives
        raise CheckpointError(f"the exported module differs from the model's encode by {diff:g}")

    name = name or f"ME-VAE single-cell features {cfg.image_size} px"
    author_names = _authors(authors)
    kind = model_kind(cfg)
    nuis = ", ".join(cfg.nuisances) if cfg.nuisances else "the nuisances of its training pairs"
    description = description or (
        f"{kind} with {cfg.n_encoders} encoder(s) trained with napari-mevae on "
        f"{cfg.image_size} px, {cfg.channels}-channel canonical cell crops: per-cell features "
        f"({_dims_in_use(model)}) without {nuis}, and the corrected reconstruction."
    )
    section = {
        "format": PACKAGE_FORMAT,
        "version": PACKAGE_VERSION,
        "napari_mevae_version": __version__,
        "model": cfg.to_dict(),
        "model_kind": kind,
        "epoch": int(ckpt.epoch),
        "active_dimensions": [int(i) for i in np.flatnonzero(model.active_mask.numpy())],
        "input": {
            "size": cfg.image_size,
            "channels": cfg.channels,
            "dtype": "float32",
            "value_range": [0.0, 1.0],
            "canonical_pose": True,
            "analysis_view": "every encoder sees the same crop",
        },
        "test_crops_from": crops_from,
        "extra": _as_yaml_value(
            {k: v for k, v in ckpt.extra.items() if k not in ("cells", "package")}
        ),
    }
    if isinstance(ckpt.extra.get("cells"), dict):
        section["cells"] = _as_yaml_value(ckpt.extra["cells"])

    with tempfile.TemporaryDirectory(prefix="mevae-export-") as tmp:
        d = Path(tmp)
        np.save(d / TEST_INPUT_FILE, crops[:n_test].astype(np.float32))
        np.save(d / TEST_FEATURES_FILE, feats[:n_test].astype(np.float32))
        np.save(d / TEST_RECON_FILE, recon[:n_test].astype(np.float32))
        import tifffile

        tifffile.imwrite(d / SAMPLE_INPUT_FILE, crops[0].astype(np.float32))
        tifffile.imwrite(d / SAMPLE_FEATURES_FILE, feats[:1].astype(np.float32))
        tifffile.imwrite(d / SAMPLE_RECON_FILE, recon[0].astype(np.float32))
        torch.save(module.state_dict(), d / STATE_DICT_FILE)
        with torch.no_grad(), _jit_quiet():
            traced = torch.jit.trace(module, x[:n_test], check_trace=False)
        traced.save(str(d / TORCHSCRIPT_FILE))
        _check_traced(d / TORCHSCRIPT_FILE, x, feats)
        (d / HISTORY_FILE).write_text(json.dumps(_as_yaml_value(ckpt.history), indent=1) + "\n")
        from .figures import save_png

        save_png(d / COVER_FILE, _cover(crops, recon))
        (d / DOC_FILE).write_text(_documentation(ckpt, model, name, crops_from, n_test, test))

        rdf = _rdf(
            ckpt,
            model,
            name=name,
            description=description,
            authors=author_names,
            license=license,
            tags=tags,
            section=section,
        )
        files = [
            DOC_FILE,
            COVER_FILE,
            HISTORY_FILE,
            TEST_INPUT_FILE,
            TEST_FEATURES_FILE,
            TEST_RECON_FILE,
            SAMPLE_INPUT_FILE,
            SAMPLE_FEATURES_FILE,
            SAMPLE_RECON_FILE,
            STATE_DICT_FILE,
            TORCHSCRIPT_FILE,
        ]
        hashes = {f: _sha256((d / f).read_bytes()) for f in files}
        _fill_hashes(rdf, hashes)

        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_zip = tempfile.mkstemp(prefix=out.name + ".", suffix=".zip", dir=out.parent)
        os.close(fd)
        try:
            with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_DEFLATED) as zf:
                zf.writestr(RDF_NAMES[0], _yaml_dump(rdf))
                for f in files:
                    zf.write(d / f, f)
            summary = validate_package(tmp_zip)
            if summary.status not in ("valid-format", "passed"):
                raise InputError(
                    f"bioimageio.spec refuses the package: {_summary_problems(summary)}"
                )
            warnings = _summary_warnings(summary)
            tested = None
            if test:
                result = run_package_test(tmp_zip)
                tested = result.status
                if result.status != "passed":
                    raise CheckpointError(
                        f"bioimageio.core's test failed: {_summary_problems(result)}"
                    )
            # the package loads back as a checkpoint that encodes as the original
            back = load_package(tmp_zip).build_model("cpu")
            back_diff = float(np.max(np.abs(encode(back, crops) - reference)))
            if not back_diff < TOLERANCE:
                raise CheckpointError(f"the package loads back {back_diff:g} off the checkpoint")
            _readable(tmp_zip)
            os.replace(tmp_zip, out)
        finally:
            Path(tmp_zip).unlink(missing_ok=True)
    return ExportResult(out, summary.status, tested, diff, crops_from, warnings)


#: the rdf format written: 0.5.4, the version the Model Zoo and its tools (deepImageJ, ilastik,
#: bioimageio.core >= 0.7) read; newer bioimageio.spec releases validate it as well
FORMAT_VERSION = "0.5.4"


def _rdf(
    ckpt: Checkpoint,
    model: MEVAE,
    *,
    name: str,
    description: str,
    authors: Sequence[str],
    license: str,
    tags: Sequence[str],
    section: dict[str, Any],
) -> dict[str, Any]:
    """The package's rdf.yaml as plain data (file hashes filled in by :func:`_fill_hashes`)."""
    import datetime

    cfg = ckpt.config
    s = cfg.image_size
    chan = [f"c{i}" for i in range(cfg.channels)]
    torch_version = torch.__version__.split("+")[0]
    kind = model_kind(cfg)

    def image_axes() -> list[dict[str, Any]]:
        return [
            {"type": "batch"},
            {"type": "channel", "channel_names": chan},
            {"type": "space", "id": "y", "size": s},
            {"type": "space", "id": "x", "size": s},
        ]

    all_tags = [
        MARKER,
        "me-vae",
        "variational-autoencoder",
        "feature-extraction",
        "single-cell",
        "cells",
        "2d",
        "pytorch",
        "image-reconstruction",
        *tags,
    ]
    return {
        "type": "model",
        "format_version": FORMAT_VERSION,
        "name": name,
        "description": description,
        "authors": [{"name": a} for a in authors],
        "cite": [{"text": PAPER_TEXT, "doi": PAPER_DOI}],
        "license": license,
        "documentation": DOC_FILE,
        "covers": [COVER_FILE],
        "attachments": [{"source": HISTORY_FILE}],
        "tags": list(dict.fromkeys(all_tags)),
        "timestamp": datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat(),
        "inputs": [
            {
                "id": "cells",
                "description": "canonical single-cell crops in [0, 1]",
                "axes": image_axes(),
                "test_tensor": {"source": TEST_INPUT_FILE},
                "sample_tensor": {"source": SAMPLE_INPUT_FILE},
                "data": {"type": "float32", "range": [0.0, 1.0]},
            }
        ],
        "outputs": [
            {
                "id": "features",
                "description": "per-cell ME-VAE features (unused dimensions 0)",
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": [f"z{i}" for i in range(cfg.latent_dim)]},
                ],
                "test_tensor": {"source": TEST_FEATURES_FILE},
                "sample_tensor": {"source": SAMPLE_FEATURES_FILE},
                "data": {"type": "float32"},
            },
            {
                "id": "reconstruction",
                "description": "the corrected cell decoded from the features",
                "axes": image_axes(),
                "test_tensor": {"source": TEST_RECON_FILE},
                "sample_tensor": {"source": SAMPLE_RECON_FILE},
                "data": {"type": "float32", "range": [0.0, 1.0]},
            },
        ],
        "weights": {
            "pytorch_state_dict": {
                "source": STATE_DICT_FILE,
                "architecture": {
                    "callable": "MEVAEFeatures",
                    "import_from": "napari_mevae.modelzoo",
                    "kwargs": cfg.to_dict(),
                },
                "pytorch_version": torch_version,
            },
            "torchscript": {
                "source": TORCHSCRIPT_FILE,
                "pytorch_version": torch_version,
                "parent": "pytorch_state_dict",
            },
        },
        "config": {
            "bioimageio": {
                "architecture_type": kind,
                "architecture_description": (
                    f"{cfg.n_encoders} convolutional encoder(s) ({cfg.nlayers} stride-2 "
                    f"convolutions from {cfg.nfilters} filters, dense {cfg.inter_dim}), latent "
                    "means fused by element-wise product, one transposed-convolution decoder"
                ),
                "task": "feature extraction (representation learning)",
                "target_structure": ["cells"],
                "model_parameter_count": sum(p.numel() for p in model.parameters()),
                "training": {
                    "training_epochs": float(ckpt.epoch),
                    "loss_function": f"{cfg.recon_loss} reconstruction + beta * KL",
                    "loss_function_kwargs": {"beta": cfg.beta},
                },
            },
            MARKER: section,
        },
    }


def _fill_hashes(node: Any, hashes: dict[str, str]) -> None:
    """Put each file's SHA-256 beside its ``source`` in the rdf."""
    if isinstance(node, dict):
        src = node.get("source")
        if isinstance(src, str) and src in hashes:
            node["sha256"] = hashes[src]
        for key, value in node.items():
            if key != "config":
                _fill_hashes(value, hashes)
    elif isinstance(node, list):
        for value in node:
            _fill_hashes(value, hashes)


def _yaml_dump(data: dict[str, Any]) -> str:
    import yaml

    class NoAliases(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return yaml.dump(data, Dumper=NoAliases, sort_keys=False, allow_unicode=True, width=100)


@contextlib.contextmanager
def _jit_quiet() -> Iterator[None]:
    """TorchScript is the Model Zoo's portable PyTorch format; recent torch releases warn that
    torch.jit is deprecated in favour of torch.export, which the Model Zoo does not read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.", DeprecationWarning)
        yield


def _check_traced(path: Path, x: torch.Tensor, feats: np.ndarray) -> None:
    with _jit_quiet():
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        got = loaded(x)[0].numpy()
    diff = float(np.max(np.abs(got - feats))) if len(feats) else 0.0
    if not diff < TOLERANCE:
        raise CheckpointError(f"the TorchScript module differs from the model by {diff:g}")


def _pydantic_problems(err: Exception) -> str:
    errors = getattr(err, "errors", None)
    if callable(errors):
        parts = []
        for e in errors()[:3]:
            loc = ".".join(str(x) for x in e.get("loc", ()))
            parts.append(f"{loc}: {_first_line(e.get('msg', ''))}")
        return "; ".join(parts)
    return _first_line(str(err))


def _readable(path: str) -> None:
    """mkstemp makes 0600 files; give the package the usual umask-based permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
