"""Every choice a user makes, as plain data: the model config and its presets, the KL-weight
rule, model kinds, training options, precisions, crop settings and the error types.

No torch, no Qt: the napari widget builds its forms from these constants when napari opens,
and the CLI validates its flags with them before any heavy import.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = [
    "ACTIVE_VARIANCE",
    "BETAVAE_FACTOR",
    "MODEL_KINDS",
    "NUISANCE_CHOICES",
    "PRECISIONS",
    "PRESETS",
    "REFERENCE_NUISANCES",
    "NORMALIZATIONS",
    "CheckpointError",
    "CropSettings",
    "InputError",
    "MEVAEConfig",
    "TrainOptions",
    "TrainingDiverged",
    "default_epochs",
    "max_budget_epochs",
    "kl_weight",
    "model_kind",
    "preset",
    "size_scaled_beta",
]


# -- errors ------------------------------------------------------------------------------------
class InputError(ValueError):
    """Bad user input, explained in one line; the CLI prints it and exits with status 2."""


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, unsafe or does not fit the data/model."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the model holds the last good weights."""


# -- the model -------------------------------------------------------------------------------
# A latent dimension is active when its posterior mean varies across cells by more than this
# (Burda et al. 2016, "active units"): below it the posterior sits on the prior, the decoder
# ignores the dimension, and what is left in its mean is residue, not a feature.
ACTIVE_VARIANCE = 0.01


@dataclass
class MEVAEConfig:
    """Architecture and loss of an ME-VAE; everything needed to rebuild the module.

    ``n_encoders`` is K.  ``beta`` weights the KL term (see :func:`kl_weight`).
    ``recon_loss`` is ``"bce"`` (binary cross-entropy, as the reference) or ``"mse"``; either is
    averaged over pixels and scaled by ``image_size**2`` as in the reference.
    """

    image_size: int = 128
    channels: int = 1
    latent_dim: int = 128
    inter_dim: int = 128
    nlayers: int = 3
    nfilters: int = 16
    kernel_size: int = 3
    n_encoders: int = 2
    beta: float = 1.0
    recon_loss: Literal["bce", "mse"] = "bce"
    epsilon_std: float = 1.0
    nuisances: list[str] = field(default_factory=list)
    # free bits (nats per latent dimension and encoder): KL below it is not penalised
    free_bits: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError that names the bad field, before any tensor is built: wrong
        types, impossible shapes, and sizes that would build a model no machine trains."""
        for name in ("image_size", "channels", "latent_dim", "inter_dim", "nlayers", "nfilters"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not _is_int(self.n_encoders) or self.n_encoders < 1:
            raise ValueError(f"n_encoders (K) must be an integer >= 1, got {self.n_encoders!r}")
        if not _is_int(self.kernel_size) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size must be a positive odd integer, got {self.kernel_size!r}"
            )
        if self.nlayers > MAX_NLAYERS:
            raise ValueError(f"nlayers must be at most {MAX_NLAYERS}, got {self.nlayers}")
        step = 2**self.nlayers
        if self.image_size % step:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of 2**nlayers = {step} "
                f"(nlayers={self.nlayers}); try {max(step, round(self.image_size / step) * step)}"
            )
        # the last encoder convolution sees image_size / 2**(nlayers-1) pixels: a kernel much
        # larger than that only multiplies padding (kernel 99 at 32 px: minutes per epoch)
        smallest = self.image_size // 2 ** (self.nlayers - 1)
        widest = max(3, smallest + 1)
        if self.kernel_size > widest:
            raise ValueError(
                f"kernel_size {self.kernel_size} is larger than the feature maps it convolves "
                f"({smallest} px at image_size {self.image_size} with nlayers {self.nlayers}); "
                f"at most {widest - (widest % 2 == 0)}"
            )
        for name in ("beta", "epsilon_std", "free_bits"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.recon_loss not in ("bce", "mse"):
            raise ValueError(f"recon_loss must be 'bce' or 'mse', got {self.recon_loss!r}")
        n = parameter_count(self)
        if n > MAX_PARAMETERS:
            raise ValueError(
                f"this model would have {n:.3g} parameters ({4 * n / 2**30:.3g} GiB of float32 "
                f"weights; the limit is {MAX_PARAMETERS:.0e}): lower image_size, latent_dim, "
                "inter_dim or nfilters"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MEVAEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ME-VAE config field(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> MEVAEConfig:
        return cls.from_dict(json.loads(text))

    def diff(self, other: MEVAEConfig) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ, as ``{name: (self, other)}``: for clear mismatch errors."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}

    @property
    def bottleneck_size(self) -> int:
        return self.image_size // 2**self.nlayers


#: the largest model (parameters) a config may describe: 1e9 float32 weights are 4 GiB, and
#: training holds them three times (weights, gradients, RMSprop state)
MAX_PARAMETERS = 10**9
#: stride-2 layers per encoder: 2**12 px is more than any crop
MAX_NLAYERS = 12


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def parameter_count(cfg: MEVAEConfig) -> int:
    """Trainable parameters of the :class:`~napari_mevae.model.MEVAE` ``cfg`` describes,
    computed without building it (so absurd sizes are refused before any allocation)."""
    k2, nf = cfg.kernel_size**2, cfg.nfilters
    enc, c_in = 0, cfg.channels
    for i in range(cfg.nlayers):
        c_out = nf * 2**i
        enc += k2 * c_in * c_out + c_out
        c_in = c_out
    flat = c_in * (cfg.image_size // 2**cfg.nlayers) ** 2
    enc += (
        flat * cfg.inter_dim + cfg.inter_dim + 2 * (cfg.inter_dim * cfg.latent_dim + cfg.latent_dim)
    )
    dec = cfg.latent_dim * flat + flat
    for i in range(cfg.nlayers):
        c_out = nf * 2 ** (cfg.nlayers - i)
        dec += k2 * c_in * c_out + c_out
        c_in = c_out
    dec += k2 * c_in * cfg.channels + cfg.channels
    return cfg.n_encoders * enc + dec


#: the model kinds a user picks (as shown) -> preset name
MODEL_KINDS = {"ME-VAE": "mevae", "VAE": "vae", "beta-VAE": "betavae"}

#: the nuisances a user picks from (napari_mevae.nuisances registers more, e.g. "pose")
NUISANCE_CHOICES = ("rotation", "polarity", "scale")

#: the reference's two encoders, in the order of its pair folders (InputImages1 = rotation,
#: InputImages2 = polarity): what a model trained on those folders removes
REFERENCE_NUISANCES = ("rotation", "polarity")

#: the beta-VAE's KL weight relative to the VAE's, the paper's baseline
BETAVAE_FACTOR = 4.0

PRESETS: dict[str, dict[str, Any]] = {
    # The published reference: two encoders, 3 stride-2 convs of 16/32/64 filters, inter_dim 128.
    "reference": dict(
        image_size=128,
        channels=1,
        latent_dim=32,
        inter_dim=128,
        nlayers=3,
        nfilters=16,
        kernel_size=3,
        n_encoders=2,
        beta=1.0,
        recon_loss="bce",
    ),
    # Baselines of the paper, same architecture.
    "vae": dict(n_encoders=1, beta=1.0),
    "betavae": dict(n_encoders=1, beta=BETAVAE_FACTOR),
    "mevae": dict(n_encoders=2, beta=1.0),
    # Small and fast: tiny crops for tests and quick looks.
    "tiny": dict(image_size=32, latent_dim=8, inter_dim=32, nlayers=3, nfilters=8),
}


def size_scaled_beta(beta: float, image_size: int) -> float:
    """``beta * (image_size / 128) ** 2``: the KL weight that keeps the reference's balance
    between reconstruction and KL at another crop size.  The loss scales the reconstruction by
    ``image_size**2`` and the reference trains at 128 px, so at 32 px an unscaled KL weighs 16x
    more and a short run ends with no latent dimension in use."""
    return float(beta) * (image_size / 128) ** 2


def kl_weight(
    model: str, image_size: int, beta: float | None = None, factor: float | None = None
) -> float:
    """THE rule for the KL weight, the same in the CLI, the widget, the demo and the API.

    ``beta`` given: exactly that weight (``--beta``).  Otherwise the reference's balance at
    this crop size: 1 for an ME-VAE or VAE, ``factor`` (default :data:`BETAVAE_FACTOR`) for a
    beta-VAE, times ``(image_size / 128) ** 2`` (:func:`size_scaled_beta`)."""
    if model not in PRESETS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODEL_KINDS.values())}")
    if beta is not None:
        return float(beta)
    base = (BETAVAE_FACTOR if factor is None else float(factor)) if model == "betavae" else 1.0
    return size_scaled_beta(base, image_size)


def model_kind(config: MEVAEConfig) -> str:
    """ "ME-VAE", "VAE" or "beta-VAE": a one-encoder model is a plain VAE when its KL weight is
    1, as the reference sets it, or 1 scaled to its crop size (:func:`size_scaled_beta`)."""
    if config.n_encoders > 1:
        return "ME-VAE"
    plain = math.isclose(config.beta, 1.0) or math.isclose(
        config.beta, size_scaled_beta(1.0, config.image_size)
    )
    return "VAE" if plain else "beta-VAE"


def preset(name: str, **overrides: Any) -> MEVAEConfig:
    """A config from a named preset; ``overrides`` win.  Presets other than ``reference``
    start from the reference architecture."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    values = dict(PRESETS["reference"])
    values.update(PRESETS[name])
    values.update(overrides)
    return MEVAEConfig(**values)


# -- training --------------------------------------------------------------------------------
#: "auto" = bfloat16 autocast where the hardware runs bf16 natively (CPUs with avx512_bf16 /
#: AMX, GPUs from Ampere on), float16 autocast with loss scaling on older CUDA GPUs (T4,
#: V100), float32 elsewhere; "bf16" asks for bf16 wherever supported, even emulated; "fp16"
#: for float16 with loss scaling; "float32" never uses either.  Weights, optimizer and loss
#: always stay float32.
PRECISIONS = ("auto", "float32", "bf16", "fp16")


#: The default training budget, counted in images seen (optimizer steps x batch size), since
#: "epochs" means little when a data set has 40 or 40,000 cells: 30 passes over the data, but at
#: least the floor (the napari sample's 40 cells get 1,000 epochs: a few hundred steps teach a
#: model nothing) and at most the cap (huge screens).  docs/benchmarks.md, "Default budget".
BUDGET_PASSES = 30
BUDGET_IMAGES = (40_000, 400_000)
#: while the loss still falls at the end of the default budget (:func:`workflow.still_learning`)
#: training goes on, a third of the budget at a time, up to this many passes (within the same
#: floor and cap): cells like LINCS keep learning for 100 passes, converged runs stop at 30.
#: docs/benchmarks.md, "Training on while the loss still falls".
BUDGET_MAX_PASSES = 100
#: early stopping waits at least this many images without improvement (or ``patience`` epochs)
PATIENCE_IMAGES = 5_000
#: a run writes its checkpoint after an epoch once this many seconds have passed since the last
#: one, after its first epoch, and whenever it ends (finished, stopped, interrupted, diverged):
#: a crash loses at most this much training.  Every epoch was too often where epochs are short:
#: the napari sample's 1,000 epochs of 40 cells wrote 1,000 checkpoints of 7 MB (with fsync).
CHECKPOINT_SECONDS = 10.0


def _budget_epochs(n_items: int, passes: int) -> int:
    """Epochs of ``passes`` over ``n_items`` cells, within the floor and cap of images seen."""
    n = max(1, int(n_items))
    images = min(max(passes * n, BUDGET_IMAGES[0]), BUDGET_IMAGES[1])
    return max(1, round(images / n))


def default_epochs(n_items: int) -> int:
    """Epochs of the default budget for a training set of ``n_items`` cells."""
    return _budget_epochs(n_items, BUDGET_PASSES)


def max_budget_epochs(n_items: int) -> int:
    """The most epochs the default budget grows to while the loss still falls."""
    return max(default_epochs(n_items), _budget_epochs(n_items, BUDGET_MAX_PASSES))


#: the invariance term's weight per pixel (TrainOptions.invariance): 10 at 32 px, 164 at 128 px
DEFAULT_INVARIANCE = 0.01


def training_flops(cfg: MEVAEConfig, invariance: float = DEFAULT_INVARIANCE) -> float:
    """Floating-point operations to train on one image (forward + backward ~ 3x forward): the
    basis of the time estimate shown before training.  With the invariance term every encoder
    runs twice."""
    k2, nf, s = cfg.kernel_size**2, cfg.nfilters, cfg.image_size
    enc, c_in = 0.0, cfg.channels
    for i in range(cfg.nlayers):
        c_out, side = nf * 2**i, s // 2 ** (i + 1)
        enc += 2 * k2 * c_in * c_out * side * side
        c_in = c_out
    flat = c_in * cfg.bottleneck_size**2
    enc += 2 * flat * cfg.inter_dim + 4 * cfg.inter_dim * cfg.latent_dim
    dec, c_in, side = 2 * cfg.latent_dim * flat, c_in, cfg.bottleneck_size
    for i in range(cfg.nlayers):
        c_out = nf * 2 ** (cfg.nlayers - i)
        dec += 2 * k2 * c_in * c_out * side * side
        c_in, side = c_out, side * 2
    dec += 2 * k2 * c_in * cfg.channels * s * s
    passes = 2 if invariance > 0 and cfg.n_encoders > 1 else 1
    return 3.0 * (passes * cfg.n_encoders * enc + dec)


#: training throughput of one CPU core in float32, measured on the project's 2-core benchmark
#: machine (docs/benchmarks.md); only for the estimate shown before a run starts
FLOPS_PER_CORE = 80e9


def estimate_seconds(
    cfg: MEVAEConfig, images: int, threads: int, invariance: float = DEFAULT_INVARIANCE
) -> float:
    """A rough training time: ``images`` seen on ``threads`` CPU cores (+ a few seconds to
    start).  The run then reports its real speed."""
    flops = training_flops(cfg, invariance)
    return 5.0 + images * flops / (FLOPS_PER_CORE * max(1, threads))


def patience_epochs(patience: int, n_items: int) -> int:
    """Epochs without improvement before early stopping: ``patience``, or more on small sets."""
    return max(int(patience), math.ceil(PATIENCE_IMAGES / max(1, int(n_items))))


@dataclass
class TrainOptions:
    """How to train; RMSprop, lr 5e-4, batch 50 as the reference; ``epochs=None`` is the
    default budget (:func:`default_epochs`)."""

    epochs: int | None = None
    batch_size: int = 50
    learn_rate: float = 5e-4
    seed: int | None = None
    device: str = "auto"
    earlystop: bool = True
    patience: int = 8
    min_delta: float = 0.0
    save_dir: str | os.PathLike | None = None
    num_workers: int = 0
    shuffle: bool = True
    channels_last: bool = True
    distributed: bool = False
    # torch.compile the model (inductor); pays only for long runs (compiling takes ~1 min)
    compile: bool = False
    precision: str = "auto"  # one of PRECISIONS
    # keep large freed blocks in glibc's heap while training (speedups.tune_malloc): a
    # process-wide setting, so only where the process is ours (CLI, the widget's training
    # process), never inside napari's
    tune_malloc: bool = True
    # ramp the KL weight linearly from 0 to beta over this many epochs (0 = off, as the
    # reference), so the encoders learn to carry the cell before the KL prior squeezes them;
    # early stopping only counts epochs after the ramp
    kl_warmup: float = 0.0
    # intra-op threads for torch (None = torch's default, one per core)
    threads: int | None = None
    # weight of the invariance term, per pixel (the loss adds invariance x S^2 x the mean
    # squared distance between each encoder's latent mean for its training input and for the
    # same cell with every nuisance drawn afresh): ME-VAE models only; 0 = the paper's loss.
    # Without it the encoders' means keep the pose (leakage 0.3-0.7 on synthetic cells).
    invariance: float = DEFAULT_INVARIANCE

    def validate(self) -> None:
        if self.epochs is not None and self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.learn_rate > 0 and math.isfinite(self.learn_rate)):
            raise ValueError(f"learn_rate must be a positive number, got {self.learn_rate}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if not (self.kl_warmup >= 0 and math.isfinite(self.kl_warmup)):
            raise ValueError(f"kl_warmup must be a number of epochs >= 0, got {self.kl_warmup}")
        if not (self.invariance >= 0 and math.isfinite(self.invariance)):
            raise ValueError(f"invariance must be a number >= 0, got {self.invariance}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


#: limits of a run's pictures (runs.write_run_outputs): ``num_save`` images per row of the
#: grids (num_save x num_save images) and ``latent_samp`` steps of the latent walk
#: (latent_dim x latent_samp decoded images)
MAX_NUM_SAVE = 64
MAX_LATENT_SAMP = 100


# -- cropping cells --------------------------------------------------------------------------
NORMALIZATIONS = ("percentile", "max", "range", "none")
#: the largest crop side: one 4096 px float32 crop is 64 MiB a channel
MAX_CROP_SIZE = 4096


@dataclass
class CropSettings:
    """How cells are cropped (:func:`napari_mevae.cells.extract_cells`); kept with the crops
    and in checkpoints, so the inputs of a model can be made again."""

    size: int = 48
    channel_axis: int | None = None
    stack: bool = False
    normalize: str | None = "percentile"
    scale: str = "fixed"
    min_area: int = 0
    max_area: int | None = None
    border: str = "drop"
    align: bool = True
    mask: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def check(self) -> CropSettings:
        """Raise a ValueError naming the bad setting; returns itself (size as a plain int)."""
        size = self.size
        if not _is_int(size) or not 4 <= size <= MAX_CROP_SIZE:
            raise ValueError(f"size must be an integer from 4 to {MAX_CROP_SIZE}, got {size!r}")
        self.size = int(size)
        if not _is_int(self.min_area) or self.min_area < 0:
            raise ValueError(f"min_area must be an integer >= 0, got {self.min_area!r}")
        if self.max_area is not None and (not _is_int(self.max_area) or self.max_area < 1):
            raise ValueError(f"max_area must be a positive integer or None, got {self.max_area!r}")
        if self.scale not in ("fixed", "fit"):
            raise ValueError(f"scale must be 'fixed' or 'fit', got {self.scale!r}")
        if self.normalize not in (*NORMALIZATIONS, None):
            raise ValueError(
                f"normalize must be 'percentile', 'max', 'range' or None, got {self.normalize!r}"
            )
        if self.border not in ("drop", "pad"):
            raise ValueError(f"border must be 'drop' or 'pad', got {self.border!r}")
        return self

    def extract_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``extract_cells``."""
        kw = self.to_dict()
        if kw["normalize"] == "none":
            kw["normalize"] = None
        return kw
