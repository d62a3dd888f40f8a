"""The checkpoint format: weights, config, optimizer state and history in one ``.pt`` file,
written atomically (temp file + rename), read with ``weights_only=True`` so a file can never run
code.  A readable ``<name>.json`` with the model config is written beside it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import CheckpointError, MEVAEConfig
from .model import MEVAE
from .outputs import OutputSet

__all__ = [
    "CHECKPOINT_NAME",
    "Checkpoint",
    "check_compatible",
    "load_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "napari-mevae-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class Checkpoint:
    config: MEVAEConfig
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None = None
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def build_model(self, device: str | torch.device = "cpu") -> MEVAE:
        model = MEVAE(self.config)
        try:
            model.load_state_dict(self.model_state)
        except RuntimeError as err:  # shape mismatch inside a hand-edited file
            raise CheckpointError(f"checkpoint weights do not fit its own config: {err}") from err
        return model.to(device).eval()


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path``, complete or not at all (through :mod:`.outputs`)."""
    with OutputSet() as out:
        out.write_bytes(path, torch_bytes(obj))


def _atomic_write_text(text: str, path: Path) -> None:
    with OutputSet() as out:
        out.write_text(path, text)


def torch_bytes(obj: Any) -> bytes:
    """``torch.save`` into memory: the file is then written by plain Python, whose errors carry
    their errno (torch's own writer turns a full disk into "unexpected pos 104128 vs 104016")."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_checkpoint(
    path: str | os.PathLike,
    model: MEVAE,
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int = 0,
    history: Iterable[dict[str, float]] = (),
    extra: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    outputs: OutputSet | None = None,
) -> Path:
    """Write weights + config atomically (temp file + rename) and a readable config JSON beside.

    ``path`` is a ``.pt`` file or a directory (then ``<dir>/checkpoint.pt``).  The optimizer
    state comes from ``optimizer`` or, when only its state is at hand, ``optimizer_state``.
    With ``outputs`` the two files join that set and are renamed when it is committed."""
    path = Path(path)
    if path.suffix != ".pt":
        path = path / CHECKPOINT_NAME
    state = {k: v.detach().to("cpu") for k, v in unwrap(model).state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": model_config(model).to_dict(),
        "model": state,
        "optimizer": optimizer.state_dict() if optimizer is not None else optimizer_state,
        "epoch": int(epoch),
        "history": [dict(h) for h in history],
        "extra": dict(extra or {}),
    }
    if outputs is not None:
        outputs.write_bytes(path, torch_bytes(payload))
        outputs.write_text(path.with_suffix(".json"), model_config(model).to_json() + "\n")
        return path
    with OutputSet() as out:  # both files, or neither
        out.write_bytes(path, torch_bytes(payload))
        out.write_text(path.with_suffix(".json"), model_config(model).to_json() + "\n")
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the save_dir / models dir of a training run."""
    p = Path(path)
    if p.is_dir():
        for cand in (p / CHECKPOINT_NAME, p / "models" / CHECKPOINT_NAME):
            if cand.is_file():
                return cand
        raise CheckpointError(
            f"no checkpoint in directory {p}: expected {CHECKPOINT_NAME} or models/{CHECKPOINT_NAME}"
        )
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    return p


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> Checkpoint:
    """Read a checkpoint safely: ``weights_only=True`` so a file can never run code.  A
    BioImage Model Zoo package written by ``mevae export`` (a .zip) loads as well."""
    p = resolve_checkpoint(path)
    from .modelzoo.package import is_package, read_package

    if is_package(p):
        return Checkpoint(**read_package(p, map_location))
    try:
        payload = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle.UnpicklingError, RuntimeError (zip), EOFError...
        raise CheckpointError(
            f"cannot read checkpoint {p}: not a napari-mevae checkpoint, corrupt, or it holds "
            f"objects other than weights (refused for safety). Details: {err}"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p} is not a napari-mevae checkpoint (no format marker)")
    if payload.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{p} was written by a newer napari-mevae (format version {payload['version']})"
        )
    try:
        config = MEVAEConfig.from_dict(payload["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{p} has an invalid model config: {err}") from err
    _check_weights(p, payload)
    return Checkpoint(
        config=config,
        model_state=payload["model"],
        optimizer_state=payload.get("optimizer"),
        epoch=int(payload.get("epoch", 0)),
        history=list(payload.get("history", [])),
        extra=dict(payload.get("extra", {})),
        path=p,
    )


def _check_weights(path: Path, payload: dict[str, Any]) -> None:
    """The weights are there, are tensors, and are finite: a diverged model encodes every cell
    as NaN."""
    state = payload.get("model")
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path} holds no model weights (no 'model' entry)")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: model entry {name!r} is not a tensor")
        if name.endswith(("latent_variance", "latent_mean", "latent_covariance")):
            # NaN there means "not measured yet"
            continue
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(
                f"{path} holds NaN/inf weights ({bad} in {name!r}): the model it saved had "
                "diverged; use an earlier checkpoint or train again"
            )


def check_compatible(config: MEVAEConfig, image_size: int, channels: int, n_inputs: int) -> None:
    """Clear error when data does not fit a (loaded) model, naming what differs."""
    problems = []
    if config.image_size != image_size:
        problems.append(f"image size: model {config.image_size}, data {image_size}")
    if config.channels != channels:
        problems.append(f"channels: model {config.channels}, data {channels}")
    if config.n_encoders != n_inputs:
        problems.append(f"encoder inputs: model K={config.n_encoders}, data {n_inputs}")
    if problems:
        raise CheckpointError("model and data do not match: " + "; ".join(problems))


def unwrap(model: torch.nn.Module) -> MEVAE:
    return getattr(model, "module", model)


def model_config(model: torch.nn.Module) -> MEVAEConfig:
    return unwrap(model).config
