"""The ME-VAE dock widget: one dock with four tabs that follow the analyst's path,
Cells -> Model -> Analyse -> Export.

The widgets hold no science: they collect choices, call the core (cells, transforms, training,
analysis) in thread workers, and show what comes back as layers and plots.  Workers never touch
layers or widgets; results are applied in the ``yielded`` / ``returned`` callbacks, which run in
the GUI thread.  torch and umap are imported only inside the workers (see ``_jobs``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import napari
import numpy as np
import pandas as pd
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QObject, Qt, Signal
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
    QPushButton,
    QSpinBox,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from ._jobs import (
    MODEL_TYPES,
    PRECISIONS,
    ExtractSettings,
    TrainJob,
    cluster_job,
    encode_job,
    extract_job,
    preview_pairs_job,
    steps_per_epoch,
    train_job,
)
from ._layers import LayerCombo, infer_layout, layer_array, show_image, show_labels, to_tiles
from ._plots import LossPlot, ScatterPlot

__all__ = ["MEVAEWidget", "CellsPanel", "ModelPanel", "AnalysePanel", "ExportPanel"]

NUISANCE_CHOICES = ("rotation", "polarity", "scale")
CROP_SIZES = ("32", "48", "64", "96", "128")
PAIRS_LAYER = "ME-VAE pairs preview"
TRAIN_RECON_LAYER = "ME-VAE reconstructions (training)"
TRAVERSAL_LAYER = "ME-VAE latent traversal"
# columns features_table writes: old values of these are replaced, never merged
_RESULT_COLUMNS = ("index", "label", "plane", "centroid_y", "centroid_x", "cluster")


class Session(QObject):
    """What the tabs share: the extracted cells, the model and the analysis results."""

    cells_changed = Signal()
    model_changed = Signal()
    results_changed = Signal()
    extract_progress = Signal(int, int)  # emitted from the extraction thread (queued to GUI)

    def __init__(self) -> None:
        super().__init__()
        self.image_layer: Image | None = None
        self.labels_layer: Labels | None = None
        self.cells: Any = None  # cells.CellCrops
        self.settings: ExtractSettings | None = None
        self.model: Any = None  # model.MEVAE
        self.model_source = ""
        self.model_type = ""  # as chosen in the Model tab ("ME-VAE", "VAE", "beta-VAE")
        self.history: list[dict[str, Any]] = []
        self.optimizer_state: dict[str, Any] | None = None  # to train more without a restart
        self.latents: np.ndarray | None = None
        self.recon: np.ndarray | None = None
        self.embedding: np.ndarray | None = None
        self.clusters: np.ndarray | None = None
        self.table: pd.DataFrame | None = None
        self.clusters_layer: Labels | None = None
        self.selected_row: int | None = None

    @property
    def crops(self) -> np.ndarray | None:
        return None if self.cells is None else np.asarray(self.cells.crops)

    def clear_results(self) -> None:
        self.latents = self.recon = self.embedding = self.clusters = None
        self.table = None
        self.selected_row = None


class _Panel(QWidget):
    """Base of the tabs: access to the viewer, the shared session and the status line."""

    def __init__(self, host: MEVAEWidget) -> None:
        super().__init__()
        self.host = host
        self.viewer = host.viewer
        self.session = host.session

    def error(self, msg: str) -> None:
        self.host.error(msg)

    def info(self, msg: str) -> None:
        self.host.info(msg)


def _button(text: str, slot: Any, tip: str = "") -> QPushButton:
    b = QPushButton(text)
    b.clicked.connect(lambda *_: slot())
    if tip:
        b.setToolTip(tip)
    return b


def _size_scaled_beta(beta: float, image_size: int) -> float:
    # model.size_scaled_beta without importing torch in the GUI thread (the Train button)
    return float(beta) * (image_size / 128) ** 2


# ---------------------------------------------------------------------------------------------
class CellsPanel(_Panel):
    """Choose image + labels, crop every cell, choose the nuisances (K encoders), preview pairs."""

    def __init__(self, host: MEVAEWidget) -> None:
        super().__init__(host)
        self.image_combo = LayerCombo(self.viewer, Image)
        self.labels_combo = LayerCombo(self.viewer, Labels)
        self.size_combo = QComboBox()
        self.size_combo.addItems(CROP_SIZES)
        self.size_combo.setCurrentText("48")
        self.size_combo.setToolTip("crop side in pixels (a multiple of 8); the model's image size")
        self.channel_combo = QComboBox()
        self.channel_combo.addItems(["auto", "none", "0", "1", "2", "3", "-1"])
        self.channel_combo.setToolTip(
            "axis of the image that holds channels; auto: the axis the labels do not have "
            "(RGB: the last)"
        )
        self.normalize_combo = QComboBox()
        self.normalize_combo.addItems(["percentile", "max", "range", "none"])
        self.scale_combo = QComboBox()
        self.scale_combo.addItems(["fixed", "fit"])
        self.scale_combo.setToolTip(
            "fixed: keep pixel size; fit: rescale each cell to fill the crop"
        )
        self.border_combo = QComboBox()
        self.border_combo.addItems(["drop", "pad"])
        self.min_area = QSpinBox()
        self.min_area.setRange(0, 10**7)
        self.align_chk = QCheckBox("align cells (canonical orientation)")
        self.align_chk.setChecked(True)
        self.mask_chk = QCheckBox("mask neighbours")
        self.mask_chk.setChecked(True)
        self.nuisance_chks: dict[str, QCheckBox] = {}
        nuis_box = QGroupBox("Nuisances to remove (one encoder each)")
        nl = QHBoxLayout(nuis_box)
        for name in NUISANCE_CHOICES:
            chk = QCheckBox(name)
            chk.setChecked(name in ("rotation", "polarity"))
            chk.toggled.connect(self._update_k)
            self.nuisance_chks[name] = chk
            nl.addWidget(chk)
        self.k_label = QLabel()
        nl.addWidget(self.k_label)
        self.extract_btn = _button("Extract cells", self.extract, "crop every labelled cell")
        self.preview_btn = _button(
            "Preview pairs", self.preview_pairs, "add an image of a few encoder inputs + targets"
        )
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.summary = QLabel("No cells extracted yet.")
        self.summary.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Labels", self.labels_combo)
        form.addRow("Crop size", self.size_combo)
        form.addRow("Channel axis", self.channel_combo)
        form.addRow("Normalise", self.normalize_combo)
        form.addRow("Scale", self.scale_combo)
        form.addRow("Border cells", self.border_combo)
        form.addRow("Min area (px)", self.min_area)
        form.addRow(self.align_chk)
        form.addRow(self.mask_chk)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(nuis_box)
        row = QHBoxLayout()
        row.addWidget(self.extract_btn)
        row.addWidget(self.preview_btn)
        lay.addLayout(row)
        lay.addWidget(self.progress)
        lay.addWidget(self.summary)
        lay.addStretch(1)
        self.session.extract_progress.connect(self._on_progress)
        self._worker: Any = None
        self._update_k()

    # -- choices ---------------------------------------------------------------------------
    def nuisances(self) -> list[str]:
        """The ticked nuisances, in registry order: K = their number."""
        return [n for n, chk in self.nuisance_chks.items() if chk.isChecked()]

    def set_nuisances(self, names: list[str]) -> None:
        for n, chk in self.nuisance_chks.items():
            chk.setChecked(n in names)

    def _update_k(self, *_: Any) -> None:
        k = len(self.nuisances())
        self.k_label.setText(f"K = {k}")

    def settings(self) -> ExtractSettings:
        norm = self.normalize_combo.currentText()
        return ExtractSettings(
            size=int(self.size_combo.currentText()),
            normalize=None if norm == "none" else norm,
            scale=self.scale_combo.currentText(),
            min_area=self.min_area.value(),
            border=self.border_combo.currentText(),
            align=self.align_chk.isChecked(),
            mask=self.mask_chk.isChecked(),
        )

    @property
    def busy(self) -> bool:
        return self._worker is not None

    def _inputs(self) -> tuple[Image, Labels, int | None, bool] | None:
        """The chosen layers and their layout, or None after telling the user what is wrong."""
        image, labels = self.image_combo.layer(), self.labels_combo.layer()
        if image is None:
            self.error("No Image layer selected: open an image of the cells first.")
            return None
        if labels is None:
            self.error(
                "No Labels layer selected: add a label image (segmentation) of the cells, "
                "one integer id per cell."
            )
            return None
        img_shape = layer_array(image).shape if image.multiscale else image.data.shape
        try:
            axis, stack = infer_layout(
                img_shape, labels.data.shape, image.rgb, self.channel_combo.currentText()
            )
        except ValueError as err:
            self.error(f"Cannot crop cells: {err}")
            return None
        return image, labels, axis, stack

    # -- actions ---------------------------------------------------------------------------
    def extract(self) -> Any:
        """Crop every cell in a worker; the session is only replaced when it succeeded."""
        if self.busy:
            self.info("Cell extraction is already running.")
            return None
        checked = self._inputs()
        if checked is None:
            return None
        image, labels, axis, stack = checked
        settings = self.settings()
        settings.channel_axis, settings.stack = axis, stack
        session = self.session

        def progress(done: int, total: int) -> None:  # called in the worker thread
            session.extract_progress.emit(int(done), int(total))

        worker = create_worker(
            extract_job,
            layer_array(image),
            layer_array(labels),
            settings,
            progress,
            _progress={"desc": "ME-VAE: cropping cells"},
            _start_thread=False,
            _connect={"errored": self._on_error},
        )
        worker.returned.connect(lambda cells: self._on_cells(cells, image, labels, settings))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.extract_btn.setEnabled(False)
        self.progress.setRange(0, 0)
        self.summary.setText(f"Cropping cells of {labels.name!r}...")
        worker.start()
        return worker

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(done)

    def _on_error(self, err: Exception) -> None:
        self.error(f"Cell extraction failed: {err}")
        self.summary.setText("Cell extraction failed; nothing was changed.")

    def _on_finished(self) -> None:
        self._worker = None
        self.extract_btn.setEnabled(True)
        self.progress.setRange(0, 1)
        self.progress.setValue(1)

    def _on_cells(
        self, cells: Any, image: Image, labels: Labels, settings: ExtractSettings
    ) -> None:
        table = cells.table
        kept = len(cells.crops)
        skipped = int((table["crop_index"] < 0).sum()) if len(table) else 0
        reasons = ""
        if skipped and "skip_reason" in table:
            counts = table.loc[table["crop_index"] < 0, "skip_reason"].value_counts()
            reasons = " (" + ", ".join(f"{r}: {c}" for r, c in counts.items()) + ")"
        if kept == 0:
            self.error(
                f"No cell could be cropped from {labels.name!r}: {skipped} skipped{reasons}. "
                "Try border 'pad', a smaller min area or a larger crop size."
            )
            self.summary.setText("No cells cropped; the previous cells are kept.")
            return
        s = self.session
        s.cells, s.settings = cells, settings
        s.image_layer, s.labels_layer = image, labels
        s.clear_results()
        c, size = cells.crops.shape[1], cells.crops.shape[-1]
        self.summary.setText(
            f"{kept} cells cropped from {labels.name!r} ({size}x{size} px, {c} channel(s)); "
            f"{skipped} skipped{reasons}."
        )
        self.info(f"{kept} cells ready for training.")
        s.cells_changed.emit()

    def preview_pairs(self, n: int = 6) -> Any:
        """Show ``n`` training examples: K nuisance-randomised inputs, then the target."""
        if self.session.cells is None:
            self.error("Extract cells first: there is nothing to preview.")
            return None
        nuis = self.nuisances()
        worker = create_worker(
            preview_pairs_job,
            self.session.crops,
            nuis,
            n,
            _progress={"desc": "ME-VAE: preview pairs"},
            _start_thread=False,
            _connect={"errored": lambda e: self.error(f"Cannot preview pairs: {e}")},
        )
        worker.returned.connect(self._show_pairs)
        worker.finished.connect(lambda: self.preview_btn.setEnabled(True))
        self.preview_btn.setEnabled(False)
        worker.start()
        return worker

    def _show_pairs(self, result: tuple[np.ndarray, int]) -> None:
        images, k = result
        tiles = to_tiles(images, ncols=k + 1)
        show_image(
            self.viewer,
            PAIRS_LAYER,
            tiles,
            anchor=self.session.image_layer,
            metadata={"columns": f"{k} inputs, target"},
        )
        self.info(f"Pairs preview: each row shows {k} encoder input(s) then the target.")


# ---------------------------------------------------------------------------------------------
class ModelPanel(_Panel):
    """Model choice, training in a worker with a live loss curve, stop, save / load."""

    def __init__(self, host: MEVAEWidget) -> None:
        super().__init__(host)
        self.type_combo = QComboBox()
        self.type_combo.addItems(list(MODEL_TYPES))
        self.type_combo.currentTextChanged.connect(self._type_changed)
        self.beta = QDoubleSpinBox()
        self.beta.setRange(0.0, 1000.0)
        self.beta.setValue(4.0)
        self.beta.setToolTip(
            "KL weight of the beta-VAE relative to the VAE's (1 = plain VAE). Every model's KL "
            "weight is also scaled by (crop size / 128)^2, the reference's balance at 128 px."
        )
        self.latent = QSpinBox()
        self.latent.setRange(2, 512)
        self.latent.setValue(16)
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 10000)
        self.epochs.setValue(10)
        self.batch = QSpinBox()
        self.batch.setRange(1, 4096)
        self.batch.setValue(32)
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(6)
        self.lr.setRange(1e-6, 1.0)
        self.lr.setSingleStep(1e-4)
        self.lr.setValue(5e-4)
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
        self.autosave.setPlaceholderText("optional folder: checkpoint every epoch and on stop")
        self.continue_chk = QCheckBox("train more (continue the current model)")
        self.continue_chk.setEnabled(False)
        self.train_btn = _button("Train", self.train)
        self.stop_btn = _button("Stop", self.stop, "stop after the current step, keep the model")
        self.stop_btn.setEnabled(False)
        self.save_btn = _button("Save checkpoint...", self.save_checkpoint)
        self.load_btn = _button("Load checkpoint...", self.load_checkpoint)
        self.progress = QProgressBar()
        self.progress.setValue(0)
        self.status = QLabel("No model yet.")
        self.status.setWordWrap(True)
        self.loss_plot = LossPlot()

        form = QFormLayout()
        form.addRow("Model", self.type_combo)
        form.addRow("beta", self.beta)
        form.addRow("Latent dim", self.latent)
        form.addRow("Epochs", self.epochs)
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
        self._worker: Any = None
        self.job: TrainJob | None = None
        self._steps = 1
        self._type_changed(self.type_combo.currentText())
        self.session.model_changed.connect(self._describe_model)

    def _type_changed(self, text: str) -> None:
        self.beta.setEnabled(text == "beta-VAE")

    @property
    def busy(self) -> bool:
        return self._worker is not None

    def _describe_model(self) -> None:
        model = self.session.model
        self.continue_chk.setEnabled(model is not None)
        if model is None:
            self.status.setText("No model yet.")
            return
        cfg = model.config
        from ..config import model_kind  # a model exists: torch is loaded

        kind = model_kind(cfg)
        done = len([h for h in self.session.history if not h.get("partial")])
        nuis = ", ".join(cfg.nuisances) or "none"
        used = ""
        if model.activity_measured:
            used = f" ({model.n_active} in use{'' if model.n_active else ': train longer'})"
        self.status.setText(
            f"Model: {kind}, K={cfg.n_encoders} ({nuis}), latent {cfg.latent_dim}{used}, "
            f"{cfg.image_size} px, {cfg.channels} channel(s); {done} epoch(s) trained"
            f"{' - ' + self.session.model_source if self.session.model_source else ''}."
        )

    # -- training --------------------------------------------------------------------------
    def train(self) -> Any:
        """Start training in a worker (new model, or more epochs of the current one)."""
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
        nuisances = self.host.cells_panel.nuisances()
        model = None
        if self.continue_chk.isChecked() and s.model is not None:
            from ..checkpoints import check_compatible
            from ..config import CheckpointError

            model = s.model
            cfg = model.config
            if cfg.nuisances:
                nuisances = list(cfg.nuisances)
            if cfg.n_encoders > 1:
                model_type = "ME-VAE"
            k = 1 if MODEL_TYPES[model_type] != "mevae" else len(nuisances)
            try:
                check_compatible(cfg, size, c, k)
            except CheckpointError as err:
                self.error(f"Cannot train the current model more: {err}")
                return None
        elif MODEL_TYPES[model_type] == "mevae" and not nuisances:
            self.error(
                "An ME-VAE needs at least one nuisance to remove (Cells tab): tick rotation, "
                "polarity or scale, or choose the VAE model type."
            )
            return None
        base = self.beta.value() if model_type == "beta-VAE" else 1.0
        config_kw = dict(
            image_size=size,
            channels=c,
            latent_dim=self.latent.value(),
            beta=_size_scaled_beta(base, size),
        )
        options_kw = dict(
            epochs=self.epochs.value(),
            batch_size=self.batch.value(),
            learn_rate=self.lr.value(),
            device=self.device.currentText(),
            seed=self.seed.value(),
            save_dir=self.autosave.text().strip() or None,
            kl_warmup=float(self.kl_warmup.value()),
            precision=self.precision.currentText(),
        )
        preview = crops[: min(8, n)]
        self._steps = steps_per_epoch(n, options_kw["batch_size"])
        total = 2 + options_kw["epochs"] * (self._steps + 1)
        job = TrainJob()
        worker = create_worker(
            train_job,
            job,
            crops,
            nuisances,
            model_type,
            config_kw,
            options_kw,
            model,
            preview,
            list(s.history) if model is not None else [],
            s.optimizer_state if model is not None else None,
            _progress={"total": total, "desc": "ME-VAE: training"},
            _start_thread=False,
            _connect={"errored": self._on_error},
        )
        worker.yielded.connect(self._on_report)
        worker.returned.connect(self._on_returned)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self.job, self._worker = job, worker
        self._model_type = model_type
        self._preview = preview
        self._run_start_epoch = 0
        self._run_desc = ""
        if model is None:
            self.loss_plot.clear()
        self.progress.setRange(0, self.epochs.value() * self._steps)
        self.progress.setValue(0)
        self.train_btn.setEnabled(False)
        self.stop_btn.setEnabled(True)
        self.load_btn.setEnabled(False)
        self.status.setText("Training: building the model...")
        worker.start()
        return worker

    def stop(self) -> None:
        """Stop after the current step; the trainer keeps (and with autosave, saves) the model."""
        if self.job is None:
            return
        self.job.stop()
        self.stop_btn.setEnabled(False)
        self.status.setText("Stopping after the current step...")

    def _on_report(self, msg: tuple[str, Any, Any]) -> None:
        kind, report, extra = msg
        if kind == "started":
            self._steps = int(extra)
            trainer = self.job.trainer if self.job else None
            self._run_start_epoch = trainer.start_epoch if trainer else 0
            # what "auto" resolved to, e.g. "cpu, bf16": shown with the speed
            self._run_desc = f"{trainer.device.type}, {trainer.precision}" if trainer else ""
            self.progress.setRange(0, max(1, self.epochs.value() * self._steps))
            return
        done_steps = (report.epoch - self._run_start_epoch) * self._steps + report.step
        if kind == "step":
            self.progress.setValue(min(self.progress.maximum(), done_steps))
            self.loss_plot.add_step(
                report.epoch + report.step / max(1, report.steps_per_epoch), report.loss
            )
            self.status.setText(
                f"Epoch {report.epoch + 1}/{report.epochs}, step {report.step}/"
                f"{report.steps_per_epoch}: loss {report.loss:.2f} "
                f"({report.images_per_s:.0f} cells/s"
                + (f" on {self._run_desc})" if self._run_desc else ")")
            )
        elif kind == "epoch":
            self.progress.setValue(min(self.progress.maximum(), done_steps))
            self.loss_plot.add_epoch(report.epoch, report.loss)
            if extra is not None:
                pairs = np.stack(
                    [x for pair in zip(self._preview, extra, strict=True) for x in pair]
                )
                show_image(
                    self.viewer,
                    TRAIN_RECON_LAYER,
                    to_tiles(pairs, ncols=min(8, len(pairs))),
                    anchor=self.session.image_layer,
                    metadata={"epoch": report.epoch, "layout": "target | reconstruction"},
                )
            self.status.setText(
                f"Epoch {report.epoch}/{report.epochs}: mean loss {report.loss:.2f}"
            )
        elif kind == "end":
            self.progress.setValue(self.progress.maximum())
            ckpt = f" Checkpoint: {report.checkpoint}" if report.checkpoint else ""
            self.info(f"ME-VAE {report.message}.{ckpt}")

    def _keep_model(self, model: Any, source: str) -> None:
        if model is None:
            return
        self.session.model = getattr(model, "module", model).eval()
        trainer = self.job.trainer if self.job else None
        if trainer is not None:
            self.session.history = list(trainer.history)
            self.session.optimizer_state = trainer.optimizer.state_dict()
        self.session.model_source = source
        self.session.model_type = getattr(self, "_model_type", "")
        self.session.clear_results()
        self.session.model_changed.emit()

    def _on_returned(self, model: Any) -> None:
        self._keep_model(model, "trained here")

    def _on_aborted(self) -> None:
        self._keep_model(self.job.model if self.job else None, "training interrupted")

    def _on_error(self, err: Exception) -> None:
        self.error(f"Training failed: {err}")
        if type(err).__name__ == "TrainingDiverged" and self.job is not None:
            self._keep_model(self.job.model, "last good weights before the loss diverged")

    def _on_finished(self) -> None:
        self._worker = None
        self.train_btn.setEnabled(True)
        self.stop_btn.setEnabled(False)
        self.load_btn.setEnabled(True)
        self._describe_model()

    # -- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path | None = None) -> Path | None:
        """Write the current model (weights, config, history and the crop settings)."""
        if self.session.model is None:
            self.error("No model to save: train or load one first.")
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(
                self, "Save ME-VAE checkpoint", "mevae_checkpoint.pt", "Checkpoints (*.pt)"
            )
            if not path:
                return None
        from ..checkpoints import save_checkpoint

        s = self.session
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
                self, "Load ME-VAE checkpoint", "", "Checkpoints (*.pt);;All files (*)"
            )
            if not path:
                return False
        from ..checkpoints import check_compatible, load_checkpoint
        from ..config import CheckpointError
        from ..training import select_device

        s = self.session
        try:
            ckpt = load_checkpoint(path)
            crops = s.crops
            if crops is not None:
                check_compatible(
                    ckpt.config, crops.shape[-1], crops.shape[1], ckpt.config.n_encoders
                )
            model = ckpt.build_model(select_device(self.device.currentText()))
        except (CheckpointError, ValueError) as err:
            self.error(f"Cannot load {Path(path).name}: {err}")
            return False
        s.model = model
        s.history = list(ckpt.history)
        s.optimizer_state = ckpt.optimizer_state
        s.model_source = f"loaded from {Path(path).name}"
        s.clear_results()
        self._apply_config(ckpt.config, str(ckpt.extra.get("model_type", "")))
        s.model_type = self.type_combo.currentText()
        self.loss_plot.set_history(s.history)
        s.model_changed.emit()
        self.info(f"Model loaded from {ckpt.path}")
        return True

    def _apply_config(self, cfg: Any, model_type: str = "") -> None:
        """Show a loaded model's settings so 'train more' continues it as it was."""
        self.latent.setValue(cfg.latent_dim)
        if model_type not in MODEL_TYPES:
            from ..config import model_kind  # a loaded config: torch is loaded

            model_type = model_kind(cfg)
        self.type_combo.setCurrentText(model_type)
        if model_type == "beta-VAE":
            self.beta.setValue(cfg.beta / _size_scaled_beta(1.0, cfg.image_size))
        if cfg.nuisances:
            self.host.cells_panel.set_nuisances(list(cfg.nuisances))


# ---------------------------------------------------------------------------------------------
class AnalysePanel(_Panel):
    """Encode, UMAP + cluster, results into the labels layer, clickable scatter, traversal."""

    def __init__(self, host: MEVAEWidget) -> None:
        super().__init__(host)
        self.encode_btn = _button("Encode cells", self.encode, "latent features of every cell")
        self.method = QComboBox()
        self.method.addItems(["kmeans", "gmm", "hdbscan"])
        self.n_clusters = QSpinBox()
        self.n_clusters.setRange(1, 100)
        self.n_clusters.setValue(3)
        self.umap_chk = QCheckBox("UMAP")
        self.umap_chk.setChecked(True)
        self.cluster_btn = _button("Cluster", self.cluster, "cluster the latents again")
        self.progress = QProgressBar()
        self.progress.setValue(0)
        self.scatter = ScatterPlot(on_pick=self.select_cell)
        self.dim = QSpinBox()
        self.dim.setRange(0, 15)
        self.steps = QSpinBox()
        self.steps.setRange(3, 31)
        self.steps.setValue(10)
        self.around_chk = QCheckBox("around selected cell")
        self.traverse_btn = _button("Show traversal", self.show_traversal)
        self.status = QLabel("Train or load a model, then encode the cells.")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Clustering", self.method)
        form.addRow("Clusters", self.n_clusters)
        lay = QVBoxLayout(self)
        lay.addWidget(self.encode_btn)
        lay.addLayout(form)
        row = QHBoxLayout()
        row.addWidget(self.umap_chk)
        row.addWidget(self.cluster_btn)
        lay.addLayout(row)
        lay.addWidget(self.progress)
        lay.addWidget(self.scatter)
        trav = QGroupBox("Latent traversal")
        tl = QFormLayout(trav)
        tl.addRow("Dimension", self.dim)
        tl.addRow("Steps", self.steps)
        tl.addRow(self.around_chk)
        tl.addRow(self.traverse_btn)
        lay.addWidget(trav)
        lay.addWidget(self.status)
        lay.addStretch(1)
        self._worker: Any = None
        self._then_cluster = False
        self.session.model_changed.connect(self._model_changed)
        self.session.cells_changed.connect(self._reset_plot)

    @property
    def busy(self) -> bool:
        return self._worker is not None

    def _model_changed(self) -> None:
        if self.session.model is not None:
            self.dim.setRange(0, self.session.model.config.latent_dim - 1)
        self._reset_plot()

    def _reset_plot(self) -> None:
        self.scatter.set_points(np.zeros((0, 2)), np.zeros(0))

    def _ready(self) -> bool:
        s = self.session
        if s.cells is None:
            self.error("Extract cells first (Cells tab).")
            return False
        if s.model is None:
            self.error("Train or load a model first (Model tab).")
            return False
        if self.host.model_panel.busy:
            self.error("Wait for the training to end (or stop it) before encoding.")
            return False
        if s.labels_layer is None or s.labels_layer not in self.viewer.layers:
            self.error("The labels layer the cells came from was removed; extract the cells again.")
            return False
        return True

    def encode(self) -> Any:
        """Encode every cell in a worker, then reconstruct, then UMAP + cluster."""
        if self.busy or not self._ready():
            return None
        from ..checkpoints import check_compatible
        from ..config import CheckpointError

        s = self.session
        crops = s.crops
        try:
            check_compatible(
                s.model.config, crops.shape[-1], crops.shape[1], s.model.config.n_encoders
            )
        except CheckpointError as err:
            self.error(f"Cannot encode: {err}")
            return None
        batch = 128
        worker = create_worker(
            encode_job,
            s.model,
            crops,
            batch,
            _progress={"total": math.ceil(len(crops) / batch), "desc": "ME-VAE: encoding"},
            _start_thread=False,
            _connect={"errored": self._on_error},
        )
        worker.yielded.connect(self._on_encode_progress)
        worker.returned.connect(self._on_encoded)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._set_enabled(False)
        self.progress.setRange(0, len(crops))
        self.progress.setValue(0)
        self.status.setText(f"Encoding {len(crops)} cells...")
        worker.start()
        return worker

    def _set_enabled(self, on: bool) -> None:
        for b in (self.encode_btn, self.cluster_btn, self.traverse_btn):
            b.setEnabled(on)

    def _on_error(self, err: Exception) -> None:
        self.error(f"Analysis failed: {err}")

    def _on_finished(self) -> None:
        self._worker = None
        self._set_enabled(True)
        if self._then_cluster:
            self._then_cluster = False
            self.cluster()

    def _on_encode_progress(self, item: tuple[int, int]) -> None:
        done, total = item
        self.progress.setRange(0, total)
        self.progress.setValue(done)

    def _on_encoded(self, result: Any) -> None:
        s = self.session
        s.latents, s.recon = result.latents, result.recon
        s.embedding = s.clusters = None
        labels = s.labels_layer
        show_image(
            self.viewer,
            f"{labels.name} reconstructions",
            _display_stack(result.recon),
            anchor=s.image_layer,
            metadata={"rows": "cells in crop order (features row)"},
        )
        self.status.setText(f"{len(s.latents)} cells encoded ({s.latents.shape[1]} features).")
        self._then_cluster = True  # chained in _on_finished, once this worker is done

    def cluster(self) -> Any:
        """UMAP (once per encoding) and clustering in a worker; results go to the layers."""
        if self.busy:
            return None
        s = self.session
        if s.latents is None:
            self.error("Encode the cells first.")
            return None
        if s.labels_layer is None or s.labels_layer not in self.viewer.layers:
            self.error("The labels layer the cells came from was removed; extract the cells again.")
            return None
        worker = create_worker(
            cluster_job,
            s.latents,
            self.method.currentText(),
            self.n_clusters.value(),
            s.embedding,
            self.umap_chk.isChecked(),
            _progress={"desc": "ME-VAE: UMAP + clustering"},
            _start_thread=False,
            _connect={"errored": self._on_error},
        )
        worker.returned.connect(self._apply_results)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._set_enabled(False)
        self.progress.setRange(0, 0)
        self.status.setText("UMAP + clustering...")
        worker.start()
        return worker

    def _apply_results(self, result: tuple[np.ndarray | None, np.ndarray]) -> None:
        from ..analysis import features_table, paint_clusters

        embedding, clusters = result
        s = self.session
        labels = s.labels_layer
        if labels is None or labels not in self.viewer.layers:
            self.error("The labels layer was removed during the analysis; results not shown.")
            return
        kept = s.cells.kept
        table = features_table(kept, s.latents, embedding, clusters)
        s.embedding, s.clusters, s.table = embedding, clusters, table
        labels.features = _merge_features(labels.features, table)
        planes = np.asarray(kept["plane"]) if s.settings and s.settings.stack else None
        painted = paint_clusters(labels.data, table["label"], clusters, planes)
        s.clusters_layer = show_labels(
            self.viewer,
            f"{labels.name} clusters",
            painted,
            scale=labels.scale,
            translate=labels.translate,
            metadata={"source_labels": labels.name},
        )
        s.clusters_layer.features = pd.DataFrame(
            {"index": np.arange(int(clusters.max(initial=0)) + 1)}
        ).assign(cells=lambda d: [int((clusters == i).sum()) for i in d["index"]])
        if embedding is not None:
            self.scatter.set_points(embedding, clusters, f"{len(clusters)} cells")
        counts = ", ".join(
            f"{int(c)}: {int(n)}"
            for c, n in zip(*np.unique(clusters, return_counts=True), strict=True)
        )
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        self.status.setText(
            f"{self.method.currentText()} clusters (cluster: cells) {counts}. Results are in the "
            f"features of {labels.name!r}; click a point to find its cell."
        )
        s.results_changed.emit()

    def select_cell(self, row: int) -> None:
        """Show the cell of features row ``row`` in the viewer: select its label and centre on it."""
        s = self.session
        if s.table is None or not 0 <= row < len(s.table):
            return
        rec = s.table.iloc[row]
        labels = s.labels_layer
        label = int(rec["label"])
        s.selected_row = row
        self.scatter.select(row)
        if labels is None or labels not in self.viewer.layers:
            return
        labels.selected_label = label
        labels.show_selected_label = True
        point = [float(rec["centroid_y"]), float(rec["centroid_x"])]
        if labels.ndim == 3:
            point = [float(rec["plane"]), *point]
        world = np.asarray(labels.data_to_world(point))
        if labels.ndim == 3:
            self.viewer.dims.set_point(self.viewer.dims.ndim - 3, world[0])
        _camera(self.viewer).center = tuple(world[-2:])
        self.status.setText(f"Cell {label}: cluster {int(rec['cluster'])}.")

    def show_traversal(self, dim: int | None = None) -> np.ndarray | None:
        """Decode a walk along one latent dimension (others at 0, or at the selected cell)."""
        s = self.session
        if s.model is None:
            self.error("Train or load a model first (Model tab).")
            return None
        if self.host.model_panel.busy:
            self.error("Wait for the training to end (or stop it) first.")
            return None
        from ..analysis import latent_traversal

        d = self.dim.value() if dim is None else int(dim)
        base = None
        if self.around_chk.isChecked() and s.selected_row is not None and s.latents is not None:
            base = s.latents[s.selected_row]
        try:
            walk = latent_traversal(s.model, d, steps=self.steps.value(), base=base)
        except ValueError as err:
            self.error(f"Cannot traverse: {err}")
            return None
        show_image(
            self.viewer,
            TRAVERSAL_LAYER,
            to_tiles(walk, ncols=len(walk)),
            anchor=s.image_layer,
            metadata={"dimension": d, "quantiles": "0.05..0.95"},
        )
        self.status.setText(f"Latent traversal of z{d}: left to right from low to high values.")
        return walk


def _camera(viewer: Any) -> Any:
    """The viewer's camera (``viewer.scene.camera`` from napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def _display_stack(images: np.ndarray) -> np.ndarray:
    from ..figures import to_display

    return to_display(np.asarray(images, np.float32))


def _merge_features(old: pd.DataFrame | None, new: pd.DataFrame) -> pd.DataFrame:
    """New results, plus the user's own columns of the old table (e.g. ground truth), matched
    on ``index``; old results (cluster, z*, UMAP*) are replaced, never mixed in."""
    if old is None or len(old) == 0 or "index" not in old:
        return new
    ours = set(_RESULT_COLUMNS) | set(new.columns)
    keep = [
        c
        for c in old.columns
        if c not in ours and not (c[:1] == "z" and c[1:].isdigit()) and not c.startswith("UMAP")
    ]
    if not keep:
        return new
    extra = old[["index", *keep]].drop_duplicates("index")
    return new.merge(extra, on="index", how="left")


# ---------------------------------------------------------------------------------------------
class ExportPanel(_Panel):
    """Write the features table (CSV) and the cluster label image (TIFF)."""

    def __init__(self, host: MEVAEWidget) -> None:
        super().__init__(host)
        self.csv_btn = _button("Save features CSV...", self.export_csv)
        self.tiff_btn = _button("Save cluster labels TIFF...", self.export_clusters_tiff)
        self.status = QLabel("Encode and cluster the cells first (Analyse tab).")
        self.status.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.addWidget(self.csv_btn)
        lay.addWidget(self.tiff_btn)
        lay.addWidget(self.status)
        lay.addStretch(1)
        self.session.results_changed.connect(self._results)

    def _results(self) -> None:
        t = self.session.table
        if t is not None:
            self.status.setText(f"Ready: {len(t)} cells x {t.shape[1]} columns.")

    def _path(self, path: str | Path | None, title: str, default: str, filt: str) -> Path | None:
        if path is not None:
            return Path(path)
        chosen, _ = QFileDialog.getSaveFileName(self, title, default, filt)
        return Path(chosen) if chosen else None

    def export_csv(self, path: str | Path | None = None) -> Path | None:
        """One row per cell with its features and the source layer names."""
        s = self.session
        if s.table is None:
            self.error("No features to export: encode and cluster the cells first.")
            return None
        out = self._path(path, "Save features CSV", "mevae_features.csv", "CSV (*.csv)")
        if out is None:
            return None
        from ..analysis import export_features_csv

        sources = {
            "image": s.image_layer.name if s.image_layer is not None else "",
            "labels": s.labels_layer.name if s.labels_layer is not None else "",
        }
        try:
            written = export_features_csv(s.table, out, sources=sources)
        except OSError as err:
            self.error(f"Cannot write {out}: {err}")
            return None
        self.status.setText(f"Features written to {written}")
        self.info(f"Features written to {written}")
        return written

    def export_clusters_tiff(self, path: str | Path | None = None) -> Path | None:
        """The cluster label image (each cell painted with its cluster id) as TIFF."""
        s = self.session
        layer = s.clusters_layer
        if layer is None or layer not in self.viewer.layers:
            self.error("No cluster label image: cluster the cells first (Analyse tab).")
            return None
        out = self._path(path, "Save cluster labels", f"{layer.name}.tif", "TIFF (*.tif *.tiff)")
        if out is None:
            return None
        import tifffile

        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(out, np.asarray(layer.data, dtype=np.int32), compression="zlib")
        except OSError as err:
            self.error(f"Cannot write {out}: {err}")
            return None
        self.status.setText(f"Cluster labels written to {out}")
        self.info(f"Cluster labels written to {out}")
        return out


# ---------------------------------------------------------------------------------------------
class MEVAEWidget(QWidget):
    """The ME-VAE dock: Cells -> Model -> Analyse -> Export, sharing one :class:`Session`."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = viewer
        self.session = Session()
        self.cells_panel = CellsPanel(self)
        self.model_panel = ModelPanel(self)
        self.analyse_panel = AnalysePanel(self)
        self.export_panel = ExportPanel(self)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.cells_panel, "Cells")
        self.tabs.addTab(self.model_panel, "Model")
        self.tabs.addTab(self.analyse_panel, "Analyse")
        self.tabs.addTab(self.export_panel, "Export")
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lay = QVBoxLayout(self)
        lay.addWidget(self.tabs)
        lay.addWidget(self.status)
        self.setMinimumWidth(340)

    @property
    def busy(self) -> bool:
        """Whether any worker of this widget is still running (tests wait on it)."""
        return self.cells_panel.busy or self.model_panel.busy or self.analyse_panel.busy

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        """Closing the dock stops a running training (the trainer keeps/saves the model)."""
        if self.model_panel.job is not None:
            self.model_panel.job.stop()
        super().closeEvent(event)

    def error(self, msg: str) -> None:
        """Tell the user what is wrong (status line + napari notification); change nothing."""
        self.status.setText(f"Error: {msg}")
        self.status.setStyleSheet("color: #ff7f7f;")
        show_error(msg)

    def warn(self, msg: str) -> None:
        self.status.setText(msg)
        self.status.setStyleSheet("color: #ffd27f;")
        show_warning(msg)

    def info(self, msg: str) -> None:
        self.status.setText(msg)
        self.status.setStyleSheet("")
        show_info(msg)
