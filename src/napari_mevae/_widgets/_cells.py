"""The Cells tab: pick the image and labels layers (one pair, or several fields at once), crop
every cell into canonical pose, preview training pairs."""

from __future__ import annotations

from typing import Any

import numpy as np
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QSpinBox,
    QVBoxLayout,
)

from .. import fields, workflow
from ..config import NORMALIZATIONS, CropSettings
from ._layers import (
    LayerCombo,
    PairList,
    infer_layout,
    label_columns,
    layer_array,
    layer_shape,
    show_image,
    to_tiles,
)
from ._panel import Field, Host, Panel, button

__all__ = ["PAIRS_LAYER", "CellsPanel"]

CROP_SIZES = ("32", "48", "64", "96", "128")
PAIRS_LAYER = "ME-VAE pairs preview"
OPEN_LIMIT = 48  # fields one viewer opens as layers; a screen goes through `mevae crop`
PAIRING_RULE = (
    "Each labels layer is paired with the image of the same name without its ending "
    "(\u201cfield 1 labels\u201d, \u201cfield 1_mask\u201d \u2192 \u201cfield 1\u201d), "
    "else a similar name, else the only image of its shape. One model and one clustering "
    "cover the cells of every checked field."
)


class CellsPanel(Panel):
    """Choose image + labels, crop every cell, preview the pairs the model will train on."""

    extract_progress = Signal(int, int)  # emitted from the extraction thread (queued to GUI)

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.image_combo = LayerCombo(self.viewer, Image)
        self.labels_combo = LayerCombo(self.viewer, Labels)
        self.size_combo = QComboBox()
        self.size_combo.addItems(CROP_SIZES)
        self.size_combo.setCurrentText(str(CropSettings.size))
        self.size_combo.setToolTip("crop side in pixels (a multiple of 8); the model's image size")
        self.channel_combo = QComboBox()
        self.channel_combo.addItems(["auto", "none", "0", "1", "2", "3", "-1"])
        self.channel_combo.setToolTip(
            "axis of the image that holds channels; auto: the axis the labels do not have "
            "(RGB: the last)"
        )
        self.fields_chk = QCheckBox("several fields at once")
        self.fields_chk.setToolTip(PAIRING_RULE)
        self.open_btn = button(
            "Open fields...",
            self.open_folder,
            "add the fields of a folder (a1.tif + a1_labels.tif, or images/ + labels/) or of an "
            f"OME-Zarr image or plate as layers, up to {OPEN_LIMIT} (a whole screen: mevae crop)",
        )
        self.pair_list = PairList(self.viewer, lambda: self.channel_combo.currentText())
        self.pair_note = QLabel(PAIRING_RULE)
        self.pair_note.setWordWrap(True)
        self.pair_note.setStyleSheet("color: #a0a0a0; font-size: 9pt;")
        self.normalize_combo = QComboBox()
        self.normalize_combo.addItems(list(NORMALIZATIONS))
        self.scale_combo = QComboBox()
        self.scale_combo.addItems(["fixed", "fit"])
        # fit by default: no cell is skipped for being larger than the crop, and cell size (a
        # nuisance like rotation, and still in the table as its area) does not crowd out shape
        # and texture; on the plugin's sample (3 seeds) k-means NMI went from 0.50-0.61 to 0.65-1.0
        self.scale_combo.setCurrentText("fit")
        self.scale_combo.setToolTip(
            "fit: rescale each cell to fill the crop (every cell kept, whatever its size); "
            "fixed: keep pixel size (cells larger than the crop are skipped)"
        )
        self.border_combo = QComboBox()
        self.border_combo.addItems(["drop", "pad"])
        self.min_area = QSpinBox()
        self.min_area.setRange(0, 10**7)
        self.align_chk = QCheckBox("align cells (canonical orientation)")
        self.align_chk.setChecked(True)
        self.mask_chk = QCheckBox("mask neighbours")
        self.mask_chk.setChecked(True)
        self.extract_btn = button("Extract cells", self.extract, "crop every labelled cell")
        self.preview_btn = button(
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
        fields_row = QHBoxLayout()
        fields_row.addWidget(self.fields_chk)
        fields_row.addWidget(self.open_btn)
        form.addRow(fields_row)
        form.addRow(self.pair_list)
        form.addRow(self.pair_note)
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
        row = QHBoxLayout()
        row.addWidget(self.extract_btn)
        row.addWidget(self.preview_btn)
        lay.addLayout(row)
        lay.addWidget(self.progress)
        lay.addWidget(self.summary)
        lay.addStretch(1)
        self.extract_progress.connect(self._on_progress)
        self.fields_chk.toggled.connect(self._several)
        self.channel_combo.currentIndexChanged.connect(self.pair_list.refresh)
        self._several(False)
        self.session.state_changed.connect(self.update_buttons)
        self.update_buttons()

    def update_buttons(self) -> None:
        s = self.session
        self.extract_btn.setEnabled(not self.busy and not s.training)
        self.open_btn.setEnabled(not self.busy)
        self.preview_btn.setEnabled(not self.busy and s.cells is not None)

    def settings(self) -> CropSettings:
        return CropSettings(
            size=int(self.size_combo.currentText()),
            normalize=self.normalize_combo.currentText(),
            scale=self.scale_combo.currentText(),
            min_area=self.min_area.value(),
            border=self.border_combo.currentText(),
            align=self.align_chk.isChecked(),
            mask=self.mask_chk.isChecked(),
        )

    def _several(self, on: bool) -> None:
        """Several fields: the pair list replaces the image and labels boxes."""
        self.image_combo.setEnabled(not on)
        self.labels_combo.setEnabled(not on)
        self.pair_list.setVisible(on)
        self.pair_note.setVisible(on)
        if on:
            self.pair_list.refresh()

    def _layout(self, image: Image, labels: Labels) -> tuple[int | None, bool] | None:
        try:
            return infer_layout(
                layer_shape(image), layer_shape(labels), image.rgb, self.channel_combo.currentText()
            )
        except ValueError as err:
            self.error(f"Cannot crop cells of {labels.name!r}: {err}")
            return None

    def _inputs(self) -> list[tuple[Image, Labels, int | None, bool]] | None:
        """The chosen fields and their layout, or None after telling the user what is wrong."""
        if self.fields_chk.isChecked():
            pairs = self.pair_list.pairs()
            if not pairs:
                self.error(
                    "No field checked: add labels layers whose images can be found (same name "
                    "without 'labels', or the same shape) and check them."
                )
                return None
        else:
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
            pairs = [(image, labels)]
        out = []
        for image, labels in pairs:
            layout = self._layout(image, labels)
            if layout is None:
                return None
            out.append((image, labels, *layout))
        return out

    # -- actions -----------------------------------------------------------------------------
    def extract(self) -> Any:
        """Crop every cell in a worker; the session is only replaced when it succeeded."""
        if self.busy:
            self.info("Cell extraction is already running.")
            return None
        if self.session.training:
            self.error(
                "Training is running on the current cells: stop it (Model tab) before "
                "extracting new ones."
            )
            return None
        checked = self._inputs()
        if checked is None:
            return None
        pairs = [(image, labels) for image, labels, _, _ in checked]
        settings = []  # one per field: the channel axis can differ
        for _, _, axis, stack in checked:
            s = self.settings()
            s.channel_axis, s.stack = axis, stack
            settings.append(s)
        signal = self.extract_progress

        def progress(done: int, total: int) -> None:  # called in the worker thread
            signal.emit(int(done), int(total))

        worker = create_worker(
            fields.crop_fields,
            [(layer_array(im), layer_array(lab), lab.name) for im, lab in pairs],
            settings,
            progress,
            _progress={"desc": "ME-VAE: cropping cells"},
            _start_thread=False,
            _connect={"errored": self._on_error},
        )
        worker.returned.connect(lambda cells: self._on_cells(cells, pairs, settings))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.begin()
        self.progress.setRange(0, 0)
        what = repr(pairs[0][1].name) if len(pairs) == 1 else f"{len(pairs)} fields"
        self.summary.setText(f"Cropping cells of {what}...")
        worker.start()
        return worker

    def open_folder(self, path: str | None = None) -> Any:
        """Read the fields of a folder or an OME-Zarr image/plate (in a worker) and add them
        as checked layer pairs; the analyst then checks the crop settings and extracts."""
        from .. import screens
        from ..config import InputError

        if self.busy:
            self.info("Wait for the current step to finish.")
            return None
        if path is None:
            path = QFileDialog.getExistingDirectory(
                self, "Open a folder of fields or an OME-Zarr image/plate"
            )
            if not path:
                return None
        try:
            found = screens.fields_in(path)
            if len(found) > OPEN_LIMIT:
                raise InputError(
                    f"{len(found)} fields: napari opens up to {OPEN_LIMIT} at once; crop a "
                    "whole screen with `mevae crop` (README: Screens and plates)"
                )
        except InputError as err:
            self.error(f"Cannot open {path}: {err}")
            return None
        worker = create_worker(
            screens.load_fields,
            found,
            _progress={"total": len(found), "desc": "ME-VAE: reading fields"},
            _start_thread=False,
            _connect={"errored": lambda err: self._open_failed(path, err)},
        )
        worker.yielded.connect(lambda done: self._on_progress(*done))
        worker.returned.connect(lambda data: self._on_opened(data, path))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.begin()
        self.summary.setText(f"Reading {len(found)} field(s) from {path}...")
        worker.start()
        return worker

    def _open_failed(self, path: str, err: Exception) -> None:
        self.error(f"Cannot open {path}: {err}")
        self.summary.setText("Nothing was opened.")

    def _on_opened(self, data: list[tuple[Any, Any, str]], path: str) -> None:
        self.open_fields(data, extract=False)
        self.summary.setText(
            f"Opened {len(data)} field(s) from {path}: check the crop settings, then Extract cells."
        )

    def open_fields(self, data: list[tuple[Any, Any, str]], extract: bool = True) -> Any:
        """Add fields given as ``(image array, labels array, name)`` (e.g. the wells and sites
        of a plate) as layers ``name`` and ``name labels``, check exactly these in the
        several-fields list and, with ``extract``, crop their cells (returns the worker)."""
        names = []
        for image, labels, name in data:
            self.viewer.add_image(image, name=name)
            lab = self.viewer.add_labels(np.asarray(labels), name=f"{name} labels", opacity=0.5)
            names.append(lab.name)
        self.fields_chk.setChecked(True)
        self.pair_list.refresh()
        self.pair_list.set_checked(names)
        return self.extract() if extract else None

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(done)

    def _on_error(self, err: Exception) -> None:
        self.error(f"Cell extraction failed: {err}")
        self.summary.setText("Cell extraction failed; nothing was changed.")

    def _on_finished(self) -> None:
        self._worker = None
        self.update_buttons()
        self.progress.setRange(0, 1)
        self.progress.setValue(1)

    def _on_cells(
        self, cells: Any, pairs: list[tuple[Image, Labels]], settings: list[CropSettings]
    ) -> None:
        kept = len(cells.crops)
        skipped = len(cells.skipped)
        counts = cells.skip_summary()
        reasons = " (" + ", ".join(f"{r}: {c}" for r, c in counts.items()) + ")" if counts else ""
        where = repr(pairs[0][1].name) if len(pairs) == 1 else f"{len(pairs)} fields"
        if kept == 0:
            self.error(
                f"No cell could be cropped from {where}: {skipped} skipped{reasons}. "
                "Try border 'pad', a smaller min area or a larger crop size."
            )
            self.summary.setText("No cells cropped; the previous cells are kept.")
            return
        s = self.session
        if len(s.fields) > 1:  # the fields an earlier several-fields run hid come back
            for f in s.fields:
                for layer in (f.image, f.labels):
                    if layer is not None and layer in self.viewer.layers:
                        layer.visible = True
        s.cells, s.settings = cells, settings[0]
        s.fields = [
            Field(image, labels, st) for (image, labels), st in zip(pairs, settings, strict=True)
        ]
        s.show_field(0)  # several fields: the first in view, the others hidden
        s.clear_results()
        c, size = cells.crops.shape[1], cells.crops.shape[-1]
        per = ""
        if len(pairs) > 1:
            n = cells.kept["field"].value_counts().reindex(range(len(pairs)), fill_value=0)
            if len(pairs) <= 6:
                per = " Cells per field: " + ", ".join(
                    f"{lab.name}: {n[i]}" for i, (_, lab) in enumerate(pairs)
                )
            else:
                per = f" Cells per field: {n.min()} to {n.max()} (median {int(n.median())})"
            per += f". In view: {pairs[0][1].name!r} (the others are hidden)."
        self.summary.setText(
            f"{kept} cells cropped from {where} ({size}x{size} px, {c} channel(s)); "
            f"{skipped} skipped{reasons}.{per}"
        )
        self.info(f"{kept} cells ready for training.")
        s.cells_changed.emit()

    def preview_pairs(self, n: int = 6) -> Any:
        """Show ``n`` training examples: K nuisance-randomised inputs, then the target."""
        if self.busy:
            self.info("Wait for the cells to be cropped.")
            return None
        if self.session.cells is None:
            self.error("Extract cells first: there is nothing to preview.")
            return None
        worker = create_worker(
            workflow.preview_pairs,
            self.session.crops,
            list(self.session.nuisances),
            n,
            _progress={"desc": "ME-VAE: preview pairs"},
            _start_thread=False,
            _connect={"errored": lambda e: self.error(f"Cannot preview pairs: {e}")},
        )
        worker.returned.connect(self._show_pairs)
        worker.finished.connect(self._preview_done)
        self._worker = worker
        self.begin()
        worker.start()
        return worker

    def _preview_done(self) -> None:
        self._worker = None
        self.update_buttons()

    def _show_pairs(self, result: tuple[np.ndarray, int]) -> None:
        images, k = result
        nuis = self.session.nuisances if len(self.session.nuisances) == k else ["all"] * k
        columns = [*nuis, "target"]  # encoder k's input has nuisance k randomised
        layer = show_image(
            self.viewer,
            PAIRS_LAYER,
            to_tiles(images, ncols=k + 1),
            anchor=self.session.anchor,
            metadata={"columns": columns},
        )
        label_columns(self.viewer, layer, columns, images.shape[-1])
        self.info(f"Pairs preview: each row shows {k} encoder input(s) then the target.")
