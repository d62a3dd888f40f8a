"""The trainer: reports, seeding, resume, stopping, divergence, early stopping, KL warm-up,
precision and the fast paths.  Checkpoint files are in test_checkpoints.py; precision probing,
malloc tuning and the batch loader in test_speedups.py."""

import math

import numpy as np
import pytest
import torch

from blobs import Blobs
from napari_mevae.checkpoints import load_checkpoint, save_checkpoint
from napari_mevae.config import CheckpointError, TrainingDiverged, TrainOptions, preset
from napari_mevae.model import MEVAE
from napari_mevae.training import Trainer, select_device


def run_all(trainer):
    return list(trainer.run())


def test_loss_decreases_and_reports_are_complete(tmp_path):
    ds = Blobs()
    cfg = preset("tiny", latent_dim=4)
    trainer = Trainer(
        cfg, ds, TrainOptions(epochs=6, batch_size=8, learn_rate=2e-3, seed=1, save_dir=tmp_path)
    )
    reports = run_all(trainer)
    epochs = [r for r in reports if r.kind == "epoch"]
    steps = [r for r in reports if r.kind == "step"]
    assert [r.epoch for r in epochs] == [1, 2, 3, 4, 5, 6]
    assert len(steps) == 6 * 4 and all(r.steps_per_epoch == 4 for r in steps)
    assert epochs[-1].loss < 0.8 * epochs[0].loss
    assert all(r.images_per_s > 0 and math.isfinite(r.recon) and math.isfinite(r.kl) for r in steps)
    assert reports[-1].kind == "end" and reports[-1].reason == "done"
    assert ds.epochs_seen == list(range(6))  # fresh nuisances get a set_epoch call each epoch
    assert (tmp_path / "models" / "checkpoint.pt").is_file()
    assert (tmp_path / "models" / "checkpoint.json").is_file()
    assert steps[-1].progress == pytest.approx(1.0)


def test_seeded_runs_reproduce_the_same_losses():
    def losses():
        t = Trainer(preset("tiny"), Blobs(), TrainOptions(epochs=2, batch_size=8, seed=7))
        return [r.loss for r in t.run() if r.kind == "step"]

    assert losses() == losses()


def test_trainer_measures_which_latent_dimensions_are_used(tmp_path):
    ds = Blobs(n=24)
    # a learning rate so small that the weights stay put: the variance measured during the
    # last epoch must equal the variance of the fused means recomputed afterwards
    opts = TrainOptions(
        epochs=2, batch_size=8, learn_rate=1e-12, seed=0, save_dir=tmp_path, precision="float32"
    )
    model = Trainer(preset("tiny"), ds, opts).train()
    means, _ = model.encode_all(torch.from_numpy(ds.inputs))
    expected = torch.prod(means, 0).var(0, unbiased=False).detach()
    assert torch.isfinite(model.latent_variance).all()
    torch.testing.assert_close(model.latent_variance, expected, rtol=1e-3, atol=1e-9)
    # and their mean and covariance, for the directions in use
    fused = torch.prod(means, 0).detach().double()
    torch.testing.assert_close(model.latent_mean, fused.mean(0).float(), rtol=1e-3, atol=1e-6)
    cov = torch.cov(fused.T, correction=0).float()
    torch.testing.assert_close(model.latent_covariance, cov, rtol=1e-3, atol=1e-6)
    # it travels with the checkpoint
    again = load_checkpoint(tmp_path).build_model()
    assert torch.equal(again.latent_variance, model.latent_variance)
    assert torch.equal(again.latent_covariance, model.latent_covariance)
    assert torch.equal(again.active_mask, model.active_mask)


def test_resume_with_a_different_architecture_names_the_difference(tmp_path):
    model = MEVAE(preset("tiny", channels=1))
    ck = load_checkpoint(save_checkpoint(tmp_path / "m.pt", model))
    with pytest.raises(CheckpointError, match=r"channels \(checkpoint 1, now 3\)"):
        Trainer(preset("tiny", channels=3), Blobs(c=3), TrainOptions(epochs=1), resume=ck)


def test_resume_continues_where_it_stopped(tmp_path):
    ds = Blobs()
    opts = dict(batch_size=8, seed=3, save_dir=tmp_path)
    run_all(Trainer(preset("tiny"), ds, TrainOptions(epochs=2, **opts)))
    ck = load_checkpoint(tmp_path)
    assert ck.epoch == 2 and len(ck.history) == 2
    reports = run_all(Trainer(ck.build_model(), ds, TrainOptions(epochs=2, **opts), resume=ck))
    assert [r.epoch for r in reports if r.kind == "epoch"] == [3, 4]
    assert load_checkpoint(tmp_path).epoch == 4


def test_resume_keeps_the_optimizer_state_but_takes_the_new_learning_rate(tmp_path):
    ds = Blobs()
    run_all(Trainer(preset("tiny"), ds, TrainOptions(epochs=1, batch_size=8, save_dir=tmp_path)))
    ck = load_checkpoint(tmp_path)
    saved = ck.optimizer_state["state"][0]["square_avg"]
    more = Trainer(ck.build_model(), ds, TrainOptions(epochs=0, learn_rate=1e-2), resume=ck)
    assert torch.equal(more.optimizer.state_dict()["state"][0]["square_avg"], saved)
    assert [g["lr"] for g in more.optimizer.param_groups] == [1e-2]


def test_a_run_that_never_steps_makes_no_optimizer_and_keeps_the_saved_state(tmp_path):
    """Creating a torch optimizer imports its compiler stack (seconds): `--epochs 0` skips it."""
    ds = Blobs()
    run_all(Trainer(preset("tiny"), ds, TrainOptions(epochs=1, batch_size=8, save_dir=tmp_path)))
    ck = load_checkpoint(tmp_path)
    again = Trainer(ck.build_model(), ds, TrainOptions(epochs=0, save_dir=tmp_path), resume=ck)
    run_all(again)
    assert again._optimizer is None
    kept = load_checkpoint(tmp_path).optimizer_state
    assert torch.equal(kept["state"][0]["square_avg"], ck.optimizer_state["state"][0]["square_avg"])


def test_stop_between_steps_keeps_model_and_checkpoint(tmp_path):
    trainer = Trainer(
        preset("tiny"), Blobs(), TrainOptions(epochs=5, batch_size=4, seed=0, save_dir=tmp_path)
    )
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    steps = 0
    reports = []
    for r in trainer.run():
        reports.append(r)
        if r.kind == "step":
            steps += 1
            if steps == 3:
                trainer.stop()
    assert steps == 3  # stopped right after the step that asked
    assert reports[-1].kind == "end" and reports[-1].reason == "stopped"
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trained weights kept
    assert (tmp_path / "models" / "checkpoint.pt").is_file()


def test_closing_the_generator_saves_a_checkpoint(tmp_path):
    trainer = Trainer(
        preset("tiny"), Blobs(), TrainOptions(epochs=5, batch_size=4, seed=0, save_dir=tmp_path)
    )
    gen = trainer.run()
    for _ in range(2):
        next(gen)
    gen.close()
    ck = load_checkpoint(tmp_path)
    x = torch.from_numpy(Blobs().inputs[:4])
    assert torch.equal(ck.build_model().encode(x), trainer.model.cpu().eval().encode(x))


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_weights(tmp_path):
    ds = Blobs()
    trainer = Trainer(
        preset("tiny"), ds, TrainOptions(epochs=3, batch_size=8, seed=0, save_dir=tmp_path)
    )
    gen = trainer.run()
    for r in gen:
        if r.kind == "epoch":
            break
    good = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    ds.inputs[:] = np.nan  # poison the data
    with pytest.raises(TrainingDiverged, match="loss became nan.*last good weights"):
        list(gen)
    assert all(torch.equal(good[k], v) for k, v in trainer.model.state_dict().items())
    ck = load_checkpoint(tmp_path)
    assert ck.epoch == 1 and all(torch.isfinite(v).all() for v in ck.model_state.values())


def _count_saves(monkeypatch) -> list[int]:
    """The epochs of every checkpoint the trainer writes."""
    import napari_mevae.training as training

    saved: list[int] = []
    real = training.save_checkpoint

    def counting(path, model, optimizer, epoch, **kw):
        saved.append(epoch)
        return real(path, model, optimizer, epoch=epoch, **kw)

    monkeypatch.setattr(training, "save_checkpoint", counting)
    return saved


def test_checkpoints_are_written_at_most_every_checkpoint_seconds(tmp_path, monkeypatch):
    """After the first epoch, then once CHECKPOINT_SECONDS have passed, and at the end: the
    napari sample's 1,000 short epochs wrote 1,000 checkpoints of 7 MB."""
    import napari_mevae.training as training

    saved = _count_saves(monkeypatch)
    monkeypatch.setattr(training, "CHECKPOINT_SECONDS", 1e9)
    opts = TrainOptions(epochs=4, batch_size=8, seed=0, save_dir=tmp_path)
    reports = run_all(Trainer(preset("tiny"), Blobs(), opts))
    epochs = [r for r in reports if r.kind == "epoch"]
    assert [bool(r.checkpoint) for r in epochs] == [True, False, False, False]
    assert saved == [1, 4]  # the first epoch and the end
    assert reports[-1].checkpoint == str(tmp_path / "models" / "checkpoint.pt")
    ck = load_checkpoint(tmp_path)
    assert ck.epoch == 4 and len(ck.history) == 4
    saved.clear()
    monkeypatch.setattr(training, "CHECKPOINT_SECONDS", 0.0)
    run_all(Trainer(preset("tiny"), Blobs(), opts))
    assert saved == [1, 2, 3, 4, 4]  # every epoch, as before, and the end


def test_a_diverged_run_saves_its_last_good_weights_not_an_older_checkpoint(tmp_path, monkeypatch):
    import napari_mevae.training as training

    saved = _count_saves(monkeypatch)
    monkeypatch.setattr(training, "CHECKPOINT_SECONDS", 1e9)
    ds = Blobs()
    opts = TrainOptions(epochs=4, batch_size=8, seed=0, save_dir=tmp_path)
    trainer = Trainer(preset("tiny"), ds, opts)
    gen = trainer.run()
    for r in gen:
        if r.kind == "epoch" and r.epoch == 2:
            break
    assert saved == [1]  # epoch 2 was not saved: too soon after epoch 1
    good = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    ds.inputs[:] = np.nan
    with pytest.raises(TrainingDiverged, match="last good weights were kept \\(checkpoint"):
        list(gen)
    assert saved == [1, 2]
    ck = load_checkpoint(tmp_path)
    assert ck.epoch == 2 and len(ck.history) == 2
    assert all(torch.equal(good[k].cpu(), ck.model_state[k]) for k in good)


@pytest.fixture
def plain_patience(monkeypatch):
    """Early stopping as the options say, every dimension counted as in use: the rules that
    delay it (enough images, a latent space in use) are tested on their own below."""
    import napari_mevae.model
    import napari_mevae.training

    monkeypatch.setattr(napari_mevae.training, "patience_epochs", lambda patience, n: patience)
    monkeypatch.setattr(napari_mevae.model, "ACTIVE_VARIANCE", 0.0)


def test_early_stopping_with_patience(plain_patience):
    trainer = Trainer(
        preset("tiny"),
        Blobs(),
        TrainOptions(epochs=50, batch_size=8, learn_rate=1e-12, patience=2, seed=0, min_delta=1e6),
    )
    reports = run_all(trainer)
    assert reports[-1].reason == "early_stop"
    assert len([r for r in reports if r.kind == "epoch"]) == 3  # 1 best + 2 without improvement


def test_early_stopping_waits_for_enough_images_and_a_latent_space_in_use(monkeypatch):
    from napari_mevae.config import patience_epochs

    assert patience_epochs(8, 40) == 125 and patience_epochs(8, 100_000) == 8
    opts = TrainOptions(epochs=12, batch_size=8, learn_rate=1e-12, patience=2, min_delta=1e6)
    # 32 cells: patience 2 epochs would be 64 images; it waits for 5,000 (157 epochs)
    import napari_mevae.model

    monkeypatch.setattr(napari_mevae.model, "ACTIVE_VARIANCE", 0.0)
    assert Trainer(preset("tiny"), Blobs(), opts).patience == 157
    assert run_all(Trainer(preset("tiny"), Blobs(), opts))[-1].reason == "done"
    # a model that uses no latent dimension has not learned yet: no early stop either
    import napari_mevae.training

    monkeypatch.setattr(napari_mevae.training, "patience_epochs", lambda patience, n: patience)
    monkeypatch.setattr(napari_mevae.model, "ACTIVE_VARIANCE", float("inf"))
    reports = run_all(Trainer(preset("tiny"), Blobs(), opts))
    assert reports[-1].reason == "done" and reports[-1].epoch == 12


def test_default_budget_counts_images_seen():
    from napari_mevae.config import default_epochs

    assert default_epochs(40) == 1000  # the floor: 40,000 images for the napari sample
    assert default_epochs(2000) == 30  # 30 passes over mid-sized sets
    assert default_epochs(1_000_000) == 1  # capped at 400,000 images (rounded to whole epochs)
    trainer = Trainer(preset("tiny"), Blobs(n=32), TrainOptions())
    assert trainer.epochs == 1250


def test_the_default_budget_grows_while_the_loss_still_falls(monkeypatch):
    import napari_mevae.training
    from napari_mevae.config import max_budget_epochs

    assert max_budget_epochs(40) == 1000  # the sample's floor is already more than 100 passes
    assert max_budget_epochs(600) == 100 and max_budget_epochs(1500) == 100  # 100 passes
    assert max_budget_epochs(20_000) == 20  # the cap (400,000 images) as for the budget

    monkeypatch.setattr(napari_mevae.training, "default_epochs", lambda n: 9)
    monkeypatch.setattr(napari_mevae.training, "max_budget_epochs", lambda n: 20)

    def epochs_of(**kw):
        opts = TrainOptions(batch_size=8, seed=0, earlystop=False, **kw)
        trainer = Trainer(preset("tiny"), Blobs(n=16), opts)
        reports = run_all(trainer)
        return trainer, [r for r in reports if r.kind == "epoch"], reports[-1]

    # a fresh model's loss still falls at the end of 9 epochs: it trains on, a third at a time
    trainer, epochs, end = epochs_of()
    grew = [r for r in epochs if r.message]
    assert grew[0].epoch == 9 and grew[0].epochs == 12, [(r.epoch, r.epochs) for r in grew]
    assert "still falling: training on to epoch 12 (at most 20)" in grew[0].message
    assert 12 <= len(epochs) <= 20 and end.epoch == len(epochs) == len(trainer.history)
    assert all(r.epochs == len(epochs) for r in [end, epochs[-1]])
    # every growth came when the end-of-training note's rule said the loss was still falling
    from napari_mevae.workflow import still_learning

    for r in grew:
        assert still_learning(trainer.history[: r.epoch]) is not None
    # epochs given explicitly are exactly what runs; a flat loss stops at the budget
    for kw in ({"epochs": 9}, {"learn_rate": 1e-12}):
        _, epochs, end = epochs_of(**kw)
        assert len(epochs) == 9 and end.epochs == 9 and not any(r.message for r in epochs), kw


def test_kl_warmup_ramps_the_kl_weight_and_delays_early_stopping(plain_patience):
    cfg = preset("tiny", latent_dim=4, beta=2.0)
    # (without the invariance term, whose share of the loss the reports do not carry)
    opts = TrainOptions(
        epochs=3, batch_size=8, seed=0, kl_warmup=2, earlystop=False, invariance=0.0
    )
    trainer = Trainer(cfg, Blobs(), opts)
    assert [trainer.kl_ramp(e) for e in (0, 0.5, 1, 2, 5)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    steps = [r for r in trainer.run() if r.kind == "step"]
    # the reported loss is the one optimised: recon + beta * ramp * kl, ramp per step
    for i, r in enumerate(steps):
        ramp = min(1.0, (i // 4 + (i % 4) / 4) / 2)
        assert r.loss == pytest.approx(r.recon + 2.0 * ramp * r.kl, rel=1e-5)
    assert steps[0].loss == pytest.approx(steps[0].recon, rel=1e-6)  # epoch 0 starts at 0
    assert steps[0].kl > 0
    # without warm-up the same seed optimises the full loss from the first step
    plain = Trainer(
        cfg, Blobs(), TrainOptions(epochs=1, batch_size=8, seed=0, earlystop=False, invariance=0)
    )
    first = next(r for r in plain.run() if r.kind == "step")
    assert first.loss == pytest.approx(first.recon + 2.0 * first.kl, rel=1e-5)
    # early stopping ignores the ramp epochs, whose loss rises by design
    stopper = Trainer(
        cfg,
        Blobs(),
        TrainOptions(
            epochs=50,
            batch_size=8,
            learn_rate=1e-12,
            patience=2,
            seed=0,
            min_delta=1e6,
            kl_warmup=4,
        ),
    )
    epochs = [r for r in stopper.run() if r.kind == "epoch"]
    assert len(epochs) == 4 + 3  # 4 ramp epochs, then 1 best + 2 without improvement
    with pytest.raises(ValueError, match="kl_warmup"):
        TrainOptions(kl_warmup=-1).validate()


def test_invariance_term_weighs_per_pixel_and_makes_the_encoders_agree(tmp_path):
    """The loss adds invariance x S^2 x the mean squared distance between each encoder's mean
    for its input and for the cell with every nuisance drawn afresh; trained with it, the
    encoders read a cell the same in any pose, far more than without it."""
    from napari_mevae.nuisances import NuisancePairs, randomise
    from napari_mevae.synthetic import synthetic_crops

    crops = synthetic_crops(n=48, size=16, channels=1, seed=0)[0]
    cfg = preset("tiny", image_size=16, latent_dim=4, nuisances=["rotation", "polarity"])
    opts = TrainOptions(epochs=1, batch_size=16, seed=0, precision="float32", invariance=0.02)
    trainer = Trainer(cfg, NuisancePairs(crops, seed=0), opts)
    assert trainer.invariance_weight == pytest.approx(0.02 * 16**2)
    inputs, target = next(iter(trainer._loader(0)))
    views = trainer._invariance_views(target)
    assert views.shape == (16, 2, 1, 16, 16) and torch.equal(views[:, 0], views[:, 1])
    terms = trainer._eager_forward_loss(inputs, target, views)
    plain = terms["recon"] + cfg.beta * terms["kl_penalty"]
    assert terms["invariance"] > 0
    assert terms["loss"].item() == pytest.approx(
        (plain + 0.02 * 16**2 * terms["invariance"]).item(), rel=1e-5
    )
    # off: the paper's loss, no second view; never for a one-encoder VAE
    off = Trainer(cfg, NuisancePairs(crops, seed=0), TrainOptions(invariance=0))
    assert off.invariance_weight == 0 and off._invariance_views(target) is None
    vae = Trainer(preset("tiny", image_size=16, n_encoders=1), Blobs(size=16), TrainOptions())
    assert vae.invariance_weight == 0
    with pytest.raises(ValueError, match="invariance"):
        TrainOptions(invariance=-1).validate()
    # the time shown before training counts the encoders' second pass (a VAE has none)
    from napari_mevae.config import estimate_seconds, training_flops

    assert training_flops(cfg) > 1.05 * training_flops(cfg, invariance=0)
    one = preset("tiny", image_size=16, n_encoders=1)
    assert training_flops(one) == training_flops(one, invariance=0)
    assert estimate_seconds(cfg, 10_000, 1) > estimate_seconds(cfg, 10_000, 1, invariance=0)

    def spread(weight: float) -> float:
        """Mean squared distance between an encoder's means for two poses of a cell, over
        their variance across cells (1: the pose moves the reading as much as the cell)."""
        o = TrainOptions(
            epochs=30,
            batch_size=16,
            seed=0,
            precision="float32",
            invariance=weight,
            earlystop=False,
        )
        model = Trainer(cfg, NuisancePairs(crops, seed=0), o).train().eval()
        rng = np.random.default_rng(5)
        x = torch.from_numpy(crops)
        with torch.no_grad():
            a = model.encode_all(torch.stack([randomise(x, "rotation,polarity", rng)] * 2, 1))[0]
            b = model.encode_all(torch.stack([randomise(x, "rotation,polarity", rng)] * 2, 1))[0]
        return float((a - b).pow(2).sum(-1).mean() / a.var(1).sum(-1).mean())

    # a strong weight (the default is tuned on real crop sizes): measured 0.14 against 0.81
    with_term, without = spread(3.0), spread(0.0)
    assert with_term < 0.4 * without, (with_term, without)


def test_options_and_device_validation():
    assert select_device("auto").type in ("cpu", "cuda", "mps")
    assert select_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            select_device("cuda")
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(preset("tiny"), Blobs(), TrainOptions(batch_size=0))
    with pytest.raises(ValueError, match="empty"):
        Trainer(preset("tiny"), Blobs(n=0), TrainOptions())


# -- performance paths (docs/benchmarks.md, "Training throughput") ---------------------------
class BlobsWithBatches(Blobs):
    """The same data, plus ``get_batch``: the trainer takes its whole-batch fast path."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches_fetched = 0

    def get_batch(self, indices):
        self.batches_fetched += 1
        idx = np.asarray(indices)
        return torch.from_numpy(self.inputs[idx]), torch.from_numpy(self.targets[idx])


def test_get_batch_fast_path_trains_exactly_like_the_dataloader():
    def run(ds):
        opts = TrainOptions(epochs=2, batch_size=6, seed=3)  # 32 items: a short last batch
        t = Trainer(preset("tiny"), ds, opts)
        losses = [r.loss for r in t.run() if r.kind == "step"]
        return losses, t.model_unwrapped.state_dict()

    slow_losses, slow_state = run(Blobs())
    fast = BlobsWithBatches()
    fast_losses, fast_state = run(fast)
    assert fast.batches_fetched == 2 * 6  # ceil(32 / 6) batches per epoch, no per-item collate
    assert fast_losses == slow_losses
    assert all(torch.equal(slow_state[k], fast_state[k]) for k in slow_state)


def test_bf16_option_trains_with_float32_weights():
    from napari_mevae.speedups import bf16_supported

    ds = Blobs()
    opts = TrainOptions(epochs=4, batch_size=8, learn_rate=2e-3, seed=1, precision="bf16")
    trainer = Trainer(preset("tiny", latent_dim=4), ds, opts)
    assert (trainer._autocast == torch.bfloat16) == bf16_supported(trainer.device)
    assert trainer.scaler is None  # bf16 has float32's range: no loss scaling
    reports = list(trainer.run())
    epochs = [r.loss for r in reports if r.kind == "epoch"]
    assert all(math.isfinite(v) for v in epochs) and epochs[-1] < epochs[0]
    assert all(p.dtype == torch.float32 for p in trainer.model_unwrapped.parameters())


def test_fp16_trains_with_loss_scaling_and_float32_weights(tmp_path):
    """The float16 path as it runs on CUDA GPUs without bf16, here on the CPU (which
    emulates float16): autocast, a GradScaler sized to the S^2-scaled loss, float32 weights,
    and checkpoints that load in any precision."""
    ds = Blobs()
    # learning rate 1e-3: at 2e-3 this tiny model's log-variances spike to ~18 in one step
    # (float32 rides it out, float16 overflows), since the encoders start off the saddle
    opts = TrainOptions(
        epochs=4, batch_size=8, learn_rate=1e-3, seed=1, precision="fp16", save_dir=tmp_path
    )
    trainer = Trainer(preset("tiny", latent_dim=4), ds, opts)
    assert trainer.precision == "fp16" and trainer._autocast == torch.float16
    size = trainer.model_unwrapped.config.image_size
    assert trainer.scaler is not None and trainer.scaler.get_scale() == 2.0**16 / size**2
    terms = trainer._eager_forward_loss(*(t[None].float() for t in ds[0]))
    assert terms["loss"].dtype == torch.float32  # the loss in float32, the forward in float16
    before = [p.detach().clone() for p in trainer.model_unwrapped.parameters()]
    reports = list(trainer.run())
    epochs = [r.loss for r in reports if r.kind == "epoch"]
    assert all(math.isfinite(v) for v in epochs) and epochs[-1] < epochs[0]
    params = list(trainer.model_unwrapped.parameters())
    assert all(p.dtype == torch.float32 for p in params)
    assert any(not torch.equal(a, b) for a, b in zip(before, params, strict=True))
    # no step overflowed at this first scale: it never had to back off
    assert trainer.scaler.get_scale() == 2.0**16 / size**2
    ckpt = load_checkpoint(tmp_path)
    model = ckpt.build_model("cpu")
    for a, b in zip(model.parameters(), params, strict=True):
        assert torch.equal(a, b.detach())
    more = Trainer(model, ds, TrainOptions(epochs=1, batch_size=8, precision="float32"), ckpt)
    assert [r.kind for r in more.run()][-1] == "end"


@pytest.mark.slow
def test_compile_option_matches_eager_training():
    def losses(compile_):
        opts = TrainOptions(epochs=1, batch_size=8, seed=2, compile=compile_)
        # epsilon_std=0: inductor draws its own random numbers, so compare without sampling
        t = Trainer(preset("tiny", epsilon_std=0.0), Blobs(n=20), opts)  # 8, 8, then 4 eagerly
        return [r.loss for r in t.run() if r.kind == "step"], t

    eager, _ = losses(False)
    compiled, trainer = losses(True)
    assert trainer._forward_loss is not trainer._eager_forward_loss
    assert len(compiled) == len(eager) == 3
    # bf16: inductor adds the decoder biases (model.deconv_bias_apart) without rounding them to
    # bf16 first, as eager does: ~2e-4 apart (float32: ~1e-7)
    assert compiled == pytest.approx(eager, rel=1e-3 if trainer.precision == "bf16" else 1e-4)
