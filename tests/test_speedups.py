"""speedups: FusedRMSprop (torch's RMSprop update, state and fallbacks, in one fused loop on
CPU), precision probing, malloc tuning and the whole-batch loader."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from blobs import Blobs
from napari_mevae import speedups
from napari_mevae.config import TrainOptions, preset
from napari_mevae.speedups import BatchLoader, FusedRMSprop
from napari_mevae.training import EpochSampler, Trainer


def small_net() -> nn.Module:
    """A conv layer held channels_last (as the trainer holds the model) and dense layers."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 8, 3), nn.Flatten(), nn.Linear(288, 64), nn.ReLU(), nn.Linear(64, 300)
    )
    return net.to(memory_format=torch.channels_last)


def train(net: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(5, 2, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
        loss = net(x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def assert_close_states(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert float(sa[k]["step"]) == float(sb[k]["step"])
        torch.testing.assert_close(sa[k]["square_avg"], sb[k]["square_avg"], rtol=1e-5, atol=1e-9)


def test_same_update_as_torch_rmsprop():
    ref, net = small_net(), small_net()
    torch_opt = torch.optim.RMSprop(ref.parameters(), lr=1e-3)
    fused = FusedRMSprop(net.parameters(), lr=1e-3)
    # one step from the same gradients: equal to float rounding (torch's sqrt is approximate)
    for model in (ref, net):
        model(torch.ones(2, 2, 8, 8)).sum().backward()
    torch_opt.step()
    fused.step()
    assert fused.last_step_fused
    for p, q in zip(ref.parameters(), net.parameters(), strict=True):
        # within ~2 float32 ulp of the parameter or of the update (~1e-2 at this learning rate)
        torch.testing.assert_close(q, p, rtol=3e-7, atol=1e-8)
        assert q.stride() == p.stride()  # channels_last kept
    assert_close_states(torch_opt, fused)
    # and a short training run follows the same path
    la, lb = train(ref, torch_opt, 15), train(net, fused, 15)
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=0)
    for p, q in zip(ref.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-5)


def test_state_dicts_load_in_either_optimizer():
    net = small_net()
    fused = FusedRMSprop(net.parameters(), lr=1e-3)
    train(net, fused, 3)
    saved_net, saved_state = copy.deepcopy(net.state_dict()), copy.deepcopy(fused.state_dict())
    # continue with torch's RMSprop from the fused state, and with the fused one
    a, b = small_net(), small_net()
    a.load_state_dict(saved_net)
    b.load_state_dict(saved_net)
    oa, ob = torch.optim.RMSprop(a.parameters(), lr=1e-3), FusedRMSprop(b.parameters(), lr=1e-3)
    oa.load_state_dict(saved_state)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))  # and back: torch's format is ours
    la, lb = train(a, oa, 3, seed=2), train(b, ob, 3, seed=2)
    assert ob.last_step_fused
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=0)
    assert_close_states(oa, ob)
    assert float(ob.state_dict()["state"][0]["step"]) == 6


@pytest.mark.parametrize(
    "options", [dict(momentum=0.9), dict(centered=True), dict(weight_decay=1e-2)]
)
def test_options_the_loop_lacks_run_torchs_step(options):
    ref, net = small_net(), small_net()
    oa = torch.optim.RMSprop(ref.parameters(), lr=1e-3, **options)
    ob = FusedRMSprop(net.parameters(), lr=1e-3, **options)
    assert train(net, ob, 4) == train(ref, oa, 4)  # bit for bit: it is torch's step
    assert not ob.last_step_fused
    for p, q in zip(ref.parameters(), net.parameters(), strict=True):
        assert torch.equal(p, q)


def test_without_the_kernel_or_with_odd_layouts_torch_steps(monkeypatch):
    ref, net = small_net(), small_net()
    oa, ob = torch.optim.RMSprop(ref.parameters(), lr=1e-3), FusedRMSprop(net.parameters(), lr=1e-3)
    monkeypatch.setattr(speedups, "_KERNEL", False)  # e.g. numba missing
    assert train(net, ob, 3) == train(ref, oa, 3)
    assert not ob.last_step_fused
    monkeypatch.undo()
    # a transposed parameter with a contiguous gradient: no common flat order
    w = nn.Parameter(torch.ones(4, 3).t())
    opt = FusedRMSprop([w], lr=0.1)
    w.grad = torch.ones(3, 4)
    opt.step()
    assert not opt.last_step_fused
    assert torch.all(w < 1)  # torch's step ran


def test_closure_is_evaluated_once():
    net = small_net()
    opt = FusedRMSprop(net.parameters(), lr=1e-3)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = net(torch.ones(1, 2, 8, 8)).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1 and torch.is_tensor(loss) and opt.last_step_fused


def test_trainer_uses_it_on_cpu():
    data = torch.utils.data.TensorDataset(torch.rand(8, 2, 1, 32, 32), torch.rand(8, 1, 32, 32))
    cfg = preset("tiny", n_encoders=2)
    trainer = Trainer(cfg, data, TrainOptions(epochs=1, batch_size=4, seed=0, device="cpu"))
    assert isinstance(trainer.optimizer, FusedRMSprop)
    trainer.train()
    assert trainer.optimizer.last_step_fused


def test_zero_grad_drops_or_zeroes_the_gradients():
    net = small_net()
    opt = FusedRMSprop(net.parameters(), lr=1e-3)
    net(torch.ones(1, 2, 8, 8)).sum().backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in net.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in net.parameters())


# -- precision, malloc, batch loader ----------------------------------------------------------
def test_precision_auto_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    assert speedups.resolve_precision("float32", cpu) == "float32"
    monkeypatch.setattr(speedups, "bf16_supported", lambda device: True)
    monkeypatch.setattr(speedups, "_cpu_flags", lambda: {"avx2", "avx512f"})
    # AVX-512 without native bf16: oneDNN would only emulate it, so auto stays float32
    assert speedups.resolve_precision("auto", cpu) == "float32"
    assert speedups.resolve_precision("bf16", cpu) == "bf16"  # asked for explicitly
    monkeypatch.setattr(speedups, "_cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert speedups.resolve_precision("auto", cpu) == "bf16"
    trainer = Trainer(preset("tiny"), Blobs(), TrainOptions(epochs=1, batch_size=8))
    assert trainer.precision == "bf16" and trainer._autocast == torch.bfloat16
    pinned = Trainer(preset("tiny"), Blobs(), TrainOptions(precision="float32", batch_size=8))
    assert pinned.precision == "float32" and pinned._autocast is None and pinned.scaler is None
    monkeypatch.setattr(speedups, "bf16_supported", lambda device: False)
    assert speedups.resolve_precision("bf16", cpu) == "float32"  # unsupported: float32
    assert speedups.resolve_precision("fp16", cpu) == "fp16"  # asked for: emulated, but runs
    assert speedups.resolve_precision("auto", torch.device("mps")) == "float32"
    with pytest.raises(ValueError, match="precision must be one of auto, float32, bf16, fp16"):
        TrainOptions(precision="half").validate()


def test_precision_auto_on_gpus_with_and_without_native_bf16(monkeypatch):
    """Ampere and later run bf16 natively; on a T4 or V100 torch only emulates bf16 (its
    ``is_bf16_supported()`` still says True), and float16 with loss scaling is the fast AMP."""
    cuda = torch.device("cuda")
    major = {"value": 7}

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return major["value"] >= 8 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert speedups.resolve_precision("auto", cuda) == "fp16"  # T4 / V100
    assert speedups.resolve_precision("bf16", cuda) == "bf16"  # asked for: emulated
    assert speedups.resolve_precision("fp16", cuda) == "fp16"
    major["value"] = 8
    assert speedups.resolve_precision("auto", cuda) == "bf16"  # A100, RTX 30xx and later
    assert speedups.resolve_precision("float32", cuda) == "float32"


def test_malloc_tuning_is_scoped_to_the_run():
    trainer = Trainer(preset("tiny"), Blobs(n=8), TrainOptions(epochs=1, batch_size=4, seed=0))
    gen = trainer.run()
    next(gen)
    if speedups.sys.platform.startswith("linux"):
        assert speedups._malloc_users == 1  # tuned while the run is live
    gen.close()  # the consumer stops early: still restored
    assert speedups._malloc_users == 0
    trainer = Trainer(preset("tiny"), Blobs(n=8), TrainOptions(epochs=1, batch_size=4, seed=0))
    trainer.train()
    assert speedups._malloc_users == 0


def test_batch_loader_matches_dataloader_batches_for_tensor_datasets():
    ds = TensorDataset(torch.arange(23.0)[:, None], torch.arange(23) * 2)
    sampler = EpochSampler(23, seed=5, rank=1, world=2)
    sampler.set_epoch(4)
    fast = list(BatchLoader(ds, sampler, 4))
    slow = list(DataLoader(ds, batch_size=4, sampler=sampler))
    assert len(fast) == len(slow) == len(BatchLoader(ds, sampler, 4)) == 3
    for (a, b), (c, d) in zip(fast, slow, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)
