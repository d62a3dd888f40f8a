"""Building a package (``mevae export``): crops for the test tensors, the cover, the TorchScript
trace, the zip; then validating it with ``bioimageio.spec`` and test-running it with
``bioimageio.core`` (the ``[bioimageio]`` extra, imported only here), before it is written."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..config import CheckpointError, InputError, model_kind

if TYPE_CHECKING:
    from ..checkpoints import Checkpoint


from .describe import _as_yaml_value, _dims_in_use, _documentation, _fill_hashes, _rdf, _yaml_dump
from .package import (
    COVER_FILE,
    DEFAULT_LICENSE,
    DOC_FILE,
    HISTORY_FILE,
    N_COVER,
    N_TEST,
    PACKAGE_FORMAT,
    PACKAGE_VERSION,
    RDF_NAMES,
    SAMPLE_FEATURES_FILE,
    SAMPLE_INPUT_FILE,
    SAMPLE_RECON_FILE,
    STATE_DICT_FILE,
    TEST_FEATURES_FILE,
    TEST_INPUT_FILE,
    TEST_RECON_FILE,
    TOLERANCE,
    TORCHSCRIPT_FILE,
    _readable,
    _sha256,
    features_module,
)


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
        from ..workflow import open_targets

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
    from ..figures import montage, to_display

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
    from .. import __version__
    from ..analysis import encode
    from ..checkpoints import load_checkpoint

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
        from ..figures import save_png

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
            back = load_checkpoint(tmp_zip).build_model("cpu")
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
