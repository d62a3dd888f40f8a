"""Nuisances and the on-the-fly (inputs, target) pairs an ME-VAE trains on.

Encoder k sees the canonical cell with nuisance k randomised; all encoders' target is the
canonical cell itself.  The pairs are made in ``__getitem__`` from the one stored copy of the
targets (never K + 1 copies of the data set) with cheap torch ops on a single image, and the
random draws depend only on ``(seed, epoch, index)``: fresh every epoch, reproducible, and the
same in any DataLoader worker.

Add your own nuisance with :func:`register_nuisance`::

    register_nuisance(
        "brightness",
        draw=lambda rng: float(rng.uniform(0.7, 1.3)),
        apply=lambda img, gain: (img * gain).clamp(0, 1),
        identity=1.0,
    )
    NuisancePairs(crops, ["rotation", "brightness"])

``apply`` gets a float32 torch tensor ``(C, S, S)`` (numpy input is converted for it) and must
return one of the same shape; ``draw`` gets a ``numpy.random.Generator`` and returns a number
(ints and floats collate into tensors when ``return_params=True``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "Nuisance",
    "NUISANCES",
    "register_nuisance",
    "get_nuisances",
    "apply_nuisance",
    "NuisancePairs",
    "NuisanceAutoencode",
    "draw_and_apply",
    "randomise",
    "SCALE_RANGE",
]

SCALE_RANGE = (0.8, 1.25)  # zoom factors of the "scale" nuisance (log-uniform)


@dataclass
class Nuisance:
    """A transformational feature: how to draw a random parameter and apply it to one image."""

    name: str
    draw: Callable[[np.random.Generator], Any]
    apply: Callable[[Any, Any], Any]
    identity: Any = None

    def __call__(self, image: Any, param: Any) -> Any:
        return apply_nuisance(self, image, param)


NUISANCES: dict[str, Nuisance] = {}


# -- built-in transforms (torch, one (C, S, S) image) ----------------------------------------
def _numpy_too(fn: Callable[[torch.Tensor, Any], torch.Tensor]) -> Callable[[Any, Any], Any]:
    """Let a torch transform take numpy arrays too (numpy in -> float32 numpy out)."""

    def wrapper(img: Any, param: Any) -> Any:
        if isinstance(img, torch.Tensor):
            return fn(img, param)
        arr = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
        return fn(arr, param).numpy()

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _affine(img: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample ``img`` (C, H, W) with a 2x3 normalised affine (output -> input), zero padding."""
    grid = F.affine_grid(theta[None].to(img.dtype), [1, *img.shape], align_corners=False)
    return F.grid_sample(
        img[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )[0]


@_numpy_too
def rotate(img: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate counter-clockwise (as displayed, row 0 at the top) by ``angle`` degrees about the
    centre; corners that come from outside the image are 0.  Multiples of 90 are exact."""
    angle = float(angle) % 360.0
    quarter = angle / 90.0
    if abs(quarter - round(quarter)) < 1e-9:
        return torch.rot90(img, int(round(quarter)) % 4, dims=(-2, -1)).clone()
    a = math.radians(angle)
    c, s = math.cos(a), math.sin(a)
    h, w = img.shape[-2:]
    # normalised x (columns) and y (rows) have different pixel sizes when h != w
    theta = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]])
    return _affine(img, theta)


@_numpy_too
def flip(img: torch.Tensor, code: int) -> torch.Tensor:
    """Polarity: 0 identity, 1 left-right, 2 up-down, 3 both (= rotation by 180)."""
    code = int(code)
    if code == 0:
        return img.clone()
    if code == 1:
        return torch.flip(img, dims=(-1,))
    if code == 2:
        return torch.flip(img, dims=(-2,))
    if code == 3:
        return torch.flip(img, dims=(-2, -1))
    raise ValueError(f"polarity code must be 0, 1, 2 or 3, got {code}")


@_numpy_too
def zoom(img: torch.Tensor, factor: float) -> torch.Tensor:
    """Zoom about the centre by ``factor`` (> 1 enlarges), crop size unchanged."""
    factor = float(factor)
    if factor <= 0:
        raise ValueError(f"zoom factor must be > 0, got {factor}")
    if factor == 1.0:
        return img.clone()
    theta = torch.tensor([[1.0 / factor, 0.0, 0.0], [0.0, 1.0 / factor, 0.0]])
    return _affine(img, theta)


@_numpy_too
def pose(img: torch.Tensor, param: float) -> torch.Tensor:
    """Rotation with an optional mirror, as the LINCS reference's ``InputImages1`` (rotated,
    sometimes mirrored cells): ``param`` in [0, 360) rotates counter-clockwise by that many
    degrees; ``param`` in [360, 720) mirrors left-right first, then rotates by ``param - 360``."""
    param = float(param)
    if not 0.0 <= param < 720.0:
        raise ValueError(f"pose parameter must be in [0, 720), got {param}")
    if param >= 360.0:
        img, param = torch.flip(img, dims=(-1,)), param - 360.0
    return rotate(img, param)


def _draw_pose(rng: np.random.Generator) -> float:
    return float(rng.uniform(0.0, 360.0) + 360.0 * int(rng.integers(0, 2)))


def _draw_angle(rng: np.random.Generator) -> float:
    return float(rng.uniform(0.0, 360.0))


def _draw_flip(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 4))


def _draw_zoom(rng: np.random.Generator) -> float:
    lo, hi = SCALE_RANGE
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


# -- registry -------------------------------------------------------------------------------
def register_nuisance(
    name: str,
    draw: Callable[[np.random.Generator], Any],
    apply: Callable[[Any, Any], Any],
    identity: Any = None,
    *,
    overwrite: bool = False,
) -> Nuisance:
    """Make a nuisance available by ``name`` (to :func:`get_nuisances`, the CLI and the GUI).

    Re-registering an existing name needs ``overwrite=True`` so a typo cannot silently replace
    a built-in.
    """
    if not isinstance(name, str) or not name.strip() or "," in name:
        raise ValueError(f"a nuisance name must be a non-empty string without commas, got {name!r}")
    name = name.strip()
    if not callable(draw) or not callable(apply):
        raise TypeError("draw and apply must be callables: draw(rng) -> param, apply(image, param)")
    if name in NUISANCES and not overwrite:
        raise ValueError(
            f"nuisance {name!r} is already registered; pass overwrite=True to replace it"
        )
    nuisance = Nuisance(name, draw, apply, identity)
    NUISANCES[name] = nuisance
    return nuisance


register_nuisance("rotation", _draw_angle, rotate, 0.0)
register_nuisance("polarity", _draw_flip, flip, 0)
register_nuisance("scale", _draw_zoom, zoom, 1.0)
# rotation + random mirror: the whole O(2) orbit of the cell, what the reference's encoder 1 saw
register_nuisance("pose", _draw_pose, pose, 0.0)


def get_nuisances(names: str | Nuisance | Sequence[str | Nuisance]) -> list[Nuisance]:
    """Nuisances by name: ``"rotation,polarity"`` or ``["rotation", "polarity"]`` (one encoder
    each, in this order).  Unknown names raise a ValueError listing the choices."""
    if isinstance(names, (str, Nuisance)):
        names = [names]
    items: list[str | Nuisance] = []
    for n in names:
        if isinstance(n, str):
            items.extend(part.strip() for part in n.split(",") if part.strip())
        elif isinstance(n, Nuisance):
            items.append(n)
        else:
            raise TypeError(f"a nuisance is a name or a Nuisance, got {type(n).__name__}")
    if not items:
        raise ValueError(f"no nuisance given; choose from: {', '.join(NUISANCES)}")
    unknown = [n for n in items if isinstance(n, str) and n not in NUISANCES]
    if unknown:
        raise ValueError(
            f"unknown nuisance(s) {', '.join(map(repr, unknown))}; choose from: "
            f"{', '.join(NUISANCES)} (or add one with register_nuisance)"
        )
    return [n if isinstance(n, Nuisance) else NUISANCES[n] for n in items]


def apply_nuisance(nuisance: Nuisance | str, image: Any, param: Any) -> Any:
    """Apply one parameter to one ``(C, S, S)`` image; numpy in -> numpy out, torch -> torch."""
    nz = get_nuisances(nuisance)[0]
    if isinstance(image, torch.Tensor):
        return nz.apply(image, param)
    arr = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    return nz.apply(arr, param).numpy()


# -- datasets -------------------------------------------------------------------------------
def _param_keys(nuisances: Sequence[Nuisance]) -> list[str]:
    """``name`` per encoder; repeated names get ``name2``, ``name3``..."""
    keys, seen = [], {}
    for n in nuisances:
        seen[n.name] = seen.get(n.name, 0) + 1
        keys.append(n.name if seen[n.name] == 1 else f"{n.name}{seen[n.name]}")
    return keys


class NuisancePairs(Dataset):
    """``(inputs (K, C, S, S), target (C, S, S))``: input k = target with nuisance k randomised.

    ``targets``: canonical crops ``(N, C, S, S)`` (or ``(N, S, S)``) in [0, 1] as a numpy array or
    tensor, or any lazy object with ``__len__``/``__getitem__`` returning ``(C, S, S)``.  Nothing is
    copied up front.  Draws come from ``(seed, epoch, index)``: call :meth:`set_epoch` (the
    trainer does) for fresh ones each epoch.
    """

    def __init__(
        self,
        targets: Any,
        nuisances: str | Sequence[str | Nuisance] = ("rotation", "polarity"),
        seed: int | None = 0,
        return_params: bool = False,
    ) -> None:
        self.nuisances = get_nuisances(nuisances)
        self.keys = _param_keys(self.nuisances)
        self.seed = int(seed or 0)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.epoch = 0
        self.return_params = return_params
        self.targets = self._check_targets(targets)

    @staticmethod
    def _check_targets(targets: Any) -> Any:
        if isinstance(targets, (np.ndarray, torch.Tensor)):
            if targets.ndim == 3:
                targets = targets[:, None]
            if targets.ndim != 4 or targets.shape[-1] != targets.shape[-2]:
                raise ValueError(
                    f"targets must be (N, C, S, S) square crops, got shape {tuple(targets.shape)}"
                )
            if isinstance(targets, np.ndarray) and targets.dtype.kind not in "biuf":
                raise TypeError(f"targets must be numeric, got dtype {targets.dtype}")
            if len(targets):
                lo, hi = float(targets.min()), float(targets.max())
                if not (math.isfinite(lo) and math.isfinite(hi)):
                    raise ValueError("targets contain NaN or inf")
                if lo < -1e-6 or hi > 1 + 1e-6:
                    warnings.warn(
                        f"targets span [{lo:.3g}, {hi:.3g}], not [0, 1]; the BCE loss expects "
                        "[0, 1] (normalise the crops first)",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            return targets
        if not (hasattr(targets, "__len__") and hasattr(targets, "__getitem__")):
            raise TypeError(
                "targets must be an array (N, C, S, S) or an object with __len__ and __getitem__"
            )
        return targets

    def set_epoch(self, epoch: int) -> None:
        """Select the random draws of this epoch (reproducible from seed, epoch and index)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.targets)

    def _target(self, i: int) -> torch.Tensor:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} cells")
        i = i % n
        item = self.targets[i]
        if isinstance(item, torch.Tensor):
            t = item.detach().to("cpu", torch.float32).clone()
        else:
            t = torch.from_numpy(np.array(item, dtype=np.float32))
        if t.ndim == 2:
            t = t[None]
        if t.ndim != 3:
            raise ValueError(f"item {i} has shape {tuple(t.shape)}, expected (C, S, S)")
        return t

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, i % max(len(self), 1)])

    def draw(self, i: int) -> dict[str, Any]:
        """The parameters item ``i`` gets in the current epoch."""
        rng = self._rng(i)
        return {k: n.draw(rng) for k, n in zip(self.keys, self.nuisances, strict=True)}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        target = self._target(i)
        params = self.draw(i)
        inputs = torch.stack(
            [n.apply(target, params[k]) for k, n in zip(self.keys, self.nuisances, strict=True)]
        )
        if self.return_params:
            return inputs, target, params
        return inputs, target

    @property
    def n_encoders(self) -> int:
        return len(self.nuisances)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, S, S)`` of one target."""
        if isinstance(self.targets, (np.ndarray, torch.Tensor)):
            return tuple(int(s) for s in self.targets.shape[1:])  # type: ignore[return-value]
        if len(self) == 0:
            raise ValueError("no targets")
        return tuple(self._target(0).shape)  # type: ignore[return-value]

    @property
    def image_size(self) -> int:
        return self.shape[-1]

    @property
    def channels(self) -> int:
        return self.shape[0]


class NuisanceAutoencode(NuisancePairs):
    """Baseline (plain / beta-VAE) data: every nuisance randomised on the cell, and the model
    reconstructs that same raw cell: ``(inputs (1, C, S, S), target (C, S, S))``."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        x = self._target(i)
        params = self.draw(i)
        for k, n in zip(self.keys, self.nuisances, strict=True):
            x = n.apply(x, params[k])
        if self.return_params:
            return x[None], x, params
        return x[None], x

    @property
    def n_encoders(self) -> int:
        return 1


def draw_and_apply(
    crops: np.ndarray, name: str | Nuisance, rng: np.random.Generator | int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each crop ``(N, C, S, S)`` with its own random draw of one nuisance; returns the
    transformed crops (float32) and the drawn parameters ``(N,)``: for invariance measurements."""
    nz = get_nuisances(name)[0]
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    arr = np.asarray(crops, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise ValueError(f"crops must be (N, C, S, S), got shape {np.shape(crops)}")
    params = [nz.draw(rng) for _ in range(len(arr))]
    out = np.empty_like(arr)
    with torch.no_grad():
        src = torch.from_numpy(np.ascontiguousarray(arr))
        for i, p in enumerate(params):
            out[i] = nz.apply(src[i], p).numpy()
    return out, np.asarray(params)


def randomise(
    cells: torch.Tensor,
    nuisances: str | Sequence[str | Nuisance],
    rng: np.random.Generator | Sequence[np.random.Generator],
) -> torch.Tensor:
    """Each cell of ``(B, C, S, S)`` under a fresh draw of every nuisance, one after another:
    the cell in an arbitrary pose, as an analyst's image shows it (the trainer's invariance
    term asks every encoder to read it as it reads its training input).  ``rng``: one
    generator for all, or one per cell."""
    chosen = get_nuisances(nuisances)
    rngs = [rng] * len(cells) if isinstance(rng, np.random.Generator) else list(rng)
    if len(rngs) != len(cells):
        raise ValueError(f"{len(rngs)} random generators for {len(cells)} cells")
    out = []
    with torch.no_grad():
        for cell, gen in zip(cells, rngs, strict=True):
            for nz in chosen:
                cell = nz.apply(cell, nz.draw(gen))
            out.append(cell)
    return torch.stack(out)
