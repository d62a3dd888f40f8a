import json

import pytest
import torch

from napari_mevae.config import ACTIVE_VARIANCE, MEVAEConfig, model_kind, preset, size_scaled_beta
from napari_mevae.model import FUSION_START, MEVAE, count_parameters


def test_reference_preset_has_published_parameter_count():
    model = MEVAE(preset("reference"))
    assert count_parameters(model) == 4_964_737
    assert count_parameters(model.encoders[0]) == 2_128_832
    assert count_parameters(model.decoder) == 707_073


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("c", [1, 3, 24])
def test_shapes_for_k_encoders_and_channels(k, c):
    cfg = preset("tiny", n_encoders=k, channels=c)
    model = MEVAE(cfg)
    x = torch.rand(4, k, c, 32, 32)
    out = model(x)
    assert out.recon.shape == (4, c, 32, 32)
    assert out.means.shape == (k, 4, cfg.latent_dim)
    assert out.z.shape == (4, cfg.latent_dim)
    assert float(out.recon.min()) >= 0 and float(out.recon.max()) <= 1
    terms = model.loss(out, torch.rand(4, c, 32, 32))
    assert all(torch.isfinite(v) for v in terms.values())


def test_k1_accepts_plain_batches_and_rejects_wrong_shapes():
    model = MEVAE(preset("tiny", n_encoders=1))
    assert model.encode(torch.rand(3, 1, 32, 32)).shape == (3, 8)
    two = MEVAE(preset("tiny", n_encoders=2))
    with pytest.raises(ValueError, match=r"K=2"):
        two(torch.rand(3, 1, 1, 32, 32))


def test_image_size_must_be_multiple_of_two_to_the_nlayers():
    with pytest.raises(ValueError, match=r"multiple of 2\*\*nlayers = 8"):
        MEVAEConfig(image_size=36, nlayers=3)
    MEVAEConfig(image_size=48, nlayers=4)  # 48 = 3 * 16 works
    for bad in (
        dict(channels=0),
        dict(latent_dim=-1),
        dict(kernel_size=4),
        dict(n_encoders=0),
        dict(beta=-1),
    ):
        with pytest.raises(ValueError):
            MEVAEConfig(**bad)


def test_config_json_round_trip_and_unknown_fields():
    cfg = preset("reference", n_encoders=3, beta=2.5, nuisances=["rotation", "polarity", "scale"])
    again = MEVAEConfig.from_json(cfg.to_json())
    assert again == cfg
    data = json.loads(cfg.to_json())
    data["bogus"] = 1
    with pytest.raises(ValueError, match="bogus"):
        MEVAEConfig.from_dict(data)
    assert cfg.diff(preset("reference")) == {
        "n_encoders": (3, 2),
        "beta": (2.5, 1.0),
        "nuisances": (["rotation", "polarity", "scale"], []),
    }


def test_encode_is_deterministic_product_of_means_and_sampling_is_optional():
    torch.manual_seed(0)
    model = MEVAE(preset("tiny", n_encoders=3))
    x = torch.rand(5, 3, 1, 32, 32)
    a, b = model.encode(x), model.encode(x)
    assert torch.equal(a, b)
    means, _ = model.encode_all(x)
    assert torch.allclose(a, means[0] * means[1] * means[2])
    s1, s2 = model.encode(x, sample=True), model.encode(x, sample=True)
    assert not torch.equal(s1, s2)


@pytest.mark.parametrize("k", [2, 3])
def test_an_untrained_mevae_starts_off_the_saddle_of_the_product(k):
    """Freshly initialised means near 0 multiply to ~0, and so do their gradients: an ME-VAE
    could train its whole budget without a dimension in use.  Means start at FUSION_START."""
    torch.manual_seed(0)
    model = MEVAE(preset("tiny", n_encoders=k))
    cells = torch.rand(64, 1, 1, 32, 32).expand(-1, k, -1, -1, -1)
    means, _ = model.encode_all(cells)
    assert torch.allclose(means.mean((1, 2)), torch.full((k,), FUSION_START), atol=0.1)
    fused = model.fuse(means)
    # the product's spread over cells is the encoders' spreads times FUSION_START ** (K - 1),
    # not their product (near 0 * 0 it would be ~1000x smaller)
    spread = float(means.std(1).mean()) * FUSION_START ** (k - 1)
    assert float(fused.std(0).mean()) > 0.5 * spread
    fused.pow(2).sum().backward()
    grad = model.encoders[0].mean.weight.grad.abs().mean()
    assert float(grad) > 0.1 * float(model.encoders[0].mean.weight.abs().mean())
    # a VAE keeps PyTorch's initialisation: nothing to multiply
    vae = MEVAE(preset("tiny", n_encoders=1))
    assert float(vae.encode_all(cells[:, :1])[0].mean().abs()) < 0.2


def test_unused_latent_dimensions_are_zero_in_the_features():
    torch.manual_seed(0)
    model = MEVAE(preset("tiny", n_encoders=2))  # latent 8
    x = torch.rand(6, 2, 1, 32, 32)
    raw = model.encode(x, inactive_to_zero=False)
    # not measured yet (NaN): every dimension counts as used
    assert torch.isnan(model.latent_variance).all() and model.n_active == 8
    assert torch.equal(model.encode(x), raw)
    var = torch.tensor([1.0, 0.5 * ACTIVE_VARIANCE, 2 * ACTIVE_VARIANCE, 0.0, 3.0, 1e-6, 0.2, 0.02])
    model.latent_variance.copy_(var)
    active = var >= ACTIVE_VARIANCE
    assert torch.equal(model.active_mask, active) and model.n_active == 5
    z = model.encode(x)
    assert (z[:, ~active] == 0).all() and not torch.signbit(z[:, ~active]).any()  # no "-0.0"
    assert torch.equal(z[:, active], raw[:, active])
    assert (model.encode(x, sample=True)[:, ~active] == 0).all()
    assert torch.equal(model.encode(x, inactive_to_zero=False), raw)
    # nothing in use yet (a barely trained model): the features stay whole, not all zero
    model.latent_variance.fill_(1e-5)
    assert model.activity_measured and model.n_active == 0
    assert torch.equal(model.encode(x), raw)


def _measure(model, mean, cov):
    model.latent_mean.copy_(mean)
    model.latent_covariance.copy_(cov)
    model.latent_variance.copy_(torch.diagonal(cov))


def test_features_keep_only_the_directions_in_use():
    torch.manual_seed(0)
    model = MEVAE(preset("tiny", n_encoders=2))  # latent 8
    x = torch.rand(6, 2, 1, 32, 32)
    raw = model.encode(x, inactive_to_zero=False)
    assert model.feature_projection() is None and model.n_directions is None
    # axes 0-2 in use but varying together: one direction v (variance 4) plus a second one of
    # variance 1e-4 (below ACTIVE_VARIANCE), the pose residue of trained models; axis 3 unused
    v = torch.tensor([0.6, 0.8, 0.0] + [0.0] * 5)
    w = torch.tensor([0.8, -0.6, 0.0] + [0.0] * 5)
    cov = 4.0 * torch.outer(v, v) + 1e-4 * torch.outer(w, w)
    cov[2, 2] = 0.5  # an axis in use on its own
    cov[3, 3] = 1e-3
    mean = torch.linspace(-1, 1, 8)
    _measure(model, mean, cov)
    assert model.n_active == 3 and model.n_directions == 2
    z = model.encode(x)
    assert (z[:, 3:] == 0).all() and not torch.signbit(z[:, 3:]).any()
    # what is left of each cell lies in the plane of v and axis 2, through the training mean
    off = (z - mean)[:, :3]
    residue = off - torch.outer(off @ v[:3], v[:3]) - torch.outer(off[:, 2], torch.eye(3)[2])
    assert float(residue.abs().max()) < 1e-5
    torch.testing.assert_close(off @ v[:3], (raw - mean)[:, :3] @ v[:3])
    torch.testing.assert_close(z[:, 2], raw[:, 2])
    assert torch.equal(model.encode(x, inactive_to_zero=False), raw)
    # no direction above the threshold (a barely trained model): the axis rule alone
    _measure(model, mean, cov * 1e-4)
    assert model.feature_projection() is None and torch.equal(model.encode(x), raw)
    # no axis in use, though together they vary in one direction above the threshold: the
    # features stay whole, as documented for a model that uses no dimension yet
    u = torch.full((8,), 8**-0.5)
    _measure(model, mean, 0.05 * torch.outer(u, u))
    assert model.n_active == 0 and model.feature_projection() is None
    assert torch.equal(model.encode(x), raw)


def test_checkpoints_from_before_the_directions_load_unmeasured():
    model = MEVAE(preset("tiny", n_encoders=2))
    model.latent_variance.fill_(0.5)
    state = {
        k: t for k, t in model.state_dict().items() if k not in ("latent_mean", "latent_covariance")
    }
    other = MEVAE(preset("tiny", n_encoders=2))
    other.load_state_dict(state)
    assert torch.isnan(other.latent_covariance).all() and other.feature_projection() is None
    x = torch.rand(3, 2, 1, 32, 32)
    torch.testing.assert_close(other.encode(x), model.encode(x))


def test_latent_variance_travels_with_the_state_dict():
    model = MEVAE(preset("tiny"))
    model.latent_variance.fill_(0.5)
    state = model.state_dict()
    assert torch.equal(state["latent_variance"], torch.full((8,), 0.5))
    other = MEVAE(preset("tiny"))
    other.load_state_dict(state)
    assert torch.equal(other.latent_variance, model.latent_variance)
    assert other.n_active == 8


def test_kl_is_correct_in_log_variance_and_beta_weights_it():
    cfg = preset("tiny", n_encoders=2, beta=3.0)
    model = MEVAE(cfg)
    out = model(torch.rand(2, 2, 1, 32, 32))
    mu, lv = out.means, out.logvars
    # KL(N(mu, var) || N(0,1)) = 0.5 * sum(var + mu^2 - 1 - log var)
    expected = (0.5 * (lv.exp() + mu**2 - 1 - lv).sum(-1)).mean(0).mean()
    terms = model.loss(out, torch.rand(2, 1, 32, 32))
    assert torch.allclose(terms["kl"], expected, rtol=1e-5)
    assert torch.allclose(terms["loss"], terms["recon"] + 3.0 * terms["kl"], rtol=1e-5)


def test_bce_scaled_by_pixel_count_and_mse_option():
    model = MEVAE(preset("tiny", n_encoders=1))
    out = model(torch.rand(2, 1, 1, 32, 32))
    target = torch.rand(2, 1, 32, 32)
    bce = torch.nn.functional.binary_cross_entropy(out.recon, target) * 32 * 32
    assert torch.allclose(model.loss(out, target)["recon"], bce, rtol=1e-4)
    model.config.recon_loss = "mse"
    mse = torch.nn.functional.mse_loss(out.recon, target) * 32 * 32
    assert torch.allclose(model.loss(out, target)["recon"], mse, rtol=1e-4)


def test_all_zero_images_give_finite_loss():
    model = MEVAE(preset("tiny"))
    out = model(torch.zeros(2, 2, 1, 32, 32))
    terms = model.loss(out, torch.zeros(2, 1, 32, 32))
    assert torch.isfinite(terms["loss"])


def test_in_place_relu_gives_the_same_gradients_as_out_of_place():
    torch.manual_seed(0)
    model = MEVAE(preset("tiny", n_encoders=2))
    x, target = torch.rand(3, 2, 1, 32, 32), torch.rand(3, 1, 32, 32)

    def grads(m):
        torch.manual_seed(1)
        m.zero_grad(set_to_none=True)
        m.loss(m(x), target)["loss"].backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    in_place = grads(model)
    assert any(isinstance(m, torch.nn.ReLU) and m.inplace for m in model.modules())
    for m in model.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    out_of_place = grads(model)
    assert all(torch.equal(in_place[n], out_of_place[n]) for n in in_place)


def test_decoder_adds_the_bias_apart_with_the_same_outputs_gradients_and_keys():
    torch.manual_seed(0)
    model = MEVAE(preset("tiny", n_encoders=2)).to(memory_format=torch.channels_last)
    keys = {k: v.shape for k, v in MEVAE(preset("tiny", n_encoders=2)).state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    assert "decoder.deconvs.0.bias" in keys and "decoder.deconvs.6.weight" in keys
    dec = model.decoder.double()  # float64: no summation-order noise between the two paths
    z = torch.randn(3, 8, dtype=torch.float64)

    def run(forward):
        dec.zero_grad(set_to_none=True)
        out = forward(z)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in dec.named_parameters()}

    def sequential(z):  # the plain nn.Sequential call: bias inside the convolutions
        h = torch.relu(dec.dense(z)).view(-1, dec.enc_channels, dec.side, dec.side)
        return dec.deconvs(h)

    out, grads = run(dec)
    ref_out, ref_grads = run(sequential)
    torch.testing.assert_close(out, ref_out)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], msg=name)


def test_size_scaled_beta_keeps_the_reference_balance():
    assert size_scaled_beta(1.0, 128) == 1.0
    assert size_scaled_beta(1.0, 32) == 0.0625
    assert size_scaled_beta(4.0, 64) == 1.0


def test_model_kind_reads_plain_and_size_scaled_kl_weights():
    assert model_kind(preset("mevae", image_size=32, beta=0.25)) == "ME-VAE"
    assert model_kind(preset("vae")) == "VAE"  # the reference's beta 1
    assert model_kind(preset("vae", image_size=32, beta=size_scaled_beta(1.0, 32))) == "VAE"
    assert model_kind(preset("betavae")) == "beta-VAE"
    # a beta-VAE scaled to 32 px has beta 0.25 < 1 and is still a beta-VAE
    assert (
        model_kind(preset("betavae", image_size=32, beta=size_scaled_beta(4.0, 32))) == "beta-VAE"
    )


def test_decoding_for_analysis_runs_channels_last_with_the_same_result():
    model = MEVAE(preset("tiny")).eval()
    z = torch.randn(5, 8)
    with torch.no_grad():
        fast = model.decode(z)
        model.decoder.train()  # the training path: no layout change
        plain = torch.sigmoid(model.decoder(z))
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
