"""The Model tab: the model and the nuisances it removes (one encoder each), training in a
background process with a live loss curve, stop, save / load checkpoints."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from napari.qt.threading import create_worker
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QSpinBox,
    QVBoxLayout,
)

from .. import workflow
from ..child import ChildRun
from ..config import (
    BETAVAE_FACTOR,
    CHECKPOINT_SECONDS,
    MODEL_KINDS,
    NUISANCE_CHOICES,
    PRECISIONS,
    CheckpointError,
    InputError,
    TrainOptions,
    default_epochs,
    estimate_seconds,
    max_budget_epochs,
    model_kind,
    size_scaled_beta,
)
from ._layers import show_image, to_tiles
from ._panel import Host, Panel, button
from ._plots import LossPlot

__all__ = ["TRAIN_RECON_LAYER", "ModelPanel"]

TRAIN_RECON_LAYER = "ME-VAE reconstructions (training)"
PREVIEW_CELLS = 8  # cells whose reconstructions are shown while the model trains


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _stream(run: ChildRun, device: str) -> Any:
    """The thread worker's body: forward what the training process yields (waiting on its pipe
    releases the GIL, so the GUI thread runs freely); then read the trained model here too
    (a quarter of a second of torch that would otherwise stall the viewer) and return it."""
    path = yield from run.results()
    return _load(path, device)


def _load(path: str, device: str) -> tuple[str, Any, Any]:
    """``(path, checkpoint, model)``: plain torch work, fit for a worker thread."""
    from ..checkpoints import load_checkpoint
    from ..training import select_device

    ckpt = load_checkpoint(path)
    return path, ckpt, ckpt.build_model(select_device(device))


class ModelPanel(Panel):
    """Model choice, training in a background process with a live loss curve, stop, save/load."""

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.type_combo = QComboBox()
        self.type_combo.addItems(list(MODEL_KINDS))
        self.type_combo.currentTextChanged.connect(self._type_changed)
        self.nuisance_chks: dict[str, QCheckBox] = {}
        nuis_box = QGroupBox("Nuisances to remove (one encoder each)")
        nl = QHBoxLayout(nuis_box)
        for name in NUISANCE_CHOICES:
            chk = QCheckBox(name)
            chk.setChecked(name in self.session.nuisances)
            chk.toggled.connect(self._nuisances_toggled)
            self.nuisance_chks[name] = chk
            nl.addWidget(chk)
        self.k_label = QLabel()
        nl.addWidget(self.k_label)
        self.beta = QDoubleSpinBox()
        self.beta.setRange(0.0, 1000.0)
        self.beta.setValue(BETAVAE_FACTOR)
        self.beta.setToolTip(
            "KL weight of the beta-VAE relative to the VAE's (1 = plain VAE). Every model's KL "
            "weight is also scaled by (crop size / 128)^2, the reference's balance at 128 px."
        )
        self.latent = QSpinBox()
        self.latent.setRange(2, 512)
        # 16, not the command line's 128: on the plugin's sample 128 leaves 6-7 dimensions in
        # use against 2-3, but the extra ones hold the cell's pose (rotation leakage 0.26 vs
        # 0.01 on held-out cells), not more of the cell (content kept 0.62 vs 0.61)
        self.latent.setValue(16)
        defaults = TrainOptions()
        self.epochs = QSpinBox()
        self.epochs.setRange(0, 100_000)
        self.epochs.setSpecialValueText("auto")  # 0: the default budget for these cells
        self.epochs.setToolTip(
            "auto: a budget that fits the cells (30 passes, but at least 40,000 and at most "
            "400,000 images seen), going on while the loss still falls, up to 100 passes"
        )
        self.batch = QSpinBox()
        self.batch.setRange(1, 4096)
        self.batch.setValue(defaults.batch_size)
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(6)
        self.lr.setRange(1e-6, 1.0)
        self.lr.setSingleStep(1e-4)
        self.lr.setValue(defaults.learn_rate)
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda"])
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.kl_warmup = QSpinBox()
        self.kl_warmup.setRange(0, 10000)
        self.kl_warmup.setToolTip(
            "Epochs over which the KL weight ramps up from 0 (0 = off): against a latent space "
            "that collapses to a few dimensions"
        )
        self.precision = QComboBox()
        self.precision.addItems(list(PRECISIONS))
        self.precision.setToolTip(
            "auto: bfloat16 where the CPU/GPU runs it natively (faster), float16 with loss "
            "scaling on older CUDA GPUs (T4, V100), else float32. "
            "Weights and loss always stay float32"
        )
        self.autosave = QLineEdit()
        self.autosave.setPlaceholderText(
            f"optional folder: checkpoint every {CHECKPOINT_SECONDS:.0f} s and at the end"
        )
        self.continue_chk = QCheckBox("train more (continue the current model)")
        self.continue_chk.setEnabled(False)
        self.train_btn = button("Train", self.train)
        self.stop_btn = button("Stop", self.stop, "stop after the current step, keep the model")
        self.stop_btn.setEnabled(False)
        self.save_btn = button("Save checkpoint...", self.save_checkpoint)
        self.load_btn = button("Load checkpoint...", self.load_checkpoint)
        self.budget = QLabel()
        self.budget.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setValue(0)
        self.status = QLabel("No model yet.")
        self.status.setWordWrap(True)
        self.loss_plot = LossPlot()

        form = QFormLayout()
        form.addRow("Model", self.type_combo)
        form.addRow(nuis_box)
        form.addRow("beta", self.beta)
        form.addRow("Latent dim", self.latent)
        form.addRow("Epochs", self.epochs)
        form.addRow("", self.budget)
        form.addRow("Batch size", self.batch)
        form.addRow("Learning rate", self.lr)
        form.addRow("Device", self.device)
        form.addRow("Seed", self.seed)
        form.addRow("KL warm-up (epochs)", self.kl_warmup)
        form.addRow("Precision", self.precision)
        form.addRow("Autosave", self.autosave)
        form.addRow(self.continue_chk)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        row = QHBoxLayout()
        row.addWidget(self.train_btn)
        row.addWidget(self.stop_btn)
        lay.addLayout(row)
        lay.addWidget(self.progress)
        lay.addWidget(self.loss_plot)
        row2 = QHBoxLayout()
        row2.addWidget(self.save_btn)
        row2.addWidget(self.load_btn)
        lay.addLayout(row2)
        lay.addWidget(self.status)
        lay.addStretch(1)
        # runs without an autosave folder write their checkpoints here, removed when Python
        # exits (after the training process has ended; an implicit TemporaryDirectory cleanup
        # would warn through a deleted thread worker's hook and print a traceback at exit)
        self._scratch = tempfile.mkdtemp(prefix="mevae-napari-")
        atexit.register(shutil.rmtree, self._scratch, True)
        # the current run (None between runs) and what the GUI needs to follow it
        self.run: ChildRun | None = None
        self.last_options: TrainOptions | None = None
        self._run_type = ""
        # why the last run here ended (TrainReport.reason); "" = unknown (a loaded checkpoint)
        self._end_reason = ""
        self._budget_grew = False  # in this run, while the loss still fell
        self._run_dir = ""
        self._run_desc = ""
        self._run_start_epoch = 0
        self._steps = 1
        self._epochs = 0
        self._preview: np.ndarray | None = None
        self._last_status = 0.0
        self._last_shown = 0.0  # when the training reconstructions were last refreshed
        self._pending: Any = None  # the latest epoch report with reconstructions
        self._type_changed(self.type_combo.currentText())
        self._nuisances_toggled()
        self.session.model_changed.connect(self._describe_model)
        self.session.state_changed.connect(self.update_buttons)
        self.update_buttons()
        self.session.cells_changed.connect(self._show_budget)
        for box in (self.epochs, self.batch, self.latent):
            box.valueChanged.connect(self._show_budget)
        self.type_combo.currentTextChanged.connect(self._show_budget)
        self._show_budget()

    def update_buttons(self) -> None:
        s = self.session
        self.train_btn.setEnabled(not self.busy and s.cells is not None)
        self.stop_btn.setEnabled(self.busy and self.run is not None)
        self.save_btn.setEnabled(not self.busy and s.model is not None)
        self.load_btn.setEnabled(not self.busy)
        self.continue_chk.setEnabled(not self.busy and s.model is not None)

    # -- choices -----------------------------------------------------------------------------
    def nuisances(self) -> list[str]:
        """The ticked nuisances, in registry order: K = their number for an ME-VAE."""
        return [n for n, chk in self.nuisance_chks.items() if chk.isChecked()]

    def _set_nuisances(self, names: list[str]) -> None:
        for n, chk in self.nuisance_chks.items():
            chk.setChecked(n in names)

    def _nuisances_toggled(self, *_: Any) -> None:
        names = self.nuisances()
        mevae = MODEL_KINDS[self.type_combo.currentText()] == "mevae"
        self.k_label.setText(f"K = {len(names) if mevae else 1}")
        self.session.set_nuisances(names)
        if hasattr(self, "budget"):
            self._show_budget()

    def _show_budget(self, *_: Any) -> None:
        """What Train will do with the current cells and settings, and about how long."""
        s = self.session
        if s.cells is None:
            self.budget.setText("Budget: extract cells first.")
            return
        n, c, size = s.crops.shape[0], s.crops.shape[1], s.crops.shape[-1]
        epochs = self.epochs.value() or default_epochs(n)
        steps = epochs * workflow.steps_per_epoch(n, self.batch.value())
        images = epochs * n
        kind = MODEL_KINDS[self.type_combo.currentText()]
        nuisances = self.nuisances() or ["rotation"]
        cfg = workflow.build_config(
            kind, image_size=size, channels=c, nuisances=nuisances, latent_dim=self.latent.value()
        )
        threads = workflow.background_threads()
        secs = estimate_seconds(cfg, images, threads)
        most = 0 if self.epochs.value() else max_budget_epochs(n)
        more = (
            f" While the loss still falls it trains on, up to {most:,} epochs (about "
            f"{_duration(estimate_seconds(cfg, most * n, threads))})."
            if most > epochs
            else ""
        )
        self.budget.setText(
            f"Budget: {epochs:,} epochs of {n:,} cells = {steps:,} steps, {images:,} images "
            f"seen; about {_duration(secs)} on this computer's CPU (estimated).{more}"
        )

    def _type_changed(self, text: str) -> None:
        self.beta.setEnabled(text == "beta-VAE")
        if self.nuisance_chks:
            self._nuisances_toggled()

    def _describe_model(self) -> None:
        model = self.session.model
        if model is None:
            self.status.setText("No model yet.")
            return
        cfg = model.config
        done = len([h for h in self.session.history if not h.get("partial")])
        nuis = ", ".join(cfg.nuisances) or "none"
        d = model.n_directions
        directions = "" if d is None else f", {d} direction{'s' * (d != 1)}"
        used = f" ({model.n_active} in use{directions})" if model.activity_measured else ""
        source = f" - {self.session.model_source}" if self.session.model_source else ""
        text = (
            f"Model: {model_kind(cfg)}, K={cfg.n_encoders} ({nuis}), latent {cfg.latent_dim}"
            f"{used}, {cfg.image_size} px, {cfg.channels} channel(s); {done} epoch(s) trained"
            f"{source}."
        )
        few = model.activity_measured and model.n_active < min(2, cfg.latent_dim)
        if few:  # say so where the user looks, with what to change
            text += " Warning: " + workflow.dims_in_use(model, workflow.GUI_NAMES) + "."
        hint = workflow.still_learning(self.session.history, workflow.GUI_NAMES, self._end_reason)
        if hint:  # the run ended while the model was still improving
            text += " Note: " + hint + " ('train more' continues this model)."
        self.status.setText(text)
        self.status.setStyleSheet("color: #ffd27f;" if few else "")

    # -- training ----------------------------------------------------------------------------
    def train(self) -> Any:
        """Start training in a background process (a new model, or more of the current one)."""
        s = self.session
        if self.busy:
            self.info("Training is already running.")
            return None
        if s.cells is None:
            self.error("Extract cells first (Cells tab): there is nothing to train on.")
            return None
        crops = s.crops
        n, c, size = crops.shape[0], crops.shape[1], crops.shape[-1]
        model_type = self.type_combo.currentText()
        resume = None
        if self.continue_chk.isChecked() and s.model is not None:
            from ..checkpoints import check_compatible

            cfg = s.model.config
            model_type = s.model_type or model_kind(cfg)
            try:
                check_compatible(cfg, size, c, cfg.n_encoders)
            except CheckpointError as err:
                self.error(f"Cannot train the current model more: {err}")
                return None
            config, resume = cfg, s.checkpoint_path
        else:
            kind = MODEL_KINDS[model_type]
            try:
                config = workflow.build_config(
                    kind,
                    image_size=size,
                    channels=c,
                    nuisances=self.nuisances(),
                    beta_factor=self.beta.value() if kind == "betavae" else None,
                    latent_dim=self.latent.value(),
                )
            except (InputError, ValueError) as err:
                self.error(f"Cannot train: {err}")
                return None
        self._run_dir = self.autosave.text().strip() or tempfile.mkdtemp(dir=self._scratch)
        threads = workflow.background_threads()
        budget = self.epochs.value() or default_epochs(n)
        options = TrainOptions(
            epochs=self.epochs.value() or None,  # None: the default budget, which can grow
            batch_size=self.batch.value(),
            learn_rate=self.lr.value(),
            device=self.device.currentText(),
            seed=self.seed.value(),
            save_dir=self._run_dir,
            kl_warmup=float(self.kl_warmup.value()),
            precision=self.precision.currentText(),
            threads=threads,
        )
        self._preview = crops[: min(PREVIEW_CELLS, n)]
        self._steps = workflow.steps_per_epoch(n, options.batch_size)
        self.last_options = options
        self._run_type = model_type
        self._end_reason = ""
        self._budget_grew = False
        self.run = ChildRun(
            "napari_mevae.workflow:train_on_crops",
            crops,
            config,
            options,
            MODEL_KINDS[model_type],
            resume=resume,
            preview=self._preview,
            threads=threads,
            nice=5,
        )
        worker = create_worker(
            _stream,
            self.run,
            options.device,
            _progress={"total": 2 + budget * (self._steps + 1), "desc": "ME-VAE: training"},
            _start_thread=False,
            _connect={"errored": self._on_error},
        )
        worker.yielded.connect(self._on_report)
        worker.returned.connect(self._on_returned)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        if resume is None:
            self.loss_plot.clear()
        self.progress.setRange(0, budget * self._steps)
        self.progress.setValue(0)
        self.begin()
        self.status.setText("Training: starting the training process...")
        s.set_training(True)
        worker.start()
        return worker

    def stop(self) -> None:
        """Stop after the current step; the training process saves and returns the model."""
        if self.run is None:
            return
        self.run.stop()
        self.stop_btn.setEnabled(False)
        self.status.setText("Stopping after the current step...")

    def _on_report(self, report: Any) -> None:
        if report.kind == "start":
            self._steps = report.steps_per_epoch
            self._run_start_epoch = report.epoch
            self._run_desc = report.message  # what "auto" resolved to, e.g. "cpu, bf16"
            self._epochs = report.epochs - report.epoch
            self.progress.setRange(0, max(1, self._epochs * self._steps))
            return
        done_steps = (report.epoch - self._run_start_epoch) * self._steps + report.step
        if report.kind == "step":
            self.loss_plot.add_step(
                report.epoch + report.step / max(1, report.steps_per_epoch), report.loss
            )
            now = time.monotonic()
            if now - self._last_status < 0.1 and report.step < report.steps_per_epoch:
                return  # a human rate: fast runs yield hundreds of steps a second
            self._last_status = now
            self.progress.setValue(min(self.progress.maximum(), done_steps))
            left = (self.progress.maximum() - done_steps) * self.batch.value()
            eta = f", {_duration(left / report.images_per_s)} left" if report.images_per_s else ""
            grew = " The loss is still falling: the budget grew." if self._budget_grew else ""
            self.status.setText(
                f"Epoch {report.epoch + 1}/{report.epochs}, step {report.step}/"
                f"{report.steps_per_epoch}: loss {report.loss:.2f} "
                f"({report.images_per_s:.0f} cells/s on {self._run_desc}{eta}).{grew}"
            )
        elif report.kind == "epoch":
            if report.epochs - self._run_start_epoch > self._epochs:  # the budget grew
                grown = report.epochs - self._run_start_epoch - self._epochs
                self._epochs += grown
                self.progress.setRange(0, max(1, self._epochs * self._steps))
                # napari's activity dock too (one yield per step and one per epoch), or its
                # bar would run past its total and turn indeterminate
                pbar = getattr(self._worker, "pbar", None)
                if pbar is not None and pbar.total:
                    pbar.total += grown * (self._steps + 1)
                self._budget_grew = True
            self.progress.setValue(min(self.progress.maximum(), done_steps))
            self.loss_plot.add_epoch(report.epoch, report.loss)
            if report.preview is not None:
                self._pending = report  # shown at a human rate, and at the end
            if time.monotonic() - self._last_shown >= 2.0:
                self._show_reconstructions()
            grew = f"; {report.message}" if report.message else ""
            self.status.setText(
                f"Epoch {report.epoch}/{report.epochs}: mean loss {report.loss:.2f}{grew}"
            )
        elif report.kind == "end":
            self.progress.setValue(self.progress.maximum())
            self.loss_plot.redraw(force=True)
            if report.preview is not None:
                self._pending = report  # the final model's reconstructions
            self._show_reconstructions()
            ckpt = f" Checkpoint: {report.checkpoint}" if report.checkpoint else ""
            self.info(f"ME-VAE {report.message}.{ckpt}")
            self._end_reason = report.reason

    def _show_reconstructions(self) -> None:
        """The preview cells beside their latest reconstructions."""
        report, self._pending = self._pending, None
        self._last_shown = time.monotonic()
        if report is None or self._preview is None:
            return
        pairs = np.stack(
            [x for pair in zip(self._preview, report.preview, strict=True) for x in pair]
        )
        show_image(
            self.viewer,
            TRAIN_RECON_LAYER,
            to_tiles(pairs, ncols=min(8, len(pairs))),
            anchor=self.session.anchor,
            metadata={"epoch": report.epoch, "layout": "target | reconstruction"},
        )

    def _on_returned(self, loaded: tuple[str, Any, Any]) -> None:
        self._keep(loaded[0], "trained here", self._run_type, loaded=loaded)

    def _on_error(self, err: Exception) -> None:
        self.error(f"Training failed: {err}")
        last = Path(self._run_dir) / "models" / "checkpoint.pt"
        if self._run_dir and last.is_file():  # at most CHECKPOINT_SECONDS + an epoch old
            self._keep(str(last), "the last checkpoint saved before the failure", self._run_type)

    def _on_finished(self) -> None:
        self._worker = None
        self.run = None
        self.session.set_training(False)
        self.update_buttons()
        self._describe_model()

    def _keep(self, path: str, source: str, model_type: str = "", loaded: Any = None) -> bool:
        """Make the checkpoint at ``path`` the session's model (``loaded``: what ``_load``
        already read from it in a worker thread)."""
        s = self.session
        try:
            _, ckpt, model = loaded or _load(path, self.device.currentText())
        except (CheckpointError, ValueError) as err:
            self.error(f"Cannot load {Path(path).name}: {err}")
            return False
        s.model = model
        s.checkpoint_path = str(ckpt.path)
        s.history = list(ckpt.history)
        s.optimizer_state = ckpt.optimizer_state
        s.model_source = source
        s.model_type = model_type or model_kind(ckpt.config)
        s.clear_results()
        s.model_changed.emit()
        return True

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path | None = None) -> Path | None:
        """Write the current model (weights, config, history and the crop settings)."""
        s = self.session
        if s.model is None:
            self.error("No model to save: train or load one first.")
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(
                self, "Save ME-VAE checkpoint", "mevae_checkpoint.pt", "Checkpoints (*.pt)"
            )
            if not path:
                return None
        from ..checkpoints import save_checkpoint

        extra: dict[str, Any] = {"source": "napari-mevae widget", "model_type": s.model_type}
        if s.settings is not None:
            extra["cells"] = s.settings.to_dict()
        done = len([h for h in s.history if not h.get("partial")])
        try:
            out = save_checkpoint(
                Path(path),
                s.model,
                epoch=done,
                history=s.history,
                extra=extra,
                optimizer_state=s.optimizer_state,
            )
        except OSError as err:
            self.error(f"Cannot save the checkpoint: {err}")
            return None
        s.checkpoint_path = str(out)
        self.info(f"Checkpoint saved: {out}")
        return out

    def load_checkpoint(self, path: str | Path | None = None) -> bool:
        """Load a checkpoint as the current model.  Refused (model and layers untouched) when it
        does not fit the extracted cells."""
        if self.busy:
            self.error("Stop the training before loading a checkpoint.")
            return False
        if path is None:
            path, _ = QFileDialog.getOpenFileName(
                self,
                "Load ME-VAE checkpoint",
                "",
                "Checkpoints and Model Zoo packages (*.pt *.zip);;All files (*)",
            )
            if not path:
                return False
        from ..checkpoints import check_compatible, load_checkpoint

        crops = self.session.crops
        try:
            ckpt = load_checkpoint(path)
            if crops is not None:
                check_compatible(
                    ckpt.config, crops.shape[-1], crops.shape[1], ckpt.config.n_encoders
                )
        except (CheckpointError, ValueError) as err:
            self.error(f"Cannot load {Path(path).name}: {err}")
            return False
        model_type = str(ckpt.extra.get("model_type", ""))
        if model_type not in MODEL_KINDS:
            model_type = model_kind(ckpt.config)
        self._apply_config(ckpt.config, model_type)
        if not self._keep(str(path), f"loaded from {Path(path).name}", model_type):
            return False
        self._end_reason = ""
        self.loss_plot.set_history(self.session.history)
        self.info(f"Model loaded from {ckpt.path}")
        return True

    def _apply_config(self, cfg: Any, model_type: str) -> None:
        """Show a loaded model's settings so 'train more' continues it as it was."""
        self.latent.setValue(cfg.latent_dim)
        self.type_combo.setCurrentText(model_type)
        if model_type == "beta-VAE":
            self.beta.setValue(cfg.beta / size_scaled_beta(1.0, cfg.image_size))
        if cfg.nuisances:
            self._set_nuisances(list(cfg.nuisances))
