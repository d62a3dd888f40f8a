"""The ME-VAE module: K parallel encoders, element-wise product fusion, one decoder.

K = 1 is the standard VAE baseline, a ``beta`` above 1 the beta-VAE baseline, K = 2 the
published reference and K >= 3 the paper's multi-nuisance set-up.  Everything is defined by a
:class:`MEVAEConfig`, which round-trips through JSON so a checkpoint always says what it holds.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MEVAEConfig",
    "MEVAE",
    "VAEOutput",
    "preset",
    "PRESETS",
    "count_parameters",
    "ACTIVE_VARIANCE",
    "size_scaled_beta",
]

# A latent dimension is active when its posterior mean varies across cells by more than this
# (Burda et al. 2016, "active units"): below it the posterior sits on the prior, the decoder
# ignores the dimension, and what is left in its mean is residue, not a feature.
ACTIVE_VARIANCE = 0.01


@dataclass
class MEVAEConfig:
    """Architecture and loss of an ME-VAE; everything needed to rebuild the module.

    ``n_encoders`` is K.  ``beta`` weights the KL term (1 = VAE / ME-VAE, > 1 = beta-VAE).
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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError that names the bad field, before any tensor is built."""
        for name in ("image_size", "channels", "latent_dim", "inter_dim", "nlayers", "nfilters"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.n_encoders, int) or self.n_encoders < 1:
            raise ValueError(f"n_encoders (K) must be an integer >= 1, got {self.n_encoders!r}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {self.kernel_size}")
        step = 2**self.nlayers
        if self.image_size % step:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of 2**nlayers = {step} "
                f"(nlayers={self.nlayers}); try {max(step, round(self.image_size / step) * step)}"
            )
        if self.beta < 0 or not math.isfinite(self.beta):
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta}")
        if self.recon_loss not in ("bce", "mse"):
            raise ValueError(f"recon_loss must be 'bce' or 'mse', got {self.recon_loss!r}")
        if self.epsilon_std < 0:
            raise ValueError(f"epsilon_std must be >= 0, got {self.epsilon_std}")

    # -- serialisation -------------------------------------------------------------------
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
    "betavae": dict(n_encoders=1, beta=4.0),
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


@dataclass
class VAEOutput:
    """What a forward pass returns: logits of the reconstruction and each encoder's posterior."""

    recon_logits: torch.Tensor  # (B, C, S, S), before the sigmoid
    means: torch.Tensor  # (K, B, L)
    logvars: torch.Tensor  # (K, B, L)
    z: torch.Tensor  # (B, L), fused latent

    @property
    def recon(self) -> torch.Tensor:
        return torch.sigmoid(self.recon_logits)


class Encoder(nn.Module):
    """nlayers x [conv stride 2, ReLU] -> dense(inter_dim, ReLU) -> (mean, log-variance)."""

    def __init__(self, cfg: MEVAEConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = cfg.channels
        pad = cfg.kernel_size // 2
        for i in range(cfg.nlayers):
            out_ch = cfg.nfilters * 2**i
            # in-place ReLU: a conv's backward needs its input, never its output, so
            # overwriting the output saves one activation-sized allocation per layer
            layers += [
                nn.Conv2d(in_ch, out_ch, cfg.kernel_size, stride=2, padding=pad),
                nn.ReLU(inplace=True),
            ]
            in_ch = out_ch
        self.convs = nn.Sequential(*layers)
        flat = in_ch * cfg.bottleneck_size**2
        self.dense = nn.Linear(flat, cfg.inter_dim)
        self.mean = nn.Linear(cfg.inter_dim, cfg.latent_dim)
        self.logvar = nn.Linear(cfg.inter_dim, cfg.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.convs(x)
        h = F.relu(self.dense(torch.flatten(h, 1)))
        return self.mean(h), self.logvar(h)


class Decoder(nn.Module):
    """dense -> reshape -> nlayers x [transposed conv stride 2, ReLU] -> conv to C channels."""

    def __init__(self, cfg: MEVAEConfig) -> None:
        super().__init__()
        self.enc_channels = cfg.nfilters * 2 ** (cfg.nlayers - 1)
        self.side = cfg.bottleneck_size
        self.dense = nn.Linear(cfg.latent_dim, self.enc_channels * self.side**2)
        pad = cfg.kernel_size // 2
        layers: list[nn.Module] = []
        in_ch = self.enc_channels
        for i in range(cfg.nlayers):
            out_ch = cfg.nfilters * 2 ** (cfg.nlayers - i)
            layers += [
                nn.ConvTranspose2d(
                    in_ch, out_ch, cfg.kernel_size, stride=2, padding=pad, output_padding=1
                ),
                nn.ReLU(inplace=True),
            ]
            in_ch = out_ch
        layers.append(nn.ConvTranspose2d(in_ch, cfg.channels, cfg.kernel_size, padding=pad))
        self.deconvs = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.dense(z)).view(-1, self.enc_channels, self.side, self.side)
        for layer in self.deconvs:
            h = deconv_bias_apart(layer, h) if isinstance(layer, nn.ConvTranspose2d) else layer(h)
        return h  # logits; the sigmoid lives in the loss / VAEOutput.recon


def deconv_bias_apart(layer: nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` with the bias added by a separate op instead of inside the convolution.

    Same result, faster training: oneDNN's transposed-convolution backward takes 1.1-2x as long
    when it also produces the bias gradient (bf16 and float32, CPU), whereas the extra add
    and the per-channel sum that then gives the bias gradient cost ~1-2 % of it.
    """
    assert isinstance(layer.padding, tuple)  # an int/str padding only exists for plain convs
    y = F.conv_transpose2d(
        x,
        layer.weight,
        None,
        layer.stride,
        layer.padding,
        layer.output_padding,
        layer.groups,
        layer.dilation,
    )
    if layer.bias is None:
        return y
    # y is the convolution's own output (its backward does not need it): add in place
    return y.add_(layer.bias.to(y.dtype).view(1, -1, 1, 1))


class MEVAE(nn.Module):
    """Multi-encoder VAE.  ``forward`` takes ``(B, K, C, S, S)`` inputs, one slot per encoder."""

    def __init__(self, config: MEVAEConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.encoders = nn.ModuleList(Encoder(config) for _ in range(config.n_encoders))
        self.decoder = Decoder(config)
        # variance over the training cells of each fused latent mean, measured by the trainer
        # during the last epoch; NaN = not measured (untrained, or an older checkpoint)
        self.register_buffer("latent_variance", torch.full((config.latent_dim,), math.nan))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # checkpoints written before latent_variance existed load as "not measured"
        state_dict.setdefault(
            prefix + "latent_variance", torch.full_like(self.latent_variance, math.nan)
        )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def n_active(self) -> int:
        """Dimensions in use: variance of the fused mean >= ACTIVE_VARIANCE (all of them
        until measured; 0 for a model that has not learned to use any yet)."""
        if not self.activity_measured:
            return self.config.latent_dim
        return int((self.latent_variance >= ACTIVE_VARIANCE).sum())

    @property
    def active_mask(self) -> torch.Tensor:
        """Boolean ``(L,)``: the dimensions kept in the features.  While none is in use (a
        barely trained model) all are kept: whole raw features beat all-zero ones."""
        mask = self.latent_variance >= ACTIVE_VARIANCE  # NaN compares False
        return mask if mask.any() else torch.ones_like(mask)

    @property
    def activity_measured(self) -> bool:
        """Whether training has measured which dimensions are in use."""
        return not bool(torch.isnan(self.latent_variance).all())

    # -- shape checks ---------------------------------------------------------------------
    def _check_inputs(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x.dim() == 4 and cfg.n_encoders == 1:
            x = x.unsqueeze(1)
        expected = (cfg.n_encoders, cfg.channels, cfg.image_size, cfg.image_size)
        if x.dim() != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"model expects inputs of shape (batch, K={expected[0]}, C={expected[1]}, "
                f"{expected[2]}, {expected[3]}), got {tuple(x.shape)}"
            )
        return x

    def encode_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Means and log-variances of every encoder, each ``(K, B, L)``."""
        x = self._check_inputs(x)
        outs = [enc(x[:, k]) for k, enc in enumerate(self.encoders)]
        return torch.stack([m for m, _ in outs]), torch.stack([v for _, v in outs])

    @staticmethod
    def fuse(z_per_encoder: torch.Tensor) -> torch.Tensor:
        """Element-wise product over the encoder axis: only information shared by every
        encoder's input survives."""
        return torch.prod(z_per_encoder, dim=0)

    def sample(
        self, means: torch.Tensor, logvars: torch.Tensor, epsilon_std: float | None = None
    ) -> torch.Tensor:
        std = self.config.epsilon_std if epsilon_std is None else epsilon_std
        if std == 0:
            return means
        eps = torch.randn_like(means) * std
        return means + torch.exp(0.5 * logvars) * eps

    def forward(self, x: torch.Tensor, sample: bool = True) -> VAEOutput:
        means, logvars = self.encode_all(x)
        zk = self.sample(means, logvars) if sample else means
        z = self.fuse(zk)
        return VAEOutput(self.decoder(z), means, logvars, z)

    @torch.no_grad()
    def encode(
        self, x: torch.Tensor, sample: bool = False, inactive_to_zero: bool = True
    ) -> torch.Tensor:
        """Features ``(B, L)``: the fused latent, the product of the means unless ``sample``.

        Dimensions the model does not use (:attr:`active_mask`) are set to 0, their prior
        mean: the product fusion shrinks them ~1000-fold but not to zero, and what remains is
        residue of single encoders (nuisance included) that the decoder never reads.  Pass
        ``inactive_to_zero=False`` for the raw product."""
        means, logvars = self.encode_all(x)
        z = self.fuse(self.sample(means, logvars) if sample else means)
        if inactive_to_zero:
            z = torch.where(self.active_mask, z, torch.zeros((), dtype=z.dtype))  # +0.0, not -0.0
        return z

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from fused latents."""
        return torch.sigmoid(self.decoder(z))

    # -- loss ---------------------------------------------------------------------------
    def loss(self, out: VAEOutput, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reference loss, done right: recon (mean over pixels x S*S) + beta * mean_k KL_k.

        KL uses log-variance consistently: KL = -0.5 * sum(1 + logvar - mean^2 - exp(logvar)).
        BCE is computed from logits, so an all-zero or saturated target never gives NaN.
        """
        cfg = self.config
        scale = float(cfg.image_size**2)
        if cfg.recon_loss == "bce":
            rec = F.binary_cross_entropy_with_logits(out.recon_logits, target, reduction="none")
        else:
            rec = F.mse_loss(torch.sigmoid(out.recon_logits), target, reduction="none")
        rec = rec.flatten(1).mean(1) * scale  # per sample
        kl = -0.5 * torch.sum(1 + out.logvars - out.means.pow(2) - out.logvars.exp(), dim=-1)
        kl = kl.mean(0)  # average over encoders, per sample
        total = rec + cfg.beta * kl
        return {"loss": total.mean(), "recon": rec.mean(), "kl": kl.mean()}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
