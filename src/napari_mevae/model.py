"""The ME-VAE module: K parallel encoders, element-wise product fusion, one decoder.

K = 1 is the standard VAE baseline, a ``beta`` above 1 the beta-VAE baseline, K = 2 the
published reference and K >= 3 the paper's multi-nuisance set-up.  Everything is defined by a
:class:`~napari_mevae.config.MEVAEConfig`, which round-trips through JSON so a checkpoint always says what it holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ACTIVE_VARIANCE, MEVAEConfig

__all__ = ["MEVAE", "VAEOutput", "count_parameters"]


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
        if not self.training and h.device.type == "cpu":
            # oneDNN's transposed convolutions run 2-3x faster channels-last (a latent walk of
            # 128 dimensions at 128 px: 12 s -> 5 s); training already feeds channels-last
            h = h.contiguous(memory_format=torch.channels_last)
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


#: where an ME-VAE's encoder means start (the bias of their last layer).  At PyTorch's ~0 the
#: product fusion sits on its saddle; 0.5 and 1 both leave it (docs/benchmarks.md, "The product's
#: saddle"); 1 gave the product heavier tails, and k-means on two demo seeds of six split a class
FUSION_START = 0.5


class MEVAE(nn.Module):
    """Multi-encoder VAE.  ``forward`` takes ``(B, K, C, S, S)`` inputs, one slot per encoder."""

    def __init__(self, config: MEVAEConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.encoders = nn.ModuleList(Encoder(config) for _ in range(config.n_encoders))
        if config.n_encoders > 1:
            # The product fusion has a saddle at 0: each encoder's gradient is the product of
            # the others' means, and freshly initialised means are all near 0, so a run could
            # spend its whole budget there and end with no dimension in use.  Starting every
            # encoder's means at FUSION_START lets each encoder's reading through from the
            # first step; the KL prior then pulls the dimensions the cells do not need to 0.
            for encoder in self.encoders:
                nn.init.constant_(encoder.mean.bias, FUSION_START)
        self.decoder = Decoder(config)
        # variance over the training cells of each fused latent mean, measured by the trainer
        # during the last epoch; NaN = not measured (untrained)
        self.register_buffer("latent_variance", torch.full((config.latent_dim,), math.nan))
        # their mean and covariance, measured with it: the directions the model uses
        # (feature_projection); NaN in checkpoints written before they were measured
        dim = config.latent_dim
        self.register_buffer("latent_mean", torch.full((dim,), math.nan))
        self.register_buffer("latent_covariance", torch.full((dim, dim), math.nan))
        self._register_load_state_dict_pre_hook(_unmeasured_directions)

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

    def feature_projection(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(mean, P)``: features are ``mean + (z - mean) @ P``, the orthogonal projection onto
        the directions of the latent space the model uses (covariance eigenvalue >=
        ACTIVE_VARIANCE over the training cells, within the axes in use).

        Axes in use can carry one signal between them; what the features hold beside it is
        residue 1,000-fold smaller (nuisance included) that no distance sees but a linear probe
        that standardises every axis reads.  None while not measured, while no axis is in use
        (the features then stay whole, as :attr:`active_mask` keeps them), or when no direction
        is in use.  Computed on the CPU in float64 (MPS has neither), returned on the CPU."""
        cov, mean = self.latent_covariance.cpu(), self.latent_mean.cpu()
        if not bool(torch.isfinite(cov).all()) or not bool(torch.isfinite(mean).all()):
            return None
        axes = torch.nonzero(self.latent_variance.cpu() >= ACTIVE_VARIANCE).flatten()
        if len(axes) == 0:
            return None
        values, vectors = torch.linalg.eigh(cov[axes][:, axes].double())
        kept = vectors[:, values >= ACTIVE_VARIANCE]
        if kept.shape[1] == 0:
            return None
        proj = torch.zeros_like(cov, dtype=torch.float64)
        proj[axes[:, None], axes] = kept @ kept.T
        return mean, proj.to(cov.dtype)

    @property
    def n_directions(self) -> int | None:
        """Independent directions in use (see :meth:`feature_projection`); None if unmeasured."""
        proj = self.feature_projection()
        return None if proj is None else round(float(torch.trace(proj[1])))

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
        residue of single encoders (nuisance included) that the decoder never reads.  For the
        same reason the axes in use are projected onto the directions in use
        (:meth:`feature_projection`).  Pass ``inactive_to_zero=False`` for the raw product."""
        means, logvars = self.encode_all(x)
        z = self.fuse(self.sample(means, logvars) if sample else means)
        if inactive_to_zero:
            z = self.used_part(z)
        return z

    def used_part(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` (B, L) kept to the directions in use, the other axes 0 (see :meth:`encode`)."""
        proj = self.feature_projection()
        if proj is not None:
            mean, p = (t.to(z.device, z.dtype) for t in proj)
            z = mean + (z - mean) @ p
        return torch.where(self.active_mask, z, torch.zeros((), dtype=z.dtype))  # +0.0, not -0.0

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
        kl_dims = -0.5 * (1 + out.logvars - out.means.pow(2) - out.logvars.exp())  # (K, B, L)
        kl = kl_dims.sum(-1).mean(0)  # summed over dimensions, averaged over encoders
        if cfg.free_bits > 0:
            # free bits: a dimension's batch-mean KL below the floor costs the floor, so the
            # prior stops pulling a dimension in use back to zero
            penalty = kl_dims.mean(1).clamp_min(cfg.free_bits).sum(-1).mean()
        else:
            penalty = kl.mean()
        return {
            "loss": rec.mean() + cfg.beta * penalty,
            "recon": rec.mean(),
            "kl": kl.mean(),
            "kl_penalty": penalty,  # the KL term the loss weighs (what a warm-up ramps)
        }


def _unmeasured_directions(state: dict, prefix: str, *_args: object) -> None:
    """Checkpoints from before the directions were measured load with them unmeasured (NaN):
    their features keep every axis in use, as they did."""
    variance = state.get(prefix + "latent_variance")
    if variance is None:
        return
    dim = variance.shape[0]
    state.setdefault(prefix + "latent_mean", torch.full((dim,), math.nan))
    state.setdefault(prefix + "latent_covariance", torch.full((dim, dim), math.nan))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
