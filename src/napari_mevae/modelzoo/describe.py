"""What a package says about the model: its rdf (the ``bioimageio.spec`` description) and its
README (how to crop cells for it, the training configuration)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..config import model_kind
from ..model import MEVAE

if TYPE_CHECKING:
    from ..checkpoints import Checkpoint


from .package import (
    COVER_FILE,
    DOC_FILE,
    HISTORY_FILE,
    MARKER,
    PAPER_DOI,
    PAPER_TEXT,
    SAMPLE_FEATURES_FILE,
    SAMPLE_INPUT_FILE,
    SAMPLE_RECON_FILE,
    STATE_DICT_FILE,
    TEST_FEATURES_FILE,
    TEST_INPUT_FILE,
    TEST_RECON_FILE,
    TOLERANCE,
    TORCHSCRIPT_FILE,
)


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


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


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
                "description": "per-cell ME-VAE features (unused dimensions 0, the rest kept to "
                "the directions in use)",
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
