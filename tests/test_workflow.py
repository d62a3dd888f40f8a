"""The one pipeline (workflow.py): the README's Python API runs as written, the KL-weight rule,
training.log, resuming a checkpoint, and the dims-in-use line every front end prints."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from napari_mevae import workflow
from napari_mevae.config import InputError, TrainOptions, kl_weight
from napari_mevae.synthetic import make_synthetic_cells
from napari_mevae.training import Trainer

REPO = Path(__file__).resolve().parents[1]


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    code = re.search(r"<!-- api-example -->\n```python\n(.*?)```", text, re.S).group(1)
    syn = make_synthetic_cells(n_cells=24, shape=(320, 320), channels=2, seed=0)
    monkeypatch.chdir(tmp_path)
    scope = {"image": syn.image, "labels": syn.labels, "print": lambda *a: None}
    exec(compile(code.replace("epochs=20", "epochs=2"), "README.md", "exec"), scope)
    table, cells = scope["table"], scope["cells"]
    assert len(table) == len(cells.crops) > 10
    assert {"label", "cluster", "z0", "z15", "UMAP0", "UMAP1"} <= set(table.columns)
    assert set(table["cluster"]) <= {1, 2, 3, 4}
    log = (tmp_path / "run" / "training.log").read_text().splitlines()
    assert log[0] == "epoch\tloss" and len(log) == 3
    assert (tmp_path / "run" / "models" / "checkpoint.pt").is_file()


def test_build_config_applies_the_one_kl_rule():
    cfg = workflow.build_config("mevae", image_size=32, channels=2, nuisances=["rotation"])
    assert (cfg.n_encoders, cfg.beta, cfg.nuisances) == (1, 0.0625, ["rotation"])
    cfg = workflow.build_config(
        "mevae", image_size=64, channels=1, nuisances=["rotation", "polarity", "scale"]
    )
    assert cfg.n_encoders == 3 and cfg.beta == 0.25 == kl_weight("mevae", 64)
    assert workflow.build_config("betavae", image_size=32, channels=1).beta == 0.25
    assert workflow.build_config("betavae", image_size=32, channels=1, beta_factor=2).beta == 0.125
    vae = workflow.build_config("vae", image_size=128, channels=1, nuisances=["rotation"])
    assert (vae.n_encoders, vae.beta) == (1, 1.0)  # the reference's balance at 128 px
    exact = workflow.build_config(
        "mevae", image_size=32, channels=1, nuisances=["rotation"], beta=1
    )
    assert exact.beta == 1.0  # an explicit beta keeps its exact meaning
    with pytest.raises(InputError, match="at least one nuisance"):
        workflow.build_config("mevae", image_size=32, channels=1, nuisances=[])


def _crops(n: int = 24) -> np.ndarray:
    from napari_mevae.synthetic import synthetic_crops

    return synthetic_crops(n, 32, seed=0)[0]


def test_train_on_crops_writes_the_log_and_resumes_it(tmp_path):
    crops = _crops()
    cfg = workflow.build_config(
        "mevae", image_size=32, channels=1, nuisances=["rotation", "polarity"], latent_dim=4
    )
    opts = TrainOptions(epochs=2, batch_size=8, seed=0, device="cpu", save_dir=tmp_path)
    gen = workflow.train_on_crops(crops, cfg, opts, preview=crops[:3])
    reports = []
    while True:
        try:
            reports.append(next(gen))
        except StopIteration as done:
            path = done.value
            break
    assert reports[0].kind == "start" and reports[0].steps_per_epoch == 3
    assert reports[0].message in ("cpu, float32", "cpu, bf16")
    epochs = [r for r in reports if r.kind == "epoch"]
    assert len(epochs) == 2 and epochs[0].preview.shape == (3, 1, 32, 32)
    assert reports[-1].kind == "end" and path == str(tmp_path / "models" / "checkpoint.pt")
    log = (tmp_path / "training.log").read_text().splitlines()
    assert log[0] == "epoch\tloss" and [r.split("\t")[0] for r in log[1:]] == ["0", "1"]
    assert float(log[1].split("\t")[1]) == pytest.approx(epochs[0].loss, abs=1e-5)
    # train more: the checkpoint resumes at epoch 2 and the log goes on
    more = TrainOptions(epochs=1, batch_size=8, seed=0, device="cpu", save_dir=tmp_path)
    reports = list(workflow.train_on_crops(crops, cfg, more, resume=path))
    assert reports[0].epoch == 2 and [r.epoch for r in reports if r.kind == "epoch"] == [3]
    log = (tmp_path / "training.log").read_text().splitlines()
    assert [r.split("\t")[0] for r in log[1:]] == ["0", "1", "2"]
    # a run killed between checkpoints logged epochs its checkpoint does not hold: resuming
    # that checkpoint drops those rows, as it trains those epochs again
    with open(tmp_path / "training.log", "a") as fh:
        fh.write("3\t99.0\n4\t98.0\n")
    reports = list(workflow.train_on_crops(crops, cfg, more, resume=path))
    log = (tmp_path / "training.log").read_text().splitlines()
    assert [r.split("\t")[0] for r in log[1:]] == ["0", "1", "2", "3"]
    new_loss = [r.loss for r in reports if r.kind == "epoch"]
    assert float(log[-1].split("\t")[1]) == pytest.approx(new_loss[0], abs=1e-5)


def test_preview_reconstructions_come_at_a_human_rate_and_at_the_end(tmp_path, monkeypatch):
    """Epochs of the napari sample take a tenth of a second: a preview after every one cost
    13 % of the run.  The first epoch has one, later ones only after PREVIEW_SECONDS, and the
    end report has the final model's."""
    from napari_mevae.analysis import reconstruct

    monkeypatch.setattr(workflow, "PREVIEW_SECONDS", 1e9)
    crops = _crops()
    cfg = workflow.build_config(
        "mevae", image_size=32, channels=1, nuisances=["rotation", "polarity"], latent_dim=4
    )
    opts = TrainOptions(epochs=3, batch_size=8, seed=0, device="cpu", save_dir=tmp_path)
    trainer = Trainer(cfg, workflow.training_dataset(crops, cfg.nuisances, seed=0), opts)
    reports = list(workflow.run_training(trainer, preview=crops[:3]))
    epochs = [r for r in reports if r.kind == "epoch"]
    assert [r.preview is not None for r in epochs] == [True, False, False]
    end = reports[-1]
    assert end.kind == "end" and end.preview.shape == (3, 1, 32, 32)
    np.testing.assert_allclose(end.preview, reconstruct(trainer.model_unwrapped, crops[:3]))
    monkeypatch.setattr(workflow, "PREVIEW_SECONDS", 0.0)
    trainer = Trainer(cfg, workflow.training_dataset(crops, cfg.nuisances, seed=0), opts)
    reports = list(workflow.run_training(trainer, preview=crops[:3]))
    assert all(r.preview is not None for r in reports if r.kind in ("epoch", "end"))
    assert all(r.preview is None for r in reports if r.kind in ("start", "step"))


def test_should_stop_ends_training_after_the_step(tmp_path):
    cfg = workflow.build_config("mevae", image_size=32, channels=1, nuisances=["rotation"])
    opts = TrainOptions(epochs=50, batch_size=4, seed=0, device="cpu", save_dir=tmp_path)
    steps = []
    gen = workflow.train_on_crops(_crops(), cfg, opts, should_stop=lambda: len(steps) >= 3)
    for report in gen:
        if report.kind == "step":
            steps.append(report)
    assert len(steps) == 3
    assert report.kind == "end" and report.reason == "stopped"


def test_still_learning_says_when_more_epochs_may_help():
    def history(losses, partial_last=False):
        h = [{"epoch": i + 1, "loss": v} for i, v in enumerate(losses)]
        if partial_last:
            h.append({"epoch": len(h) + 1, "loss": 1.0, "partial": True})
        return h

    # LINCS after the default 30 passes: 65.8 -> 64.8 over the last two quarters (1.5 %)
    falling = list(np.linspace(70.0, 64.8, 30))
    hint = workflow.still_learning(history(falling))
    assert hint is not None and "more --epochs" in hint
    fall = (np.mean(falling[-14:-7]) - np.mean(falling[-7:])) / np.mean(falling[-14:-7])
    assert f"{100 * fall:.1f} %" in hint
    assert "more Epochs" in workflow.still_learning(history(falling), workflow.GUI_NAMES)
    # a partial epoch (an interrupted run) does not count
    assert workflow.still_learning(history(falling, partial_last=True)) == hint
    # the same loss after an early stop: the trainer's own rule said it stopped improving
    assert workflow.still_learning(history(falling), reason="done") == hint
    assert workflow.still_learning(history(falling), reason="early_stop") is None
    # settled, and noisy around a plateau (0.3 % as the demo's last quarters): nothing to say
    rng = np.random.default_rng(0)
    assert workflow.still_learning(history([63.0] * 40)) is None
    assert workflow.still_learning(history(list(63.0 + 0.2 * rng.standard_normal(40)))) is None
    assert workflow.still_learning(history(list(np.linspace(64.0, 63.7, 80)))) is None
    # too short to tell a trend from noise, or a loss that rose
    assert workflow.still_learning(history([70.0, 60.0, 50.0, 40.0, 30.0, 20.0, 10.0])) is None
    assert workflow.still_learning(history(list(np.linspace(60.0, 70.0, 30)))) is None
    assert workflow.still_learning([]) is None


def test_dims_in_use_says_what_to_change():
    import torch

    from napari_mevae.config import preset
    from napari_mevae.model import MEVAE

    model = MEVAE(preset("tiny", image_size=32))
    assert "not measured" in workflow.dims_in_use(model)
    model.latent_variance.copy_(torch.tensor([0.5, 0.2] + [0.0] * 6))
    assert workflow.dims_in_use(model).startswith("latent dimensions in use: 2 of 8 (")
    # the two axes carry one signal between them: the line says so
    v = torch.tensor([0.8, 0.6] + [0.0] * 6)
    model.latent_covariance.copy_(0.5 * torch.outer(v, v))
    model.latent_mean.zero_()
    assert workflow.dims_in_use(model).startswith(
        "latent dimensions in use: 2 of 8, varying in 1 independent direction ("
    )
    model.latent_covariance.fill_(float("nan"))
    model.latent_variance.copy_(torch.tensor([0.5] + [0.0] * 7))
    model.config.beta = 0.0625
    one = workflow.dims_in_use(model, workflow.GUI_NAMES)
    assert "only 1 of 8" in one and "more Epochs" in one and "KL warm-up" in one
    model.latent_variance.zero_()
    model.config.beta = 1.0  # 16x the balanced weight at 32 px
    assert "lower --beta to 0.0625, the default at image size 32" in workflow.dims_in_use(model)
    model.config.beta = 0.0625
    assert "--kl_warmup" in workflow.dims_in_use(model)
